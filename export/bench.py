"""onnxruntime latency/throughput of the exported models (FP32, INT8, distilled student) at
batch 1 and 64. `triton-hybrid export-bench` prints this table; the pipeline uses `measure` for the
speedups it records."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .artifacts import load_metadata
from .ort_session import session
from .tokenizer import Tokenizer


def measure(sess, feeds: dict[str, np.ndarray], repeats: int = 30, warmup: int = 3) -> float:
    """Median wall time of one `run`, in milliseconds."""
    for _ in range(warmup):
        sess.run(None, feeds)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1000.0)


def intent_feeds(ids: np.ndarray, mask: np.ndarray, batch: int) -> dict[str, np.ndarray]:
    reps = -(-batch // len(ids))
    return {"input_ids": np.tile(ids, (reps, 1))[:batch], "attention_mask": np.tile(mask, (reps, 1))[:batch]}


def ranker_feeds(emb_dim: int, num_intents: int, features: np.ndarray, batch: int, n_candidates: int,
                 seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = rng.random((batch, num_intents)).astype(np.float32)
    return {"query_embedding": rng.standard_normal((batch, emb_dim)).astype(np.float32),
            "intent_probs": p / p.sum(-1, keepdims=True),
            "item_features": features[rng.integers(0, len(features), (batch, n_candidates))]}


def speedup(base_path: Path, new_path: Path, feeds: dict[str, np.ndarray], repeats: int) -> dict:
    a, b = session(base_path), session(new_path)
    ta, tb = measure(a, feeds, repeats), measure(b, feeds, repeats)
    return {"base_ms": round(ta, 4), "new_ms": round(tb, 4), "speedup": round(ta / tb, 3),
            "batch": int(next(iter(feeds.values())).shape[0])}


def run_bench(export_dir: Path, batches=(1, 64), repeats: int = 50, n_candidates: int = 50,
              threads: int = 1) -> list[dict]:
    export_dir = Path(export_dir)
    meta = load_metadata(export_dir)
    tok = Tokenizer.load(export_dir / "tokenizer.json")
    held = json.loads((export_dir / "heldout_queries.json").read_text(encoding="utf-8"))
    ids, mask = tok.encode_batch([q["query"] for q in held[:256]])
    with np.load(export_dir / "item_features.npz") as z:
        features = z["features"]
    emb_dim = meta["models"]["ranker"]["inputs"][0]["shape"][1]
    num_intents = meta["models"]["ranker"]["inputs"][1]["shape"][1]
    rows: list[dict] = []
    models = [("query_intent", "fp32", "query_intent.onnx"), ("query_intent", "int8", "query_intent_int8.onnx"),
              ("query_intent", "student", "query_intent_student.onnx"), ("ranker", "fp32", "ranker.onnx"),
              ("ranker", "int8", "ranker_int8.onnx"), ("ranker", "student", "ranker_student.onnx")]
    for model, variant, fname in models:
        path = export_dir / fname
        if not path.exists():
            continue
        sess = session(path, threads)
        for b in batches:
            feeds = (intent_feeds(ids, mask, b) if model == "query_intent"
                     else ranker_feeds(emb_dim, num_intents, features, b, n_candidates))
            ms = measure(sess, feeds, repeats)
            rows.append({"model": model, "variant": variant, "file": fname, "batch": b, "threads": threads,
                         "candidates": None if model == "query_intent" else n_candidates,
                         "latency_ms": round(ms, 4), "throughput_per_s": round(b / ms * 1000.0, 1)})
    return rows
