"""The small Python-backend models drills and tests serve when the real ensemble is not the point:
one parameterised `add` model (answers INPUT0 + ADD, so a client sees which version served it; can be
slow, fail every request or a share of them) and a one-step ensemble over it. One set, used by the
drills (`triton-hybrid drill` needs no export) and by the test suite."""
from __future__ import annotations

from pathlib import Path

ADD_ONE = "add_one"

_CONFIG = """name: "{name}"
backend: "python"
max_batch_size: {max_batch_size}
input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ {dims} ] }} ]
output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ {dims} ] }} ]
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
"""

_MODEL_PY = '''import os, sys
sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]
import time

import numpy as np
import triton_python_backend_utils as pb_utils

ADD = {add!r}
DELAY_S = {delay_s!r}
FAIL = {fail!r}
ERROR_EVERY = {error_every!r}  # fail one execute() in ERROR_EVERY (0: never)


class TritonPythonModel:
    def initialize(self, args):
        self.seen = 0

    def execute(self, requests):
        self.seen += 1
        if ERROR_EVERY and self.seen % ERROR_EVERY == 0:
            # Raised, not returned: Triton 2.51 counts an error *response* as a success in
            # nv_inference_request_success; a raise is counted in nv_inference_request_failure.
            raise pb_utils.TritonModelException("broken on purpose (one request in %d)" % ERROR_EVERY)
        out = []
        for r in requests:
            x = pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy()
            if DELAY_S:
                time.sleep(DELAY_S)
            if FAIL:
                out.append(pb_utils.InferenceResponse(error=pb_utils.TritonError("broken on purpose")))
                continue
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", (x + ADD).astype(np.float32))]))
        return out
'''


def write_add_model(repo: str | Path, version: int = 1, add: float = 1.0, name: str = ADD_ONE, *,
                    fail: bool = False, delay_ms: float = 0.0, error_every: int = 0, batched: bool = True,
                    extra: dict[str, bytes] | None = None) -> Path:
    """repo/NAME/{config.pbtxt, VERSION/model.py}: answers INPUT0 + add (FP32 [4], batched up to 8;
    `batched=False`: any 2-D shape, no batching). Returns the model directory."""
    mdir = Path(repo) / name
    vdir = mdir / str(version)
    vdir.mkdir(parents=True, exist_ok=True)
    (mdir / "config.pbtxt").write_text(_CONFIG.format(name=name, max_batch_size=8 if batched else 0,
                                                      dims="4" if batched else "-1, -1"))
    (vdir / "model.py").write_text(_MODEL_PY.format(add=float(add), delay_s=delay_ms / 1000.0, fail=fail,
                                                    error_every=int(error_every)))
    for rel, data in (extra or {}).items():
        p = vdir / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return mdir


def write_ensemble(repo: str | Path, version: int = 1, step: str = ADD_ONE, name: str = "pipeline") -> Path:
    """A one-step ensemble IN -> STEP -> OUT (the version directory stays empty, as Triton wants)."""
    mdir = Path(repo) / name
    (mdir / str(version)).mkdir(parents=True, exist_ok=True)
    (mdir / "config.pbtxt").write_text(f"""name: "{name}"
platform: "ensemble"
max_batch_size: 8
input [ {{ name: "IN" data_type: TYPE_FP32 dims: [ 4 ] }} ]
output [ {{ name: "OUT" data_type: TYPE_FP32 dims: [ 4 ] }} ]
ensemble_scheduling {{ step [ {{ model_name: "{step}" model_version: -1
  input_map {{ key: "INPUT0" value: "IN" }} output_map {{ key: "OUTPUT0" value: "OUT" }} }} ] }}
""")
    return mdir
