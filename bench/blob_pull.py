#!/usr/bin/env python3
r"""Pull throughput of `pod models pull` from 1 and 2 storage pods on 127.0.0.1, against a plain
copy of the same file on the same disk.

Storage pods serve the shared model store (`--models-dir`); each pull goes into a fresh, empty
state directory, so every byte crosses the network and is verified chunk by chunk (which, with
the chained manifest, verifies the whole file). Chunks go over the storage pods' bulk
connections (plain TCP, opened with a ticket from the mesh), or with `--no-bulk` over mesh
streams (Noise + Yamux over TCP, or QUIC with `--transport quic`). Rounds alternate copy,
1 peer, 2 peers; medians are reported.

  python3 bench/blob_pull.py [--pod target/release/pod] [--rounds 3] [--transport tcp|quic]
                             [--no-bulk]
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import free_port, get_json, wait_healthy  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"


def storage_pod(pod: str, models_dir: str, transport: str) -> tuple[subprocess.Popen, str]:
    """A storage pod listening on TCP and QUIC; returns it and its `transport` address."""
    port = free_port()
    home = tempfile.mkdtemp(prefix="pod-bench-")
    proc = subprocess.Popen([pod, "--home", home, "--models-dir", models_dir, "--log", "warn", "start",
                             "--profile", "storage", "--api-port", str(port), "--no-mdns",
                             "--listen", "/ip4/127.0.0.1/tcp/0", "--listen", "/ip4/127.0.0.1/udp/0/quic-v1",
                             "--announce-interval", "1"],
                            stderr=subprocess.DEVNULL)
    kind = "/quic-v1" if transport == "quic" else "/tcp/"
    if wait_healthy(port, 60):
        node = get_json(port, "/pod/v1/node")
        addr = next(a for a in node["listen_addrs"] if kind in a)
        return proc, f"{addr}/p2p/{node['peer_id']}"
    proc.kill()
    raise SystemExit("storage pod did not start")


def pull(pod: str, addrs: list[str], bulk: bool = True) -> float:
    home = tempfile.mkdtemp(prefix="pod-bench-pull-")
    cmd = [pod, "--home", home, "--log", "warn", "models", "pull", MODEL]
    if not bulk:
        cmd.append("--no-bulk")
    for a in addrs:
        cmd += ["--bootstrap", a]
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - t
    if out.returncode != 0 or "(from peers)" not in out.stdout:
        raise SystemExit(f"pull failed: {out.stdout}{out.stderr}")
    if bulk != ("over a bulk connection" in out.stdout):
        raise SystemExit(f"bulk connections {'not ' if bulk else ''}used: {out.stdout}")
    shutil.rmtree(home)
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pod", default=str(ROOT / "target" / "release" / "pod"))
    ap.add_argument("--models-dir", default=str(Path(os.environ.get("POD_HOME", Path.home() / ".cache" / "pod")) / "models"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--transport", choices=["tcp", "quic"], default="tcp",
                    help="how the puller reaches the storage pods (both listen on both)")
    ap.add_argument("--no-bulk", action="store_true", help="pull over mesh streams only")
    args = ap.parse_args()
    source = Path(args.models_dir) / MODEL / "model.gguf"
    size = source.stat().st_size
    pods = [storage_pod(args.pod, args.models_dir, args.transport) for _ in range(2)]
    try:
        # Untimed: a storage pod may still be making a file's manifest just after it starts.
        for p in pods:
            pull(args.pod, [p[1]], not args.no_bulk)
        times = {"copy": [], "1 peer": [], "2 peers": []}
        for _ in range(args.rounds):
            dst = Path(tempfile.mkdtemp(prefix="pod-bench-copy-")) / "model.gguf"
            t = time.perf_counter()
            shutil.copyfile(source, dst)
            with open(dst, "rb+") as f:
                os.fsync(f.fileno())
            times["copy"].append(time.perf_counter() - t)
            shutil.rmtree(dst.parent)
            times["1 peer"].append(pull(args.pod, [pods[0][1]], not args.no_bulk))
            times["2 peers"].append(pull(args.pod, [pods[0][1], pods[1][1]], not args.no_bulk))
        copy = statistics.median(times["copy"])
        how = "mesh streams only" if args.no_bulk else "bulk connections"
        print(f"{MODEL}: {size / 1e6:.1f} MB, {args.rounds} rounds, medians, {args.transport}, {how}; pulls include starting pod, joining the mesh and verifying every chunk")
        print("| method | seconds | MB/s | vs copy |")
        print("|---|---:|---:|---:|")
        for k, v in times.items():
            m = statistics.median(v)
            print(f"| {k} | {m:.3f} | {size / 1e6 / m:.0f} | {copy / m:.2f} |")
    finally:
        for p, _ in pods:
            p.terminate()
            p.wait(timeout=20)


if __name__ == "__main__":
    main()
