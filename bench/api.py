#!/usr/bin/env python3
r"""Compare pod's OpenAI-compatible HTTP API with llama.cpp's llama-server.

Both servers run the same GGUF model on 127.0.0.1, one at a time: each round
starts pod, measures it, stops it, then does the same with llama-server, so the
two never compete for the CPU.

  pod:          RAYON_NUM_THREADS=T CANDLE_NUM_THREADS=T \
                    pod --home HOME start --profile inference --model MODEL \
                        --api-port PORT --max-batch 8 --prefix-cache 0 --no-pull
  llama-server: llama-server -m MODEL.gguf --host 127.0.0.1 --port PORT \
                    -t T -np 8 -c 16384          (8 slots of 2048 tokens)

After /health answers 200 and one unmeasured warm-up request, each
measurement sends the same streaming request from C concurrent clients
(C = 1, then 8), released together:

  POST /v1/chat/completions
  {"messages": [one fixed user prompt asking for a long story],
   "temperature": 0, "max_tokens": 128, "stream": true,
   "stream_options": {"include_usage": true}}

llama-server also gets "cache_prompt": false, so that it does not reuse the KV
cache of the identical prompt from the previous request, and pod runs with
--prefix-cache 0 for the same reason. Neither gets "ignore_eos": the prompt
makes the model write until max_tokens, and the number of tokens each stream
really produced is reported.

Per client:
  TTFT     request sent -> first chunk with non-empty delta.content
  decode   (completion_tokens - 1) / (first content -> finish_reason chunk),
           tokens/s of that one stream
  tokens   completion_tokens of the final usage chunk (the count of content
           deltas when a server sends no usage)
Per measurement:
  aggregate  sum of the clients' completion_tokens / wall time from release
             of the clients to the end of the last stream

Prints a markdown table of medians over all rounds (TTFT and decode over all
clients of all rounds, aggregate over rounds) with the pod/llama-server ratio,
plus the CPU model and round count; --json prints the raw numbers instead.

Usage:
  bench/api.py [--rounds 3] [--threads 2] [--max-tokens 128]
               [--model NAME_OR_PATH] [--home DIR] [--pod BIN]
               [--llama-server BIN] [--json]

Python 3.11 standard library only.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    add_comparison_args, cpu_model, find_llama_cpp, free_port, load_average, median, resolve_model,
    stop_process,
)

CONCURRENCY = (1, 8)
SLOTS = 8  # pod --max-batch and llama-server -np
SLOT_CONTEXT = 2048  # llama-server context per slot
PROMPT = (
    "Write a long, detailed story about a young dragon who wants to become a "
    "baker in a small mountain village. Describe the village, the villagers and "
    "every step of learning to bake bread. Do not stop early: the story should "
    "have at least six long paragraphs."
)
HTTP_TIMEOUT = 300.0
HEALTH_TIMEOUT = 300.0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Server:
    """One server process on 127.0.0.1:port, its output going to a temp file."""

    def __init__(self, name: str, cmd: list[str], port: int, env: dict[str, str]):
        self.name = name
        self.cmd = cmd
        self.port = port
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env,
            stdin=subprocess.DEVNULL,
        )

    def output_tail(self, lines: int = 30) -> str:
        self.log.flush()
        self.log.seek(0)
        text = self.log.read().decode("utf-8", "replace")
        return "\n".join(text.strip().splitlines()[-lines:])

    def fail(self, msg: str) -> None:
        raise RuntimeError(f"{self.name}: {msg}\n{self.output_tail()}")

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + HEALTH_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.fail(f"exited with code {self.proc.returncode} before it was ready")
            status, _ = request(self.port, "GET", "/health", timeout=5)
            if status == 200:
                return
            time.sleep(0.25)
        self.fail(f"no 200 from /health within {HEALTH_TIMEOUT:.0f} s")

    def model_id(self) -> str:
        status, body = request(self.port, "GET", "/v1/models", timeout=30)
        if status != 200:
            self.fail(f"GET /v1/models -> {status}")
        data = json.loads(body).get("data") or []
        chat = [m for m in data if m.get("kind", "chat") == "chat"]
        if not chat:
            self.fail(f"no chat model in /v1/models: {body[:500]!r}")
        return chat[0]["id"]

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 20 s."""
        if stop_process(self.proc, 20):
            log(f"{self.name} did not stop on SIGTERM within 20 s; killed it")
        self.log.close()


