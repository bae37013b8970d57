#!/usr/bin/env python3
r"""The cost of one mesh hop: a chat stream served by pod A directly, against the same stream
sent to pod B (relay profile, no models), which forwards it over /pod/infer/1.0.0 to A.

Both pods run on 127.0.0.1 from the same binary; A holds the model, B bootstraps from A.
Each round sends the same greedy streaming request (max_tokens 64) from C concurrent clients
(C = 1, then 8), alternating direct and routed, so that both see the same machine state.
Reported: median time to first token, median per-stream decode tokens/s and median aggregate
tokens/s over all rounds, and routed/direct ratios.

  python3 bench/mesh_hop.py [--pod target/release/pod] [--rounds 5]
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from api import request_body, run_batch  # noqa: E402
from common import free_port, get_json, median, wait_healthy  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"
CONCURRENCY = (1, 8)


def start(pod: str, models_dir: str, *args: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    home = tempfile.mkdtemp(prefix="pod-bench-")
    cmd = [pod, "--home", home, "--models-dir", models_dir, "--log", "warn", "start",
           "--api-port", str(port), "--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns",
           "--announce-interval", "1", *args]
    log = open(Path(home) / "pod.log", "wb")
    proc = subprocess.Popen(cmd, stderr=log)
    print(f"pod {' '.join(args)}: log in {log.name}", file=sys.stderr)
    if wait_healthy(port, 120):
        return proc, port
    proc.kill()
    raise SystemExit(f"pod on port {port} did not become ready")


def compare(body: dict, rounds: int, first: tuple[str, int], second: tuple[str, int]) -> dict:
    """Sends `body` to two pods' APIs, alternating, from 1 and then 8 concurrent clients for
    `rounds` rounds after a warm-up, and prints a table of medians with second/first ratios.
    Returns the medians, keyed by (route name, clients, metric)."""
    routes = (first, second)
    for _, port in routes:  # warm-up
        run_batch(port, body, 1)
    results = {(name, c): [] for name, _ in routes for c in CONCURRENCY}
    for _ in range(rounds):
        for c in CONCURRENCY:
            for name, port in routes:
                results[(name, c)].append(run_batch(port, body, c))
    medians = {}
    print(f"| clients | metric | {first[0]} | {second[0]} | ratio |")
    print("|---:|---|---:|---:|---:|")
    for c in CONCURRENCY:
        def stat(name, key):
            batches = results[(name, c)]
            if key == "aggregate_tps":
                return median([b[key] for b in batches])
            return median([s[key] for b in batches for s in b["streams"] if s[key] is not None])
        for key, label in (("ttft_ms", "TTFT ms (p50)"), ("decode_tps", "decode t/s per stream (p50)"),
                           ("aggregate_tps", "aggregate t/s")):
            d, r = stat(first[0], key), stat(second[0], key)
            medians[(first[0], c, key)], medians[(second[0], c, key)] = d, r
            extra = f" ({r - d:+.1f} ms)" if key == "ttft_ms" else ""
            print(f"| {c} | {label} | {d:.1f} | {r:.1f}{extra} | {r / d:.3f} |")
    return medians


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pod", default=str(ROOT / "target" / "release" / "pod"))
    ap.add_argument("--models-dir", default=str(Path(os.environ.get("POD_HOME", Path.home() / ".cache" / "pod")) / "models"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()

    a, a_port = start(args.pod, args.models_dir, "--profile", "inference", "--model", MODEL)
    node = get_json(a_port, "/pod/v1/node")
    a_addr = f"{node['listen_addrs'][0]}/p2p/{node['peer_id']}"
    b, b_port = start(args.pod, args.models_dir, "--profile", "relay", "--bootstrap", a_addr)
    try:
        deadline = time.monotonic() + 30
        while MODEL not in {m["id"] for m in get_json(b_port, "/v1/models")["data"]}:
            if time.monotonic() > deadline:
                raise SystemExit("the relay never saw the model")
            time.sleep(0.2)
        body = request_body("pod", MODEL, args.max_tokens)
        print(f"pod {args.pod}, model {MODEL}, greedy, max_tokens {args.max_tokens}, {args.rounds} rounds, 127.0.0.1")
        compare(body, args.rounds, ("direct", a_port), ("via relay", b_port))
    finally:
        for p in (b, a):
            p.terminate()
            p.wait(timeout=20)


if __name__ == "__main__":
    main()
