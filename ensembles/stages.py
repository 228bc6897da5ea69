"""The numpy work of the search_ranking steps, batched over all requests of one execute call.
Both targets run it: the cpu target's two fused steps (`query_intent`, `ranker`) and the gpu
target's Python steps around the native ONNX/TensorRT models (`preprocess`, `feature_lookup`,
`postprocess`). Copied next to those model.py files with common.py, tokenizer.py and ranking.py.

Every function takes per-request arrays and returns per-request results; a request that is bad
raises BadRequest for itself only (its slot holds the exception).
"""
import numpy as np

import ranking
from common import BadRequest


class Rows:
    """The candidate rows of one execute call, deduped and looked up: one entry per request
    (None where that request failed), each with its rows' distinct ids, table positions and
    unknown counts; `positions()` pads them into one [R, Nmax] matrix."""

    def __init__(self, table, id_arrays, strict, max_candidates, duplicates_metric=None,
                 unknown_metric=None):
        self.per_request = []
        self.errors = {}
        self.table = table
        dup = unk = 0
        for i, arr in enumerate(id_arrays):
            try:
                if arr.ndim != 2:
                    raise BadRequest(f"CANDIDATE_IDS must be [batch, N], got shape {list(arr.shape)}")
                ranking.check_candidates(arr.shape[1], max_candidates)
                rows = []
                for row in arr:
                    ids = ranking.dedupe(row)
                    pos, unknown = table.positions(ids)
                    n_unknown = int(unknown.sum())
                    if strict and n_unknown:
                        raise BadRequest(ranking.unknown_message(ids, unknown))
                    rows.append((ids, pos, n_unknown))
                    dup += row.size - ids.size
                    unk += n_unknown
                self.per_request.append(rows)
            except ValueError as e:
                self.per_request.append(None)
                self.errors[i] = e
        if duplicates_metric is not None and dup:
            duplicates_metric.increment(dup)
        if unknown_metric is not None and unk:
            unknown_metric.increment(unk)

    def live(self):
        return [(i, rows) for i, rows in enumerate(self.per_request) if rows is not None]

    def positions(self):
        """[R, Nmax] table positions of every live row (padding: the cold-start row) and the
        list of (request index, first row, row count)."""
        spans, flat = [], []
        for i, rows in self.live():
            spans.append((i, len(flat), len(rows)))
            flat.extend(rows)
        if not flat:
            return np.zeros((0, 0), np.int64), spans, flat
        if len(flat) == 1:   # one row (the usual request): its positions as they are
            return flat[0][1][None, :], spans, flat
        n_max = max(len(r[0]) for r in flat)
        pos = np.full((len(flat), n_max), self.table.cold_start_row, dtype=np.int64)
        for j, (ids, p, _) in enumerate(flat):
            pos[j, : len(p)] = p
        return pos, spans, flat


PAD_ID = -1
PAD_SCORE = np.float32(np.finfo(np.float32).min)


def top_k(scores, rows, k):
    """Top-k of each row of one request: (TOP_IDS int64 [B,k'], TOP_SCORES float32 [B,k']) with
    k' = min(k, the longest row's distinct count); shorter rows are padded with id -1 and the
    lowest float32 (only possible with several rows of different distinct counts)."""
    kk = min(k, max(len(r[0]) for r in rows))
    if len(rows) == 1:
        ids, n = rows[0][0], len(rows[0][0])
        order = ranking.top_k_order(scores[0, :n], kk)
        return ids[order][None, :], np.ascontiguousarray(scores[0, order], dtype=np.float32)[None, :]
    top_ids = np.full((len(rows), kk), PAD_ID, dtype=np.int64)
    top_scores = np.full((len(rows), kk), PAD_SCORE, dtype=np.float32)
    for j, (ids, _, _) in enumerate(rows):
        n = len(ids)
        order = ranking.top_k_order(scores[j, :n], kk)
        top_ids[j, : len(order)] = ids[order]
        top_scores[j, : len(order)] = scores[j, order]
    return top_ids, top_scores


def unknown_counts(rows):
    return np.array([[r[2]] for r in rows], dtype=np.int32)


def intent_outputs(logits, intents):
    """softmax probabilities, the category name (object [R,1]) and its probability ([R,1])."""
    probs = ranking.softmax(logits)
    best = probs.argmax(axis=-1)
    # plain fancy indexing: take_along_axis builds index grids, several times the cost at [1, C]
    return probs, intents[best][:, None], probs[np.arange(len(best)), best][:, None]
