"""In-process reference of the serving pipeline (tokenizer -> query_intent.onnx -> softmax ->
feature lookup -> ranker.onnx -> top-k), in plain numpy + onnxruntime. The Triton ensemble is
tested for equality against this. The ranking semantics (duplicates ranked once, unknown ids
ranked with cold-start features and counted, or refused in strict mode) are `export.ranking`'s,
the same file the ensemble's ranking step runs.

A variant (INT8, the distilled student) is served from other ONNX files of the same export:
`ReferencePipeline(dir, query_model="query_intent_student.onnx", ranker_model="ranker_student.onnx")`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .artifacts import load_metadata
from .ort_session import session
from .ranking import (
    FeatureTable,
    RankingError,
    dedupe,
    softmax,
    top_k_order,
    unknown_message,
)
from .tokenizer import Tokenizer

__all__ = ["ReferencePipeline", "Ranking", "softmax"]


class Ranking(NamedTuple):
    ids: np.ndarray          # int64 [k]
    scores: np.ndarray       # float32 [k]
    intent: str
    intent_score: float
    unknown: int             # distinct candidate ids not in the feature table (ranked with cold-start features)


class ReferencePipeline:
    def __init__(self, export_dir: Path | str, verify: bool = True, query_model: str = "query_intent.onnx",
                 ranker_model: str = "ranker.onnx", strict: bool = False):
        self.dir = Path(export_dir)
        self.metadata = load_metadata(self.dir, verify=verify)
        self.tokenizer = Tokenizer.load(self.dir / "tokenizer.json")
        self.intents: list[str] = json.loads((self.dir / "intents.json").read_text(encoding="utf-8"))
        self.table = FeatureTable.load(self.dir / "item_features.npz")
        self.strict = strict
        self._qi = session(self.dir / query_model)
        self._rk = session(self.dir / ranker_model)

    def lookup(self, candidate_ids) -> np.ndarray:
        """[N] item ids -> [N, feat_dim] features; unknown ids get the cold-start row (strict: ValueError)."""
        ids = np.asarray(candidate_ids, dtype=np.int64).reshape(-1)
        feats, unknown = self.table.lookup(ids)
        if self.strict and unknown.any():
            raise RankingError(unknown_message(ids, unknown))
        return feats

    def query(self, query: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> intent_logits [1, C], query_embedding [1, E], intent_probs [1, C]."""
        ids, mask = self.tokenizer.encode_batch([query])
        logits, emb = self._qi.run(["intent_logits", "query_embedding"], {"input_ids": ids, "attention_mask": mask})
        return logits, emb, softmax(logits)

    def ranking(self, query: str, candidate_ids, top_k: int) -> Ranking:
        ids = dedupe(np.asarray(candidate_ids, dtype=np.int64))
        if ids.size == 0:
            raise RankingError("no candidate ids given")
        if int(top_k) < 1:
            raise RankingError(f"top_k must be >= 1, got {top_k}")
        feats, unknown = self.table.lookup(ids)
        if self.strict and unknown.any():
            raise RankingError(unknown_message(ids, unknown))
        _, emb, probs = self.query(query)
        scores = self._rk.run(["scores"], {"query_embedding": emb, "intent_probs": probs,
                                           "item_features": feats[None]})[0][0]
        order = top_k_order(scores, int(top_k))
        best = int(np.argmax(probs[0]))
        return Ranking(ids[order], scores[order].astype(np.float32), self.intents[best], float(probs[0, best]),
                       int(unknown.sum()))

    def rank(self, query: str, candidate_ids, top_k: int):
        """-> (top_ids int64 [k], top_scores float32 [k], intent_name, intent_score)."""
        return tuple(self.ranking(query, candidate_ids, top_k)[:4])
