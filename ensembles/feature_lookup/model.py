"""gpu target, ensemble step `feature_lookup`: the ranker graph's inputs and the query's intent.

CANDIDATE_IDS (INT64 [B,N]) -> dedupe (first occurrence) -> item_features (FP32 [B,N',F], rows of
item_features.npz; unknown ids get the cold-start row and are counted, strict mode refuses them),
candidate_ids (INT64 [B,N'], the distinct ids, -1 padding), candidate_count (INT32 [B,1]),
UNKNOWN_COUNT (INT32 [B,1]); intent_logits (FP32 [B,C]) -> intent_probs (softmax), INTENT
(BYTES [B,1]), INTENT_SCORE (FP32 [B,1]). (The cpu target folds this into its `ranker` step.)
"""
import os
import sys

# The wheel's stub embeds the system libpython, which ignores PYTHONPATH; this dir holds common.py & co.
sys.path[:0] = [p for p in [os.path.dirname(os.path.abspath(__file__)), *os.environ.get("PYTHONPATH", "").split(os.pathsep)] if p and p not in sys.path]

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

import ranking  # noqa: E402
import stages  # noqa: E402
from common import Step, candidate_counters, flag, input_array, load_intents  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


class TritonPythonModel(Step, name="feature_lookup"):
    def setup(self, params, args):
        self.max_candidates = int(params.get("max_candidates", "1000"))
        self.strict = flag(params, "strict_unknown_ids")
        self.table = ranking.FeatureTable.load(os.path.join(HERE, "item_features.npz"))
        self.intents = load_intents(HERE)
        self.unknown_metric, self.duplicate_metric = candidate_counters(args, self.name)

    def handle(self, request):
        rows = stages.Rows(self.table, [input_array(request, "CANDIDATE_IDS")], self.strict, self.max_candidates,
                           self.duplicate_metric, self.unknown_metric)
        if rows.errors:
            raise rows.errors[0]
        pos, _, flat = rows.positions()
        ids = np.full(pos.shape, stages.PAD_ID, dtype=np.int64)
        for j, (row_ids, _, _) in enumerate(flat):
            ids[j, : len(row_ids)] = row_ids
        probs, names, scores = stages.intent_outputs(input_array(request, "intent_logits"), self.intents)
        return [pb_utils.Tensor("item_features", self.table.rows[pos]),
                pb_utils.Tensor("candidate_ids", ids),
                pb_utils.Tensor("candidate_count", np.array([[len(r[0])] for r in flat], dtype=np.int32)),
                pb_utils.Tensor("UNKNOWN_COUNT", stages.unknown_counts(flat)),
                pb_utils.Tensor("intent_probs", probs),
                pb_utils.Tensor("INTENT", names),
                pb_utils.Tensor("INTENT_SCORE", scores)]
