"""In-process reference of the serving pipeline (tokenizer -> query_intent.onnx -> softmax ->
feature lookup -> ranker.onnx -> top-k), in plain numpy + onnxruntime. The Triton ensemble is
tested for equality against this."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .artifacts import load_metadata
from .tokenizer import Tokenizer


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float32) - logits.max(axis=-1, keepdims=True).astype(np.float32)
    e = np.exp(z, dtype=np.float32)
    return (e / e.sum(axis=-1, keepdims=True, dtype=np.float32)).astype(np.float32)


class ReferencePipeline:
    def __init__(self, export_dir: Path | str, verify: bool = True):
        self.dir = Path(export_dir)
        self.metadata = load_metadata(self.dir, verify=verify)
        self.tokenizer = Tokenizer.load(self.dir / "tokenizer.json")
        self.intents: list[str] = json.loads((self.dir / "intents.json").read_text(encoding="utf-8"))
        with np.load(self.dir / "item_features.npz", allow_pickle=False) as z:
            ids = z["item_ids"].astype(np.int64)
            feats = z["features"].astype(np.float32)
        order = np.argsort(ids, kind="stable")
        self._sorted_ids, self._features = ids[order], feats[order]
        so = ort.SessionOptions()
        so.log_severity_level = 3
        self._qi = ort.InferenceSession(str(self.dir / "query_intent.onnx"), so, providers=["CPUExecutionProvider"])
        self._rk = ort.InferenceSession(str(self.dir / "ranker.onnx"), so, providers=["CPUExecutionProvider"])

    def lookup(self, candidate_ids) -> np.ndarray:
        """[N] item ids -> [N, feat_dim] features; unknown ids raise ValueError."""
        ids = np.asarray(candidate_ids, dtype=np.int64).reshape(-1)
        pos = np.searchsorted(self._sorted_ids, ids)
        pos_c = np.minimum(pos, len(self._sorted_ids) - 1)
        unknown = self._sorted_ids[pos_c] != ids
        if unknown.any():
            raise ValueError(f"unknown candidate item ids: {ids[unknown][:10].tolist()}")
        return self._features[pos_c]

    def query(self, query: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> intent_logits [1, C], query_embedding [1, E], intent_probs [1, C]."""
        ids, mask = self.tokenizer.encode_batch([query])
        logits, emb = self._qi.run(["intent_logits", "query_embedding"], {"input_ids": ids, "attention_mask": mask})
        return logits, emb, softmax(logits)

    def rank(self, query: str, candidate_ids, top_k: int):
        """-> (top_ids int64 [k], top_scores float32 [k], intent_name, intent_score)."""
        ids = np.asarray(candidate_ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise ValueError("no candidate ids given")
        if int(top_k) < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        feats = self.lookup(ids)
        _, emb, probs = self.query(query)
        scores = self._rk.run(["scores"], {"query_embedding": emb, "intent_probs": probs,
                                           "item_features": feats[None]})[0][0]
        order = np.argsort(-scores, kind="stable")[: int(top_k)]
        best = int(np.argmax(probs[0]))
        return ids[order], scores[order].astype(np.float32), self.intents[best], float(probs[0, best])
