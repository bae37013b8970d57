"""What the benchmark scripts share: finding pod's models and llama.cpp, free ports, waiting
for a started pod, describing the machine, and medians.

Python 3.11 standard library only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The model the comparisons with llama.cpp run unless told otherwise.
DEFAULT_MODEL = "smollm2-135m-instruct"


def default_home() -> Path:
    """pod's state directory: $POD_HOME, else the default of `pod --home`."""
    env = os.environ.get("POD_HOME")
    if env:
        return Path(env).expanduser()
    return Path("~/.local/share/pod").expanduser()


def resolve_model(model: str, home: Path, script: str) -> Path:
    """A path to a GGUF file, or a catalogue name under HOME/models/; exits naming `script`
    when neither exists."""
    p = Path(model).expanduser()
    if p.is_file():
        return p.resolve()
    p = home / "models" / model / "model.gguf"
    if p.is_file():
        return p.resolve()
    sys.exit(
        f"{script}: no GGUF file at `{model}` nor at {p}; "
        f"fetch it with `pod --home {home} models pull {model}`"
    )


def find_llama_cpp(binary: str, script: str, flag: str) -> Path:
    """Builds (or finds, when already built) the pinned llama.cpp; the path of `binary` in it.
    On failure exits naming `script` and the `flag` that skips the build."""
    build = REPO / "bench" / "build-llama-cpp.sh"
    done = subprocess.run([str(build)], capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        sys.exit(f"{script}: {build} failed; pass {flag} BIN instead")
    return Path(done.stdout.strip().splitlines()[-1]) / binary


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    return value.strip()
    except OSError:
        pass
    return "unknown"


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, a hint that something else is running."""
    try:
        with open("/proc/loadavg", encoding="utf-8") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "unknown"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def median(values: list[float]) -> float:
    """The median, NaN for no values (a run that measured nothing)."""
    return statistics.median(values) if values else float("nan")


def get_json(port: int, path: str):
    """GET http://127.0.0.1:PORT/PATH as JSON."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return json.load(r)


def wait_healthy(port: int, timeout: float) -> bool:
    """Polls /health of the pod on PORT until it reports `ok`; False after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if get_json(port, "/health")["status"] == "ok":
                return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


def stop_process(proc: subprocess.Popen, timeout: float) -> bool:
    """SIGTERM, then SIGKILL after `timeout` s; True when it had to be killed."""
    if proc.poll() is not None:
        return False
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
        return False
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return True


def add_comparison_args(ap: argparse.ArgumentParser, tool: str) -> None:
    """The options of a pod-against-llama.cpp comparison: threads, model, pod's home, the pod
    binary, and the llama.cpp `tool` binary (`--TOOL`)."""
    ap.add_argument("--threads", type=int, default=2,
                    help=f"threads: {tool} -t, pod's RAYON_NUM_THREADS "
                         "and CANDLE_NUM_THREADS (default 2)")
    ap.add_argument("--model", default=DEFAULT_MODEL,
                    help="GGUF path or catalogue name under HOME/models "
                         f"(default {DEFAULT_MODEL})")
    ap.add_argument("--home", type=Path, default=default_home(),
                    help="pod state dir (default $POD_HOME, else ~/.local/share/pod)")
    ap.add_argument("--pod", type=Path, default=REPO / "target" / "release" / "pod",
                    help="pod binary (default target/release/pod)")
    ap.add_argument(f"--{tool}", type=Path,
                    help=f"{tool} binary (default: from bench/build-llama-cpp.sh)")
