"""Held-out metrics: intent top-1 accuracy, NDCG@10 (gain 2^rel - 1), popularity-only baseline."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits, axis=-1) == np.asarray(labels)))


def rank_order(scores: np.ndarray) -> np.ndarray:
    """Descending by score; ties keep candidate order (stable)."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")


def ndcg_at_k(scores: np.ndarray, rel: np.ndarray, k: int = 10) -> float | None:
    rel = np.asarray(rel, dtype=np.float64)
    gains = 2.0 ** rel - 1.0
    disc = 1.0 / np.log2(np.arange(2, k + 2))
    ideal = np.sort(gains)[::-1][:k]
    idcg = float((ideal * disc[: len(ideal)]).sum())
    if idcg <= 0:
        return None
    got = gains[rank_order(scores)][:k]
    return float((got * disc[: len(got)]).sum()) / idcg


def mean_ndcg(scores: Sequence[np.ndarray], rels: Sequence[Sequence[int]], k: int = 10) -> float:
    vals = [v for s, r in zip(scores, rels) if (v := ndcg_at_k(s, np.asarray(r), k)) is not None]
    return float(np.mean(vals)) if vals else 0.0


def popularity_baseline(queries: Sequence[dict], popularity: np.ndarray, k: int = 10) -> float:
    """NDCG@k of ranking each query's candidates by popularity alone."""
    return mean_ndcg([popularity[np.asarray(q["candidates"])] for q in queries],
                     [q["relevance"] for q in queries], k)
