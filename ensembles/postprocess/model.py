"""Ensemble step `postprocess`: top-k of the ranker's scores and the query's intent.

scores (FP32 [B,N]) + CANDIDATE_IDS (INT64 [B,N]) -> TOP_IDS (INT64 [B,k]), TOP_SCORES (FP32 [B,k]),
highest score first, ties by candidate order; intent_probs (FP32 [B,C]) -> INTENT (BYTES [B,1],
the category name from intents.json) and INTENT_SCORE (FP32 [B,1], the max probability).
k = min(top_k, N); top_k from the optional TOP_K input, else the request parameter `top_k`, else
the config's `top_k_default`.
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


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.top_k_default = int(params.get("top_k_default", "10"))
        with open(os.path.join(HERE, "intents.json")) as f:
            self.intents = np.array([str(n).encode() for n in json.load(f)], dtype=object)

    def _top_k(self, request):
        tensor = pb_utils.get_input_tensor_by_name(request, "TOP_K")
        if tensor is not None:
            values = tensor.as_numpy().reshape(-1)
            if values.size == 0:
                raise ValueError("TOP_K is empty")
            k = int(values[0])
        else:
            params = json.loads(request.parameters() or "{}")
            k = params.get("top_k", self.top_k_default)
            if isinstance(k, bool) or not isinstance(k, (int, str)):
                raise ValueError(f"request parameter top_k must be an integer, got {k!r}")
            try:
                k = int(k)
            except ValueError:
                raise ValueError(f"request parameter top_k must be an integer, got {k!r}") from None
        if k < 1:
            raise ValueError(f"top_k must be at least 1, got {k}")
        return k

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                scores = pb_utils.get_input_tensor_by_name(request, "scores").as_numpy()
                ids = pb_utils.get_input_tensor_by_name(request, "CANDIDATE_IDS").as_numpy()
                probs = pb_utils.get_input_tensor_by_name(request, "intent_probs").as_numpy()
                k = min(self._top_k(request), scores.shape[-1])
                order = np.argsort(-scores, axis=-1, kind="stable")[:, :k]
                intent = probs.argmax(axis=-1)
                responses.append(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("TOP_IDS", np.take_along_axis(ids, order, axis=-1).astype(np.int64)),
                    pb_utils.Tensor("TOP_SCORES", np.take_along_axis(scores, order, axis=-1).astype(np.float32)),
                    pb_utils.Tensor("INTENT", self.intents[intent].reshape(-1, 1)),
                    pb_utils.Tensor("INTENT_SCORE", probs.max(axis=-1).astype(np.float32).reshape(-1, 1)),
                ]))
            except ValueError as e:
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=bad_request(f"bad request: {e}")))
            except Exception as e:  # noqa: BLE001
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(f"postprocess failed: {e!r}")))
        return responses
