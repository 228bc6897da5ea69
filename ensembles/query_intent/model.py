"""cpu target, ensemble step `query_intent`: the whole query side in one Python-backend model.

QUERY (BYTES [B,1]) -> tokenize (tokenizer.py + tokenizer.json) -> query_intent ONNX graph
(model.onnx, onnxruntime) -> intent_probs (FP32 [B,C], softmax), query_embedding (FP32 [B,D]),
INTENT (BYTES [B,1], the category name from intents.json), INTENT_SCORE (FP32 [B,1]).
All requests of one execute call go through onnxruntime as one batch. An empty, blank, over-long
(max_query_bytes) or non-UTF-8 query fails its own request only (HTTP 400 / gRPC INVALID_ARGUMENT).
"""
import os
import sys

# The wheel's stub embeds the system libpython, which ignores PYTHONPATH; this dir holds common.py & co.
sys.path[:0] = [p for p in [os.path.dirname(os.path.abspath(__file__)), *os.environ.get("PYTHONPATH", "").split(os.pathsep)] if p and p not in sys.path]

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

import stages  # noqa: E402
from common import Step, decode_queries, error_response, load_intents, onnx_graph, request_inputs  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


class TritonPythonModel(Step, name="query_intent"):
    def setup(self, params, args):
        self.max_query_bytes = int(params.get("max_query_bytes", "1024"))
        self.tokenizer = Tokenizer.load(os.path.join(HERE, "tokenizer.json"))
        self.session, self.batch_rows = onnx_graph(HERE, params)
        self.intents = load_intents(HERE)

    def _run(self, ids, mask):
        names = ["intent_logits", "query_embedding"]
        if self.batch_rows or len(ids) == 1:
            return self.session.run(names, {"input_ids": ids, "attention_mask": mask})
        parts = [self.session.run(names, {"input_ids": ids[j:j + 1], "attention_mask": mask[j:j + 1]})
                 for j in range(len(ids))]
        return [np.concatenate([p[n] for p in parts]) for n in range(len(names))]

    def execute(self, requests):
        responses = [None] * len(requests)
        texts, spans = [], []
        for i, request in enumerate(requests):
            try:
                queries = decode_queries(request_inputs(request)["QUERY"], self.max_query_bytes)
            except Exception as e:  # noqa: BLE001 - this request only
                responses[i] = error_response(self.name, e)
                continue
            spans.append((i, len(texts), len(queries)))
            texts.extend(queries)
        if texts:
            try:
                ids, mask = self.tokenizer.encode_batch(texts)
                logits, emb = self._run(ids, mask)
                probs, names, scores = stages.intent_outputs(logits, self.intents)
                for i, s, n in spans:
                    responses[i] = pb_utils.InferenceResponse(output_tensors=[
                        pb_utils.Tensor("intent_probs", probs[s:s + n]),
                        pb_utils.Tensor("query_embedding", emb[s:s + n]),
                        pb_utils.Tensor("INTENT", names[s:s + n]),
                        pb_utils.Tensor("INTENT_SCORE", scores[s:s + n]),
                    ])
            except Exception as e:  # noqa: BLE001 - fail these requests, keep serving
                for i, _, _ in spans:
                    responses[i] = error_response(self.name, e)
        return responses