def request(port: int, method: str, path: str, timeout: float,
            body: dict | None = None) -> tuple[int | None, bytes]:
    """A plain request; (None, b"") when the server cannot be reached."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        data = json.dumps(body).encode("utf-8") if body is not None else None
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    except (OSError, http.client.HTTPException):
        return None, b""
    finally:
        conn.close()


def stream_chat(port: int, body: dict, barrier: threading.Barrier | None) -> dict:
    """One streaming chat completion; returns its timings and counts.

    The connection is opened before the barrier, so that all clients send their
    request at the same moment. Times are time.perf_counter() seconds.
    """
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=HTTP_TIMEOUT)
    try:
        conn.connect()
        payload = json.dumps(body).encode("utf-8")
        if barrier is not None:
            barrier.wait()
        t_sent = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", body=payload,
                     headers={"Content-Type": "application/json",
                              "Accept": "text/event-stream"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(
                f"POST /v1/chat/completions -> {resp.status}: "
                f"{resp.read()[:500].decode('utf-8', 'replace')}"
            )
        t_first = t_finish = t_last_delta = None
        deltas = 0
        usage = None
        finish_reason = None
        done = False
        while True:
            line = resp.readline()
            if not line:
                break
            now = time.perf_counter()
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"error in stream: {chunk['error']}")
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices") or []:
                content = (choice.get("delta") or {}).get("content")
                if content:
                    deltas += 1
                    t_last_delta = now
                    if t_first is None:
                        t_first = now
                if choice.get("finish_reason") and t_finish is None:
                    t_finish = now
                    finish_reason = choice["finish_reason"]
        t_end = time.perf_counter()
    finally:
        conn.close()
    if not done:
        raise RuntimeError("stream ended without data: [DONE]")
    if t_first is None:
        raise RuntimeError("stream had no content")
    if t_finish is None:
        t_finish = t_last_delta
    tokens = usage["completion_tokens"] if usage else deltas
    span = t_finish - t_first
    return {
        "ttft_ms": (t_first - t_sent) * 1000.0,
        "decode_tps": (tokens - 1) / span if tokens > 1 and span > 0 else None,
        "completion_tokens": tokens,
        "usage_reported": usage is not None,
        "prompt_tokens": usage.get("prompt_tokens") if usage else None,
        "content_deltas": deltas,
        "finish_reason": finish_reason,
        "t_sent": t_sent,
        "t_end": t_end,
    }


def run_batch(port: int, body: dict, clients: int) -> dict:
    """C concurrent clients, released together by a barrier."""
    results: list[dict | None] = [None] * clients
    errors: list[BaseException] = []
    barrier = threading.Barrier(clients + 1)

    def client(i: int) -> None:
        try:
            results[i] = stream_chat(port, body, barrier)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=client, args=(i,), daemon=True)
               for i in range(clients)]
    for t in threads:
        t.start()
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        pass
    t_start = time.perf_counter()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} of {clients} clients failed: {errors[0]!r}")
    t_end = max(r["t_end"] for r in results)
    wall = t_end - t_start
    total = sum(r["completion_tokens"] for r in results)
    for r in results:
        r.pop("t_sent")
        r.pop("t_end")
    return {
        "clients": clients,
        "wall_s": wall,
        "total_completion_tokens": total,
        "aggregate_tps": total / wall,
        "streams": results,
    }


def request_body(name: str, model_id: str, max_tokens: int) -> dict:
    body = {
        "model": model_id,
        "messages": [{"role": "user", "content": PROMPT}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if name == "llama-server":
        body["cache_prompt"] = False
    return body


def start_server(name: str, args, model: Path, port: int) -> Server:
    env = dict(os.environ)
    if name == "pod":
        # pod's engine threads: candle reads CANDLE_NUM_THREADS, then RAYON_NUM_THREADS.
        env["RAYON_NUM_THREADS"] = str(args.threads)
        env["CANDLE_NUM_THREADS"] = str(args.threads)
        cmd = [
            str(args.pod), "--home", str(args.home), "start",
            "--profile", "inference", "--model", args.pod_model,
            "--api-host", "127.0.0.1", "--api-port", str(port),
            "--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns",
            "--max-batch", str(SLOTS), "--prefix-cache", "0", "--no-pull", "--log", "warn",
        ]
    else:
        cmd = [
            str(args.llama_server), "-m", str(model),
            "--host", "127.0.0.1", "--port", str(port),
            "-t", str(args.threads), "-np", str(SLOTS),
            "-c", str(SLOTS * SLOT_CONTEXT),
        ]
    return Server(name, cmd, port, env)


def measure_server(name: str, args, model: Path, live: list[Server]) -> dict:
    port = free_port()
    server = start_server(name, args, model, port)
    live.append(server)
    try:
        t0 = time.perf_counter()
        server.wait_healthy()
        ready_s = time.perf_counter() - t0
        model_id = server.model_id()
        body = request_body(name, model_id, args.max_tokens)
        try:
            warm = stream_chat(port, body, None)
            batches = [run_batch(port, body, c) for c in CONCURRENCY]
        except RuntimeError as e:
            if server.proc.poll() is not None:
                e = f"exited with code {server.proc.returncode} during the run ({e})"
            server.fail(str(e))
        if server.proc.poll() is not None:
            server.fail(f"exited with code {server.proc.returncode} during the run")
    finally:
        server.stop()
        live.remove(server)
    return {
        "ready_s": ready_s,
        "model_id": model_id,
        "warmup_completion_tokens": warm["completion_tokens"],
        "batches": batches,
    }


def summarize(runs: list[dict]) -> dict[int, dict[str, float]]:
    """Medians per concurrency over all rounds."""
    out: dict[int, dict[str, float]] = {}
    for c in CONCURRENCY:
        batches = [b for r in runs for b in r["batches"] if b["clients"] == c]
        streams = [s for b in batches for s in b["streams"]]
        out[c] = {
            "ttft_ms": median([s["ttft_ms"] for s in streams]),
            "decode_tps": median([s["decode_tps"] for s in streams
                                  if s["decode_tps"] is not None]),
            "aggregate_tps": median([b["aggregate_tps"] for b in batches]),
            "completion_tokens": median([s["completion_tokens"] for s in streams]),
            "completion_tokens_min": min(s["completion_tokens"] for s in streams),
            "completion_tokens_max": max(s["completion_tokens"] for s in streams),
        }
    return out


def table(args, model: Path, runs: dict[str, list[dict]]) -> str:
    ll = summarize(runs["llama-server"])
    pd = summarize(runs["pod"])
    rows = [
        ("TTFT median (ms, lower is better)", "ttft_ms", "{:.0f}"),
        ("decode t/s per stream, median", "decode_tps", "{:.1f}"),
        ("aggregate t/s", "aggregate_tps", "{:.1f}"),
    ]
    lines = [
        f"model: {model.name} ({model.parent.name})",
        f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs)",
        f"threads: {args.threads}, rounds: {args.rounds}, max_tokens: "
        f"{args.max_tokens}, slots: {SLOTS}",
        f"load average before the run: {args.load_before}",
        "",
        "| clients | metric | llama-server | pod | pod/llama-server |",
        "|---:|---|---:|---:|---:|",
    ]
    for c in CONCURRENCY:
        for label, key, f in rows:
            a, b = ll[c][key], pd[c][key]
            ratio = b / a if a else float("nan")
            lines.append(f"| {c} | {label} | {f.format(a)} | {f.format(b)} | {ratio:.2f} |")
    lines.append("")
    lines.append(
        "Ratios above 1 mean pod is faster for t/s rows and slower for TTFT "
        "(lower TTFT is better)."
    )
    for c in CONCURRENCY:
        lt, pt = ll[c], pd[c]
        if (lt["completion_tokens_min"] != args.max_tokens
                or pt["completion_tokens_min"] != args.max_tokens):
            lines.append(
                f"Note: clients={c}: tokens per stream llama-server "
                f"{lt['completion_tokens_min']}–{lt['completion_tokens_max']}, pod "
                f"{pt['completion_tokens_min']}–{pt['completion_tokens_max']} "
                f"(max_tokens {args.max_tokens}); some streams stopped early."
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(
        description="Benchmark pod's HTTP API against llama.cpp's llama-server."
    )
    ap.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    ap.add_argument("--max-tokens", type=int, default=128,
                    help="max_tokens of each request (default 128)")
    add_comparison_args(ap, "llama-server")
    ap.add_argument("--json", action="store_true",
                    help="print the raw numbers as JSON instead of the table")
    args = ap.parse_args()
    if args.rounds < 1 or args.threads < 1 or args.max_tokens < 2:
        ap.error("--rounds and --threads must be at least 1, --max-tokens at least 2")
    if args.max_tokens >= SLOT_CONTEXT - 256:
        ap.error(f"--max-tokens must stay well below the {SLOT_CONTEXT}-token slot context")

    args.home = args.home.expanduser()
    model = resolve_model(args.model, args.home, "api.py")
    # pod takes a catalogue name or a path; a name keeps its catalogue settings.
    catalogued = args.home / "models" / args.model / "model.gguf"
    args.pod_model = args.model if catalogued.is_file() and not Path(
        args.model).expanduser().is_file() else str(model)
    if not os.access(args.pod, os.X_OK):
        sys.exit(f"api.py: no pod binary at {args.pod}; "
                 "build it with `cargo build --release --bin pod`")
    if args.llama_server is None:
        args.llama_server = find_llama_cpp("llama-server", "api.py", "--llama-server")
    if not os.access(args.llama_server, os.X_OK):
        sys.exit(f"api.py: no llama-server binary at {args.llama_server}")

    # SIGTERM/SIGHUP end the script through the finally below, like ctrl-c.
    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    args.load_before = load_average()
    live: list[Server] = []
    runs: dict[str, list[dict]] = {"llama-server": [], "pod": []}
    try:
        for i in range(args.rounds):
            for name in ("pod", "llama-server"):
                r = measure_server(name, args, model, live)
                r["round"] = i + 1
                runs[name].append(r)
                parts = []
                for b in r["batches"]:
                    s = b["streams"]
                    parts.append(
                        f"c={b['clients']}: TTFT {median([x['ttft_ms'] for x in s]):6.0f} ms, "
                        f"decode {median([x['decode_tps'] or 0 for x in s]):6.1f} t/s, "
                        f"aggregate {b['aggregate_tps']:6.1f} t/s, "
                        f"tokens {sum(x['completion_tokens'] for x in s)}"
                    )
                log(f"round {i + 1}/{args.rounds} {name:12}: " + "; ".join(parts))
    except RuntimeError as e:
        sys.exit(f"api.py: {e}")
    finally:
        for server in list(live):
            server.stop()

    if args.json:
        json.dump(
            {
                "model": str(model),
                "cpu": cpu_model(),
                "threads": args.threads,
                "rounds": args.rounds,
                "max_tokens": args.max_tokens,
                "slots": SLOTS,
                "load_average_before": args.load_before,
                "prompt": PROMPT,
                "commands": {
                    "pod": "pod --home HOME start --profile inference --model "
                           f"{args.pod_model} --api-port PORT --max-batch {SLOTS} --prefix-cache 0 "
                           f"--no-pull (RAYON_NUM_THREADS={args.threads})",
                    "llama-server": f"llama-server -m {model.name} --host 127.0.0.1 "
                                    f"--port PORT -t {args.threads} -np {SLOTS} "
                                    f"-c {SLOTS * SLOT_CONTEXT}",
                },
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
