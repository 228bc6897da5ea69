"""gpu target, ensemble step `postprocess`: top-k of the ranker graph's scores.

scores (FP32 [B,N']) + candidate_ids (INT64 [B,N'], distinct ids, -1 padding) + candidate_count
(INT32 [B,1]) + optional TOP_K -> TOP_IDS (INT64 [B,k]), TOP_SCORES (FP32 [B,k]): highest score
first, ties by candidate order, k = min(top_k, distinct ids); top_k from TOP_K, else the request
parameter `top_k`, else the config's `top_k_default`; above `max_top_k`: a bad request.
(The cpu target folds this into its `ranker` step.)
"""
import os
import sys

# The wheel's stub embeds the system libpython, which ignores PYTHONPATH; this dir holds common.py & co.
sys.path[:0] = [p for p in [os.path.dirname(os.path.abspath(__file__)), *os.environ.get("PYTHONPATH", "").split(os.pathsep)] if p and p not in sys.path]

import triton_python_backend_utils as pb_utils  # noqa: E402

import ranking  # noqa: E402
import stages  # noqa: E402
from common import Step, input_array, request_top_k  # noqa: E402


class TritonPythonModel(Step, name="postprocess"):
    def setup(self, params, args):
        self.top_k_default = int(params.get("top_k_default", "10"))
        self.max_top_k = int(params.get("max_top_k", "1000"))

    def handle(self, request):
        k = ranking.check_top_k(request_top_k(request, self.top_k_default), self.max_top_k)
        scores = input_array(request, "scores")
        ids = input_array(request, "candidate_ids")
        counts = input_array(request, "candidate_count").reshape(-1)
        rows = [(ids[j, : int(n)], None, 0) for j, n in enumerate(counts)]
        top_ids, top_scores = stages.top_k(scores, rows, k)
        return [pb_utils.Tensor("TOP_IDS", top_ids), pb_utils.Tensor("TOP_SCORES", top_scores)]
