#!/usr/bin/env python3
r"""Compare pod's inference engine with llama.cpp's llama-bench on one GGUF file.

Each round runs `llama-bench -r 1` once and `pod bench -r 1` once on the same
model with the same thread count, alternating which goes first, so that drift
in machine load hits both sides alike. For every run it records prompt
processing (ppN) and generation (tgN) speed in tokens/s, and the peak resident
set size of that very process (ru_maxrss from os.wait4 on the child).

  llama.cpp: llama-bench -m MODEL -p P -n N -t T -r 1 -o json
  pod:       RAYON_NUM_THREADS=T CANDLE_NUM_THREADS=T \
                 pod --home HOME bench --model MODEL -p P -n N -r 1 --json

Both tools do one unmeasured warm-up repetition of their own before the
measured one.

Prints a markdown table (medians over the rounds, pod/llama.cpp ratio,
min-max ranges) with the CPU model, thread count and round count; --json prints
the raw per-round numbers instead.

With --shape (tiny, llama-1b, llama-8b, qwen2-1.5b, ...) and --format (q4_0,
q8_0, q5_k, f16, bf16, q4_k_m, ...) instead of --model, both run on a random-weight model of
that shape written once by `pod models synthesize` under HOME/synthetic/:
speed at realistic sizes without a download.

Usage:
  bench/engine.py [--rounds 5] [--threads 2] [-p 128] [-n 128]
                  [--model NAME_OR_PATH | --shape SHAPE [--format FORMAT]]
                  [--home DIR] [--pod BIN] [--llama-bench BIN] [--json]

Python 3.11 standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_comparison_args, cpu_model, find_llama_cpp, resolve_model  # noqa: E402



def run_measured(cmd: list[str], env: dict[str, str]) -> tuple[str, int]:
    """Runs cmd; returns its stdout and its own peak RSS in bytes.

    stdout and stderr go to temporary files (no pipe to drain while waiting), and
    the child is reaped with os.wait4 so that the rusage is that of this process
    alone, not of all children so far.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode("utf-8", "replace")
        stderr = err.read().decode("utf-8", "replace")
    if proc.returncode != 0:
        tail = "\n".join(stderr.strip().splitlines()[-20:])
        sys.exit(
            f"engine.py: `{' '.join(cmd)}` exited with {proc.returncode}\n{tail}"
        )
    # ru_maxrss is in KiB on Linux.
    return stdout, usage.ru_maxrss * 1024


def run_llama(args, model: Path) -> dict:
    cmd = [
        str(args.llama_bench), "-m", str(model),
        "-p", str(args.p), "-n", str(args.n),
        "-t", str(args.threads), "-r", "1", "-o", "json",
    ]
    stdout, rss = run_measured(cmd, dict(os.environ))
    records = json.loads(stdout)
    pp = [r for r in records if r["n_prompt"] == args.p and r["n_gen"] == 0]
    tg = [r for r in records if r["n_prompt"] == 0 and r["n_gen"] == args.n]
    if len(pp) != 1 or len(tg) != 1:
        sys.exit(f"engine.py: unexpected llama-bench output:\n{stdout}")
    return {
        "pp_tps": pp[0]["avg_ts"],
        "tg_tps": tg[0]["avg_ts"],
        "peak_rss_bytes": rss,
        "build_number": pp[0].get("build_number"),
        "n_threads": pp[0].get("n_threads"),
    }


def run_pod(args, model: Path) -> dict:
    cmd = [
        str(args.pod), "--home", str(args.home), "bench",
        "--model", str(model), "-p", str(args.p), "-n", str(args.n),
        "-r", "1", "--json",
    ]
    env = dict(os.environ)
    env["RAYON_NUM_THREADS"] = str(args.threads)
    # candle reads CANDLE_NUM_THREADS first for its barrier pool and falls back to
    # RAYON_NUM_THREADS; set both so that a stray value in the caller's env is ignored.
    env["CANDLE_NUM_THREADS"] = str(args.threads)
    stdout, rss = run_measured(cmd, env)
    report = json.loads(stdout)
    if report["prompt_tokens"] != args.p or report["gen_tokens"] != args.n:
        sys.exit(f"engine.py: unexpected pod bench output:\n{stdout}")
    return {
        "pp_tps": report["pp_tps"][0],
        "tg_tps": report["tg_tps"][0],
        "peak_rss_bytes": rss,
        "load_seconds": report.get("load_seconds"),
    }


