"""Ensemble step `preprocess`: QUERY (BYTES [B,1]) -> input_ids, attention_mask (INT64 [B,L]).

Normalises and tokenizes with the export's tokenizer (tokenizer.py + tokenizer.json copied next
to this file by the repository builder, so the model is self-contained). An empty, over-long or
non-UTF-8 query gets a Triton error for that request only.
"""
import os
import sys

# The wheel's stub embeds the system libpython, which ignores PYTHONPATH when building sys.path.
sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]

import importlib.util  # noqa: E402
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


def _load_tokenizer_class():
    spec = importlib.util.spec_from_file_location("search_ranking_tokenizer", os.path.join(HERE, "tokenizer.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Tokenizer


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.max_query_chars = int(params.get("max_query_chars", "256"))
        self.tokenizer = _load_tokenizer_class().load(os.path.join(HERE, "tokenizer.json"))

    def _queries(self, request):
        raw = pb_utils.get_input_tensor_by_name(request, "QUERY").as_numpy().reshape(-1)
        queries = []
        for i, q in enumerate(raw):
            try:
                text = q.decode("utf-8") if isinstance(q, bytes) else str(q)
            except UnicodeDecodeError:
                raise ValueError(f"QUERY[{i}] is not valid UTF-8") from None
            if not text.strip():
                raise ValueError(f"QUERY[{i}] is empty")
            if len(text) > self.max_query_chars:
                raise ValueError(f"QUERY[{i}] has {len(text)} characters; the maximum is {self.max_query_chars}")
            queries.append(text)
        return queries

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                ids, mask = self.tokenizer.encode_batch(self._queries(request))
                responses.append(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("input_ids", np.ascontiguousarray(ids, dtype=np.int64)),
                    pb_utils.Tensor("attention_mask", np.ascontiguousarray(mask, dtype=np.int64)),
                ]))
            except ValueError as e:
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=bad_request(f"bad request: {e}")))
            except Exception as e:  # noqa: BLE001 - one request's failure never takes the model down
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(f"preprocess failed: {e!r}")))
        return responses
