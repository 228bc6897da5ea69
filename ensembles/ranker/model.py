"""cpu target, ensemble step `ranker`: the whole candidate side in one Python-backend model.

CANDIDATE_IDS (INT64 [B,N]) + query_embedding (FP32 [B,D]) + intent_probs (FP32 [B,C]) + optional
TOP_K (INT32 [B,1]) -> dedupe (first occurrence) -> feature lookup (item_features.npz; unknown ids
get the cold-start row and are counted, or fail the request in strict mode) -> ranker ONNX graph
(model.onnx, onnxruntime) -> top-k: TOP_IDS (INT64 [B,k]), TOP_SCORES (FP32 [B,k]), UNKNOWN_COUNT
(INT32 [B,1]). All candidate rows of one execute call are scored in one onnxruntime batch
(padded to the longest row; candidates are scored independently, padding is dropped).
Semantics: ranking.py (the file export.reference runs too). Limits from the config parameters.
"""
import os
import sys

# The wheel's stub embeds the system libpython, which ignores PYTHONPATH; this dir holds common.py & co.
sys.path[:0] = [p for p in [os.path.dirname(os.path.abspath(__file__)), *os.environ.get("PYTHONPATH", "").split(os.pathsep)] if p and p not in sys.path]

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

import ranking  # noqa: E402
import stages  # noqa: E402
from common import Step, candidate_counters, error_response, flag, onnx_graph, request_inputs, request_top_k  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


class TritonPythonModel(Step, name="ranker"):
    def setup(self, params, args):
        self.max_candidates = int(params.get("max_candidates", "1000"))
        self.max_top_k = int(params.get("max_top_k", "1000"))
        self.top_k_default = int(params.get("top_k_default", "10"))
        self.strict = flag(params, "strict_unknown_ids")
        self.table = ranking.FeatureTable.load(os.path.join(HERE, "item_features.npz"))
        self.session, self.batch_rows = onnx_graph(HERE, params)
        self.unknown_metric, self.duplicate_metric = candidate_counters(args, self.name)

    def _score(self, emb, prob, pos, flat):
        """[R, Nmax] scores of every live row: one onnxruntime run, or one per row (exact length)
        where the graph is not batch-invariant."""
        if self.batch_rows:
            return self.session.run(["scores"], {"query_embedding": emb, "intent_probs": prob,
                                                 "item_features": self.table.rows[pos]})[0]
        scores = np.zeros(pos.shape, np.float32)
        for j, (ids, row_pos, _) in enumerate(flat):
            scores[j, : len(ids)] = self.session.run(["scores"], {
                "query_embedding": emb[j:j + 1], "intent_probs": prob[j:j + 1],
                "item_features": self.table.rows[row_pos][None]})[0][0]
        return scores

    def execute(self, requests):
        responses = [None] * len(requests)
        ks, embs, probs, id_arrays = {}, {}, {}, []
        for i, request in enumerate(requests):
            inputs = request_inputs(request)
            id_arrays.append(inputs.get("CANDIDATE_IDS"))
            try:
                ks[i] = ranking.check_top_k(request_top_k(request, self.top_k_default, inputs.get("TOP_K")),
                                            self.max_top_k)
                embs[i] = inputs["query_embedding"]
                probs[i] = inputs["intent_probs"]
            except Exception as e:  # noqa: BLE001 - this request only
                responses[i] = error_response(self.name, e)
                id_arrays[-1] = np.zeros((1, 0), np.int64)   # skipped below
        rows = stages.Rows(self.table, id_arrays, self.strict, self.max_candidates,
                           self.duplicate_metric, self.unknown_metric)
        for i, e in rows.errors.items():
            if responses[i] is None:
                responses[i] = error_response(self.name, e)
        pos, spans, flat = rows.positions()   # only the requests that are still fine
        if not spans:
            return responses
        try:
            emb = np.concatenate([embs[i] for i, _, _ in spans]) if len(spans) > 1 else embs[spans[0][0]]
            prob = np.concatenate([probs[i] for i, _, _ in spans]) if len(spans) > 1 else probs[spans[0][0]]
            scores = self._score(emb, prob, pos, flat)
            for i, s, n in spans:
                top_ids, top_scores = stages.top_k(scores[s:s + n], flat[s:s + n], ks[i])
                responses[i] = pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("TOP_IDS", top_ids),
                    pb_utils.Tensor("TOP_SCORES", top_scores),
                    pb_utils.Tensor("UNKNOWN_COUNT", stages.unknown_counts(flat[s:s + n])),
                ])
        except Exception as e:  # noqa: BLE001 - fail these requests, keep serving
            for i, _, _ in spans:
                if responses[i] is None:
                    responses[i] = error_response(self.name, e)
        return responses
