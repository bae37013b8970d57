"""Fixtures for multi-process end-to-end tests: real `pod` processes on 127.0.0.1."""

import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHAT = "smollm2-135m-instruct"
EMBED = "all-minilm-l6-v2"


def pod_binary() -> str:
    return os.environ.get("POD_BIN", str(ROOT / "target" / "debug" / "pod"))


def pod_home() -> str:
    return os.environ.get("POD_HOME", str(Path.home() / ".cache" / "pod"))


# Tests keep the mesh on loopback, on free ports, and off mDNS (which would join every pod
# running on the machine).
MESH_ON_LOOPBACK = ["--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns"]


def pod_command(home: str) -> list[str]:
    return [pod_binary(), "--home", home, "--models-dir", str(Path(pod_home()) / "models")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Pod:
    """A running `pod start` process."""

    def __init__(self, *extra: str, models=(CHAT, EMBED)):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="pod-e2e-", suffix=".log", delete=False)
        # Each pod gets its own state directory (identity) and shares the verified models.
        self.home = tempfile.mkdtemp(prefix="pod-e2e-home-")
        cmd = [*pod_command(self.home), "start", "--api-port", str(self.port),
               *MESH_ON_LOOPBACK, *[a for m in models for a in ("--model", m)], *extra]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        self.wait_ready(timeout=120)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pod exited with {self.proc.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"pod not ready after {timeout}s:\n{self.output()}")

    def get(self, path: str):
        with urllib.request.urlopen(self.base + path, timeout=10) as r:
            return json.load(r)

    @property
    def peer_id(self) -> str:
        return self.get("/pod/v1/node")["peer_id"]

    def p2p_addr(self) -> str:
        """The pod's mesh address on loopback, with its PeerId."""
        node = self.get("/pod/v1/node")
        return f"{node['listen_addrs'][0]}/p2p/{node['peer_id']}"

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def stop(self, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode


@pytest.fixture(scope="module")
def pod():
    p = Pod()
    yield p
    p.stop()
