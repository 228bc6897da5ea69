"""Ranking semantics of one search request, in numpy only: what the in-process reference
(`export.reference`) and the Triton ensemble's ranking step both do with a candidate list.

This file is copied into the Triton model repository next to the ranking step's model.py (like
tokenizer.py), so it depends on numpy and the standard library only.

- Duplicate candidate ids are ranked once, at their first position (ties keep that order).
- A candidate id that is not in the feature table (an item newer than the snapshot) is ranked with
  the cold-start feature row: all zeros = no leaf, brand, colour, material or size one-hot, the
  catalog's mean (standardized 0) log-price and log-popularity, popularity percentile 0. It is
  counted (`unknown`); in strict mode it fails the request instead.
- top-k: highest score first, ties by candidate order, k = min(top_k, number of distinct ids).
"""
from __future__ import annotations

import numpy as np


class RankingError(ValueError):
    """A request the ranking step refuses (a bad request, never a server fault)."""


def softmax(logits: np.ndarray) -> np.ndarray:
    """float32 softmax over the last axis, max-subtracted; in place on one temporary (no dtype
    round trips: on float32 logits every step is already float32)."""
    x = np.asarray(logits, dtype=np.float32)
    e = np.subtract(x, x.max(axis=-1, keepdims=True))
    np.exp(e, out=e)
    e /= e.sum(axis=-1, keepdims=True, dtype=np.float32)
    return e


def dedupe(ids: np.ndarray) -> np.ndarray:
    """The distinct ids of a 1-d array in first-occurrence order."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids.size < 2:
        return ids
    s = np.sort(ids)
    if not (s[1:] == s[:-1]).any():   # the usual case, without np.unique's bookkeeping
        return ids
    _, first = np.unique(ids, return_index=True)
    return ids[np.sort(first)]


class FeatureTable:
    """item id -> feature row, with the cold-start row for ids it does not know."""

    def __init__(self, item_ids: np.ndarray, features: np.ndarray):
        ids = np.asarray(item_ids, dtype=np.int64)
        order = np.argsort(ids, kind="stable")
        self.sorted_ids = ids[order]
        # One extra row at the end: the cold-start defaults, gathered like any other row.
        feats = np.asarray(features, dtype=np.float32)[order]
        self.rows = np.ascontiguousarray(np.vstack([feats, np.zeros((1, feats.shape[1]), np.float32)]))
        self.cold_start_row = len(ids)

    @classmethod
    def load(cls, npz_path) -> "FeatureTable":
        with np.load(npz_path, allow_pickle=False) as z:
            return cls(z["item_ids"], z["features"])

    @property
    def feature_dim(self) -> int:
        return int(self.rows.shape[1])

    def positions(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row index of each id in `rows`, mask of the unknown ids)."""
        pos = np.searchsorted(self.sorted_ids, ids)
        np.minimum(pos, len(self.sorted_ids) - 1, out=pos)
        unknown = self.sorted_ids[pos] != ids
        pos[unknown] = self.cold_start_row
        return pos, unknown

    def lookup(self, ids) -> tuple[np.ndarray, np.ndarray]:
        """[N] ids -> ([N, F] features, [N] unknown mask)."""
        pos, unknown = self.positions(np.asarray(ids, dtype=np.int64).reshape(-1))
        return self.rows[pos], unknown


def unknown_message(ids: np.ndarray, unknown: np.ndarray) -> str:
    bad = ids[unknown]
    shown = ", ".join(str(int(x)) for x in bad[:5]) + (", ..." if len(bad) > 5 else "")
    return f"{len(bad)} unknown candidate id(s): {shown} (strict mode)"


def check_candidates(n: int, max_candidates: int) -> None:
    if n == 0:
        raise RankingError("CANDIDATE_IDS is empty")
    if n > max_candidates:
        raise RankingError(f"{n} candidates; the maximum is {max_candidates}")


def check_top_k(k: int, max_top_k: int) -> int:
    if k < 1:
        raise RankingError(f"top_k must be at least 1, got {k}")
    if k > max_top_k:
        raise RankingError(f"top_k is {k}; the maximum is {max_top_k}")
    return k


def top_k_order(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k best of a 1-d score array: highest first, ties by position."""
    return np.argsort(-scores, kind="stable")[:k]