def summarize(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def fmt(x: float) -> str:
    return f"{x:.1f}"


def table(args, model: Path, runs: dict[str, list[dict]]) -> str:
    mib = 1024 * 1024
    rows = [
        (f"pp{args.p} (tokens/s)", "pp_tps", 1.0),
        (f"tg{args.n} (tokens/s)", "tg_tps", 1.0),
        ("peak RSS (MiB)", "peak_rss_bytes", 1.0 / mib),
    ]
    build = runs["llama.cpp"][0].get("build_number")
    lines = [
        f"model: {model.name} ({model.parent.name})",
        f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs)",
        f"threads: {args.threads}, rounds: {args.rounds}, "
        f"llama.cpp build: b{build}",
        "",
        "| | llama.cpp median | pod median | pod/llama.cpp "
        "| llama.cpp min–max | pod min–max |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, key, scale in rows:
        ll = summarize([r[key] * scale for r in runs["llama.cpp"]])
        pd = summarize([r[key] * scale for r in runs["pod"]])
        ratio = pd["median"] / ll["median"] if ll["median"] else float("nan")
        lines.append(
            f"| {label} | {fmt(ll['median'])} | {fmt(pd['median'])} | {ratio:.2f} "
            f"| {fmt(ll['min'])}–{fmt(ll['max'])} | {fmt(pd['min'])}–{fmt(pd['max'])} |"
        )
    lines += [
        "",
        "Ratios above 1 mean pod is faster (tokens/s) or uses more memory (RSS).",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(
        description="Benchmark pod's engine against llama.cpp's llama-bench."
    )
    ap.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    ap.add_argument("-p", type=int, default=128, help="prompt tokens (default 128)")
    ap.add_argument("-n", type=int, default=128, help="generated tokens (default 128)")
    add_comparison_args(ap, "llama-bench")
    ap.add_argument("--shape", help="a synthetic model of this shape instead of --model")
    ap.add_argument("--format", default="q4_k_m",
                    help="weight format of the synthetic model (default q4_k_m)")
    ap.add_argument("--json", action="store_true",
                    help="print the raw per-round numbers as JSON instead of the table")
    args = ap.parse_args()
    if args.rounds < 1 or args.threads < 1 or args.p < 1 or args.n < 1:
        ap.error("--rounds, --threads, -p and -n must be at least 1")

    args.home = args.home.expanduser()
    if not os.access(args.pod, os.X_OK):
        sys.exit(f"engine.py: no pod binary at {args.pod}; "
                 "build it with `cargo build --release --bin pod`")
    if args.shape:
        model = args.home / "synthetic" / f"{args.shape}-{args.format.lower()}.gguf"
        if not model.is_file():
            model.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(
                [str(args.pod), "--home", str(args.home), "models", "synthesize",
                 "--shape", args.shape, "--format", args.format, "--out", str(model)],
                check=True,
            )
    else:
        model = resolve_model(args.model, args.home, "engine.py")
    if args.llama_bench is None:
        args.llama_bench = find_llama_cpp("llama-bench", "engine.py", "--llama-bench")

    runners = {"llama.cpp": run_llama, "pod": run_pod}
    runs: dict[str, list[dict]] = {"llama.cpp": [], "pod": []}
    for i in range(args.rounds):
        order = ["llama.cpp", "pod"] if i % 2 == 0 else ["pod", "llama.cpp"]
        for name in order:
            r = runners[name](args, model)
            r["round"] = i + 1
            r["position"] = order.index(name)
            runs[name].append(r)
            print(
                f"round {i + 1}/{args.rounds} {name:9}: pp {r['pp_tps']:8.1f} t/s  "
                f"tg {r['tg_tps']:7.1f} t/s  peak RSS "
                f"{r['peak_rss_bytes'] / 1048576:6.1f} MiB",
                file=sys.stderr,
            )

    if args.json:
        json.dump(
            {
                "model": str(model),
                "cpu": cpu_model(),
                "threads": args.threads,
                "rounds": args.rounds,
                "prompt_tokens": args.p,
                "gen_tokens": args.n,
                "runs": runs,
            },
            sys.stdout,
            indent=2,
        )
        print()
    else:
        print(table(args, model, runs))


if __name__ == "__main__":
    main()
