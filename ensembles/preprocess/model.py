"""gpu target, ensemble step `preprocess`: QUERY (BYTES [B,1]) -> input_ids, attention_mask (INT64 [B,L])
for the query_intent graph on Triton's onnxruntime / TensorRT backend.

Normalises and tokenizes with the export's tokenizer (tokenizer.py + tokenizer.json copied next to
this file by the repository build). An empty, blank, over-long (max_query_bytes) or non-UTF-8 query
fails its own request only. (The cpu target folds this into its `query_intent` step.)
"""
import os
import sys

# The wheel's stub embeds the system libpython, which ignores PYTHONPATH; this dir holds common.py & co.
sys.path[:0] = [p for p in [os.path.dirname(os.path.abspath(__file__)), *os.environ.get("PYTHONPATH", "").split(os.pathsep)] if p and p not in sys.path]

import triton_python_backend_utils as pb_utils  # noqa: E402

from common import Step, decode_queries, input_array  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


class TritonPythonModel(Step, name="preprocess"):
    def setup(self, params, args):
        self.max_query_bytes = int(params.get("max_query_bytes", "1024"))
        self.tokenizer = Tokenizer.load(os.path.join(HERE, "tokenizer.json"))

    def handle(self, request):
        ids, mask = self.tokenizer.encode_batch(decode_queries(input_array(request, "QUERY"), self.max_query_bytes))
        return [pb_utils.Tensor("input_ids", ids), pb_utils.Tensor("attention_mask", mask)]
