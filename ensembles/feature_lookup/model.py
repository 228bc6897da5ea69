"""Ensemble step `feature_lookup`: assembles the ranker's inputs.

CANDIDATE_IDS (INT64 [B,N]) -> item_features (FP32 [B,N,F]) gathered from the export's feature
table (item_features.npz next to this file), and intent_logits (FP32 [B,C]) -> intent_probs
(softmax). Too many candidates, none, or ids not in the table: a Triton error for that request.
"""
import os
import sys

sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]

import json  # noqa: E402

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def bad_request(message):
    """A Triton error for one request; INVALID_ARG makes it HTTP 400 / gRPC INVALID_ARGUMENT."""
    try:
        return pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG)
    except (AttributeError, TypeError):  # older Python backends: no error codes
        return pb_utils.TritonError(message)


def softmax(logits):
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.max_candidates = int(params.get("max_candidates", "1000"))
        table = np.load(os.path.join(HERE, "item_features.npz"))
        ids = table["item_ids"].astype(np.int64)
        order = np.argsort(ids, kind="stable")
        self.sorted_ids = ids[order]
        self.features = np.ascontiguousarray(table["features"].astype(np.float32)[order])

    def _gather(self, candidates):
        if candidates.shape[-1] == 0:
            raise ValueError("CANDIDATE_IDS is empty")
        if candidates.shape[-1] > self.max_candidates:
            raise ValueError(f"{candidates.shape[-1]} candidates; the maximum is {self.max_candidates}")
        pos = np.searchsorted(self.sorted_ids, candidates)
        pos = np.minimum(pos, len(self.sorted_ids) - 1)
        unknown = self.sorted_ids[pos] != candidates
        if unknown.any():
            bad = np.unique(candidates[unknown])
            shown = ", ".join(str(int(x)) for x in bad[:5]) + (", ..." if len(bad) > 5 else "")
            raise ValueError(f"{len(bad)} unknown candidate id(s): {shown}")
        return self.features[pos]

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                candidates = pb_utils.get_input_tensor_by_name(request, "CANDIDATE_IDS").as_numpy()
                logits = pb_utils.get_input_tensor_by_name(request, "intent_logits").as_numpy()
                responses.append(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("item_features", self._gather(candidates)),
                    pb_utils.Tensor("intent_probs", softmax(logits.astype(np.float32))),
                ]))
            except ValueError as e:
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=bad_request(f"bad request: {e}")))
            except Exception as e:  # noqa: BLE001
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(f"feature_lookup failed: {e!r}")))
        return responses
