#!/usr/bin/env python3
r"""A model split across two pods (pipeline stages) against the same model whole in one pod.

All pods run on 127.0.0.1 from the same binary and model file: W holds the whole model (a mesh
of its own); T serves blocks 15-29 and H blocks 0-14 (H is the head: requests go to its API,
and its forward passes cross to T over /pod/stage/1.0.0). Each round sends the same greedy
streaming request from C concurrent clients (C = 1, then 8), alternating whole and split, so
that both see the same machine state. Reported: median time to first token, median
per-stream decode tokens/s, median aggregate tokens/s, the split/whole ratios, and each pod's
peak resident memory (VmHWM) after the runs.

Note that on one machine the two stages share its cores and memory bandwidth: the ratio
measures what the pipeline costs (the hop, the hidden states on the wire, the stage's work
done in turn), not what two machines gain.

  python3 bench/stages.py [--pod target/release/pod] [--rounds 5]
"""

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from api import request_body  # noqa: E402
from common import get_json  # noqa: E402
from mesh_hop import compare, start  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pod", default=str(ROOT / "target" / "release" / "pod"))
    ap.add_argument("--models-dir", default=str(Path(os.environ.get("POD_HOME", Path.home() / ".cache" / "pod")) / "models"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()

    w, w_port = start(args.pod, args.models_dir, "--profile", "inference", "--model", MODEL)
    t, t_port = start(args.pod, args.models_dir, "--profile", "inference", "--model", MODEL, "--layers", "15-29")
    node = get_json(t_port, "/pod/v1/node")
    t_addr = f"{node['listen_addrs'][0]}/p2p/{node['peer_id']}"
    h, h_port = start(args.pod, args.models_dir, "--profile", "inference", "--model", MODEL,
                      "--layers", "0-14", "--bootstrap", t_addr)
    procs = {"whole": w, "head 0-14": h, "stage 15-29": t}
    try:
        deadline = time.monotonic() + 30
        while not any(s.get("layers") == "15-29" for p in get_json(h_port, "/pod/v1/peers")["data"]
                      for s in p.get("stages", [])):
            if time.monotonic() > deadline:
                raise SystemExit("the head never saw the stage")
            time.sleep(0.2)
        body = request_body("pod", MODEL, args.max_tokens)
        print(f"pod {args.pod}, model {MODEL}, greedy, max_tokens {args.max_tokens}, {args.rounds} rounds, 127.0.0.1")
        compare(body, args.rounds, ("whole pod", w_port), ("2 stages", h_port))
        whole_rss = peak_rss_mib(w.pid)
        print()
        print("| pod | peak RSS MiB | of whole |")
        print("|---|---:|---:|")
        for name, p in procs.items():
            rss = peak_rss_mib(p.pid)
            print(f"| {name} | {rss:.0f} | {rss / whole_rss:.2f} |")
    finally:
        for p in procs.values():
            p.terminate()
            p.wait(timeout=20)


if __name__ == "__main__":
    main()
