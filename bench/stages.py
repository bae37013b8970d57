#!/usr/bin/env python3
r"""A model split across two pods (pipeline stages) against the same model whole in one pod.

All pods run on 127.0.0.1 from the same binary and model file: W holds the whole model (a mesh
of its own); T serves the second half of its blocks and H the first half (15-29 and 0-14 of
SmolLM2-135M; H is the head: requests go to its API, and its forward passes cross to T over
/pod/stage/1.0.0). Each round sends the same greedy
streaming request from C concurrent clients (C = 1, then 8), alternating whole and split, so
that both see the same machine state. Reported: median time to first token, median
per-stream decode tokens/s, median aggregate tokens/s, the split/whole ratios, and each pod's
peak resident memory (VmHWM) after the runs.

Note that on one machine the two stages share its cores and memory bandwidth: the ratio
measures what the pipeline costs (the hop, the hidden states on the wire, the stage's work
done in turn), not what two machines gain.

With --shape (llama-1b, llama-8b, qwen2-1.5b, ...) and --format (default q4_k_m) instead of
the catalogued SmolLM2, all three run a random-weight model of that shape, written once by
`pod models synthesize` under HOME/synthetic/: the pipeline at a realistic size without a
download. (Random weights ramble on to max_tokens, which is what a speed test wants.)

With --llama-rpc DIR (a llama.cpp build with -DGGML_RPC=ON holding ggml-rpc-server and
llama-bench), it also runs llama.cpp's RPC backend on the same file: llama-bench decoding alone
on the CPU, then with the second half of the blocks offloaded to a ggml-rpc-server on
127.0.0.1 (-ngl half), and reports single-stream decode t/s beside pod's whole and 2-stage
figures (llama-bench decodes in-process; pod's figures are streamed through its API).

  python3 bench/stages.py [--pod target/release/pod] [--rounds 5]
                          [--shape llama-1b [--format q4_k_m] [--home ~/.cache/pod]]
                          [--llama-rpc DIR] [--threads 2]
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from api import request_body  # noqa: E402
from common import free_port, get_json  # noqa: E402
from mesh_hop import compare, start  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def synthetic_model(pod: str, home: Path, shape: str, fmt: str) -> Path:
    """The random-weight model of `shape` in `fmt`, written by `pod models synthesize` once."""
    model = home / "synthetic" / f"{shape}-{fmt.lower()}.gguf"
    if not model.is_file():
        model.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([pod, "--home", str(home), "models", "synthesize", "--shape", shape,
                        "--format", fmt, "--out", str(model)], check=True)
    return model


def block_count(pod: str, models_dir: str, model: str) -> int:
    """The model's blocks, from what `pod start --dry-run --layers auto` would size."""
    out = subprocess.run([pod, "--models-dir", models_dir, "start", "--dry-run", "--json",
                          "--model", model, "--layers", "auto", "--max-memory", "64GiB"],
                         check=True, capture_output=True, text=True).stdout
    return len(json.loads(out)["auto_layers"]["sizes"]["blocks"])


def llama_rpc(bin_dir: Path, model: str, total: int, args) -> tuple[float, float]:
    """llama-bench's single-stream decode t/s on the CPU alone, then with the last half of the
    blocks on a ggml-rpc-server on 127.0.0.1."""
    def bench(*extra: str) -> float:
        out = subprocess.run([str(bin_dir / "llama-bench"), "-m", model, "-p", "0",
                              "-n", str(args.max_tokens), "-r", str(args.rounds),
                              "-t", str(args.threads), "-o", "json", *extra],
                             check=True, capture_output=True, text=True).stdout
        return json.loads(out)[0]["avg_ts"]
    alone = bench("-ngl", "0")
    port = free_port()
    server = subprocess.Popen([str(bin_dir / "ggml-rpc-server"), "-H", "127.0.0.1", "-p", str(port),
                               "-t", str(args.threads)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1)
        split = bench("--rpc", f"127.0.0.1:{port}", "-ngl", str(total - total // 2))
    finally:
        server.terminate()
        server.wait(timeout=20)
    return alone, split


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pod", default=str(ROOT / "target" / "release" / "pod"))
    ap.add_argument("--models-dir", default=str(Path(os.environ.get("POD_HOME", Path.home() / ".cache" / "pod")) / "models"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--shape", help="a synthetic model of this shape instead of SmolLM2")
    ap.add_argument("--format", default="q4_k_m", help="weight format of the synthetic model")
    ap.add_argument("--home", type=Path,
                    default=Path(os.environ.get("POD_HOME", Path.home() / ".cache" / "pod")),
                    help="where synthetic models are kept (under synthetic/)")
    ap.add_argument("--llama-rpc", type=Path, help="a llama.cpp build directory with ggml-rpc-server")
    ap.add_argument("--threads", type=int, default=2, help="llama-bench and ggml-rpc-server threads")
    args = ap.parse_args()

    model = str(synthetic_model(args.pod, args.home.expanduser(), args.shape, args.format)) \
        if args.shape else MODEL
    total = block_count(args.pod, args.models_dir, model)
    half = total // 2
    head_blocks, tail_blocks = f"0-{half - 1}", f"{half}-{total - 1}"

    w, w_port = start(args.pod, args.models_dir, "--profile", "inference", "--model", model)
    t, t_port = start(args.pod, args.models_dir, "--profile", "inference", "--model", model,
                      "--layers", tail_blocks)
    node = get_json(t_port, "/pod/v1/node")
    t_addr = f"{node['listen_addrs'][0]}/p2p/{node['peer_id']}"
    h, h_port = start(args.pod, args.models_dir, "--profile", "inference", "--model", model,
                      "--layers", head_blocks, "--bootstrap", t_addr)
    procs = {"whole": w, f"head {head_blocks}": h, f"stage {tail_blocks}": t}
    try:
        deadline = time.monotonic() + 30
        while not any(s.get("layers") == tail_blocks for p in get_json(h_port, "/pod/v1/peers")["data"]
                      for s in p.get("stages", [])):
            if time.monotonic() > deadline:
                raise SystemExit("the head never saw the stage")
            time.sleep(0.2)
        model_id = get_json(w_port, "/v1/models")["data"][0]["id"]
        body = request_body("pod", model_id, args.max_tokens)
        print(f"pod {args.pod}, model {model_id} ({total} blocks, split {head_blocks} + {tail_blocks}), "
              f"greedy, max_tokens {args.max_tokens}, {args.rounds} rounds, 127.0.0.1, "
              f"{os.cpu_count()} CPUs")
        medians = compare(body, args.rounds, ("whole pod", w_port), ("2 stages", h_port))
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
    if args.llama_rpc:
        alone, split = llama_rpc(args.llama_rpc, model if args.shape else
                                 str(Path(args.models_dir) / MODEL / "model.gguf"), total, args)
        pod_whole, pod_split = medians[("whole pod", 1, "decode_tps")], medians[("2 stages", 1, "decode_tps")]
        print()
        print("| single-stream decode t/s | whole | 2 halves | halves/whole |")
        print("|---|---:|---:|---:|")
        print(f"| llama.cpp (CPU; RPC) | {alone:.1f} | {split:.1f} | {split / alone:.3f} |")
        print(f"| pod (pod; 2 stages) | {pod_whole:.1f} | {pod_split:.1f} | {pod_split / pod_whole:.3f} |")
        print(f"| pod / llama.cpp | {pod_whole / alone:.3f} | {pod_split / split:.3f} | |")


if __name__ == "__main__":
    main()
