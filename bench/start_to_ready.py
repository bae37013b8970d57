#!/usr/bin/env python3
r"""Start-to-ready time: seconds from spawning `pod start` to the first `GET /health` that
answers 200 (models loaded, API serving), with the profile's models already downloaded.

Every run starts the same binary with the same state directory (identity created by an
uncounted warm-up run, which also brings the binary and the model files into the page cache),
on 127.0.0.1 with any free API port, mesh on loopback and mDNS off. /health is polled every
5 ms. Between spawn and ready it also records when daemon.json appears (the API socket is bound:
the start-up cost before model loading). Each run ends with SIGTERM.

  python3 bench/start_to_ready.py [--pod target/debug/pod] [--runs 5] [--profile auto ...]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import stop_process  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 120.0


def default_pod() -> str:
    for profile in ("release", "debug"):
        path = ROOT / "target" / profile / "pod"
        if path.exists():
            return str(path)
    sys.exit("no target/{release,debug}/pod: build first, or pass --pod")


def default_models_dir() -> str:
    home = os.environ.get("POD_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pod")
    return os.path.join(home, "models")


def pod_cmd(pod: str, home: str, models_dir: str, *args: str) -> list[str]:
    return [pod, "--home", home, "--models-dir", models_dir, "--log", "warn", *args]


def ensure_models(pod: str, home: str, models_dir: str, profile: str) -> list[str]:
    """The profile's models, pulled first if missing (from `pod start --dry-run --json`)."""
    out = subprocess.run(pod_cmd(pod, home, models_dir, "start", "--profile", profile,
                                 "--dry-run", "--json"),
                         capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        sys.exit(out.stderr.strip())
    plan = json.loads(out.stdout)
    missing = [m["name"] for m in plan["models"] if not m["downloaded"]]
    if missing:
        print(f"pulling {', '.join(missing)}", file=sys.stderr)
        subprocess.run(pod_cmd(pod, home, models_dir, "models", "pull", *missing), check=True)
    return [plan["profile"]] + [m["name"] for m in plan["models"]]


def health(api: str) -> int:
    try:
        with urllib.request.urlopen(f"{api}/health", timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0


def one_run(pod: str, home: str, models_dir: str, profile: str) -> tuple[float, float]:
    """(seconds to API bound, seconds to /health 200)."""
    daemon_json = Path(home) / "daemon.json"
    daemon_json.unlink(missing_ok=True)
    cmd = pod_cmd(pod, home, models_dir, "start", "--profile", profile, "--api-port", "0",
                  "--no-mdns", "--listen", "/ip4/127.0.0.1/tcp/0", "--no-pull")
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    bound = None
    try:
        api = None
        while True:
            now = time.perf_counter()
            if now - started > TIMEOUT:
                raise RuntimeError(f"not ready within {TIMEOUT} s")
            if proc.poll() is not None:
                raise RuntimeError(f"pod exited: {proc.stderr.read().strip()}")
            if api is None and daemon_json.exists():
                try:
                    api = json.loads(daemon_json.read_text())["api"]
                    bound = now - started
                except (json.JSONDecodeError, KeyError):
                    pass  # written atomically, but be safe
            if api is not None and health(api) == 200:
                return bound, time.perf_counter() - started
            time.sleep(0.005)
    finally:
        stop_process(proc, 30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pod", default=None, help="the pod binary (default: target/release/pod, "
                    "else target/debug/pod)")
    ap.add_argument("--runs", type=int, default=5, help="measured runs per profile")
    ap.add_argument("--profile", action="append", help="profiles to measure (repeatable; "
                    "default: auto, what a plain `pod start` runs)")
    ap.add_argument("--models-dir", default=default_models_dir())
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args()
    pod = args.pod or default_pod()
    profiles = args.profile or ["auto"]

    rows = []
    with tempfile.TemporaryDirectory(prefix="pod-start-bench-") as home:
        for profile in profiles:
            resolved, *models = ensure_models(pod, home, args.models_dir, profile)
            one_run(pod, home, args.models_dir, profile)  # warm-up, not counted
            runs = [one_run(pod, home, args.models_dir, profile) for _ in range(args.runs)]
            ready = [r for _, r in runs]
            rows.append({
                "profile": profile if profile == resolved else f"{profile} ({resolved})",
                "models": models,
                "runs": len(runs),
                "api_bound_s": statistics.median(b for b, _ in runs),
                "ready_median_s": statistics.median(ready),
                "ready_min_s": min(ready),
                "ready_max_s": max(ready),
            })
    if args.json:
        print(json.dumps({"pod": pod, "results": rows}, indent=2))
        return
    print(f"pod: {pod}")
    print(f"{'profile':<18} {'models':<40} {'API bound':>10} {'ready (median)':>15} "
          f"{'min':>7} {'max':>7}")
    for r in rows:
        print(f"{r['profile']:<18} {', '.join(r['models']) or '-':<40} "
              f"{r['api_bound_s']:>9.3f}s {r['ready_median_s']:>14.3f}s "
              f"{r['ready_min_s']:>6.3f}s {r['ready_max_s']:>6.3f}s")
    print(f"(median of {rows[0]['runs'] if rows else 0} runs after one warm-up; "
          "goal: ready within 1 s)")


if __name__ == "__main__":
    main()
