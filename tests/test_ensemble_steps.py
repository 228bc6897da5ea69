"""The ensemble's Python-backend steps, run in-process on a fake `triton_python_backend_utils`
(no server): both layouts the spec generates (cpu: 2 fused steps; gpu: preprocess / feature_lookup /
postprocess around the two graphs, which run here through onnxruntime in place of Triton's
onnxruntime backend) answer like the in-process reference, with several requests of different
shapes in one execute call, and a bad request fails alone. The gpu layout's Python code is only
exercised here on machines without a GPU."""
from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import json_format, text_format

from model_repository.build import build_repository


class FakeTensor:
    def __init__(self, name, array):
        self._name, self._array = name, np.asarray(array)

    def name(self):
        return self._name

    def as_numpy(self):
        return self._array


class FakeResponse:
    def __init__(self, output_tensors, error=None):
        self.outputs = {t.name(): t.as_numpy() for t in output_tensors}
        self.error = error


class FakeError(Exception):
    INVALID_ARG = "INVALID_ARG"

    def __init__(self, message, code=None):
        super().__init__(message)
        self.code = code


class FakeMetric:
    def __init__(self):
        self.value = 0

    def increment(self, n):
        self.value += n


class FakeFamily:
    COUNTER = "counter"
    metrics: dict = {}

    def __init__(self, name, description, kind):
        self.name = name

    def Metric(self, labels):
        return FakeFamily.metrics.setdefault(self.name, FakeMetric())


class FakeRequest:
    def __init__(self, parameters=None, **inputs):
        self._inputs = {k: FakeTensor(k, v) for k, v in inputs.items()}
        self._parameters = json.dumps(parameters or {})

    def inputs(self):
        return list(self._inputs.values())

    def parameters(self):
        return self._parameters


@pytest.fixture(scope="module")
def pb_utils():
    mod = types.ModuleType("triton_python_backend_utils")
    mod.Tensor, mod.InferenceResponse, mod.TritonError, mod.MetricFamily = FakeTensor, FakeResponse, FakeError, FakeFamily
    mod.get_input_tensor_by_name = lambda request, name: request._inputs.get(name)
    saved = sys.modules.get("triton_python_backend_utils")
    sys.modules["triton_python_backend_utils"] = mod
    yield mod
    if saved is None:
        sys.modules.pop("triton_python_backend_utils", None)
    else:
        sys.modules["triton_python_backend_utils"] = saved


SHARED = ("common", "stages", "ranking", "tokenizer")


def load_model(model_dir, config_path, pb_utils):
    """model.py of a built version dir, initialized with its generated config."""
    from tritonclient.grpc import model_config_pb2  # noqa: PLC0415 - deferred: pulls in tritonclient, grpc
    cfg = text_format.Parse(config_path.read_text(), model_config_pb2.ModelConfig())
    saved_path = list(sys.path)
    for m in SHARED:
        sys.modules.pop(m, None)
    try:
        spec = importlib.util.spec_from_file_location(f"step_{model_dir.parent.name}", model_dir / "model.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        model = module.TritonPythonModel()
        model.initialize({"model_config": json.dumps(json_format.MessageToDict(cfg, preserving_proto_field_name=True)),
                          "model_name": cfg.name, "model_version": "1"})
        return model
    finally:
        sys.path[:] = saved_path
        for m in SHARED:
            sys.modules.pop(m, None)


@pytest.fixture(scope="module")
def repos(tiny_export, tmp_path_factory):
    root = tmp_path_factory.mktemp("steps")
    return {t: build_repository(tiny_export, root / t, t).out_dir for t in ("cpu", "gpu")}


@pytest.fixture(scope="module")
def cpu_steps(repos, pb_utils):
    return {m: load_model(repos["cpu"] / m / "1", repos["cpu"] / m / "config.pbtxt", pb_utils)
            for m in ("query_intent", "ranker")}


@pytest.fixture(scope="module")
def gpu_steps(repos, pb_utils):
    steps = {m: load_model(repos["gpu"] / m / "1", repos["gpu"] / m / "config.pbtxt", pb_utils)
             for m in ("preprocess", "feature_lookup", "postprocess")}
    for m in ("query_intent", "ranker"):   # Triton's onnxruntime backend, stood in for
        steps[m] = ort.InferenceSession(str(repos["gpu"] / m / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    return steps


def q(text):
    return np.array([[text.encode()]], dtype=object)


def run_cpu(steps, reqs):
    """reqs: [(query, candidates [B,N] or [N], top_k or None)], each step ONE execute call for all
    (as the ensemble does, a request that failed the first step never reaches the second)."""
    qr = steps["query_intent"].execute([FakeRequest(QUERY=np.array([[x.encode()]] * np.atleast_2d(c).shape[0],
                                                                   dtype=object)) for x, c, _ in reqs])
    rr, idx = [], []
    for i, ((x, c, k), r) in enumerate(zip(reqs, qr)):
        if r.error is not None:
            continue
        inputs = dict(CANDIDATE_IDS=np.atleast_2d(np.asarray(c, dtype=np.int64)),
                      query_embedding=r.outputs["query_embedding"], intent_probs=r.outputs["intent_probs"])
        if k is not None:
            inputs["TOP_K"] = np.array([[k]] * inputs["CANDIDATE_IDS"].shape[0], dtype=np.int32)
        rr.append(FakeRequest(**inputs))
        idx.append(i)
    ranked = dict(zip(idx, steps["ranker"].execute(rr)))
    out = []
    for i, a in enumerate(qr):
        r = ranked.get(i)
        out.append((a.error, a.outputs) if r is None else (r.error, {**a.outputs, **r.outputs}))
    return out


def run_gpu(steps, reqs):
    pre = steps["preprocess"].execute([FakeRequest(QUERY=q(x)) for x, _, _ in reqs])
    results = []
    for (x, c, k), p in zip(reqs, pre):
        logits, emb = steps["query_intent"].run(["intent_logits", "query_embedding"], p.outputs)
        fl = steps["feature_lookup"].execute([FakeRequest(CANDIDATE_IDS=np.atleast_2d(np.asarray(c, dtype=np.int64)),
                                                          intent_logits=logits)])[0]
        if fl.error is not None:
            results.append((fl.error, {}))
            continue
        scores = steps["ranker"].run(["scores"], {"query_embedding": emb, "intent_probs": fl.outputs["intent_probs"],
                                                  "item_features": fl.outputs["item_features"]})[0]
        inputs = dict(scores=scores, candidate_ids=fl.outputs["candidate_ids"],
                      candidate_count=fl.outputs["candidate_count"])
        if k is not None:
            inputs["TOP_K"] = np.array([[k]], dtype=np.int32)
        post = steps["postprocess"].execute([FakeRequest(**inputs)])[0]
        results.append((post.error, {**fl.outputs, **post.outputs}))
    return results


@pytest.fixture(scope="module")
def cases(tiny_export):
    held = json.loads((tiny_export / "heldout_queries.json").read_text())
    table = np.load(tiny_export / "item_features.npz")["item_ids"]
    unknown = int(table.max()) + 7
    out = []
    for i, h in enumerate(held[:24]):
        c = [int(x) for x in h["candidate_ids"]][: 5 + 3 * i]
        if i % 3 == 1:
            c = c + c[:2]                      # duplicates
        if i % 4 == 2:
            c = c[:2] + [unknown] + c[2:]      # an unknown id
        out.append((h["query"], c, [None, 3, 10, 100][i % 4]))
    return out


# ids without the bare word "gpu": conftest skips tests with a "gpu" keyword on CPU hosts.
@pytest.mark.parametrize("layout", ["cpu", "gpu"], ids=["cpu-layout", "gpu-layout"])
def test_both_layouts_answer_like_the_reference(layout, cpu_steps, gpu_steps, cases, tiny_export):
    from export.reference import ReferencePipeline  # noqa: PLC0415 - deferred: pulls in onnxruntime
    ref = ReferencePipeline(tiny_export)
    results = run_cpu(cpu_steps, cases) if layout == "cpu" else run_gpu(gpu_steps, cases)
    for (query, cands, k), (error, out) in zip(cases, results):
        assert error is None, (query, error)
        want = ref.ranking(query, cands, k or 10)
        assert out["TOP_IDS"].reshape(-1).tolist() == want.ids.tolist(), query
        np.testing.assert_allclose(out["TOP_SCORES"].reshape(-1), want.scores, atol=1e-4, rtol=0)
        assert out["INTENT"].reshape(-1)[0].decode() == want.intent
        assert abs(float(out["INTENT_SCORE"].reshape(-1)[0]) - want.intent_score) <= 1e-4
        assert out["UNKNOWN_COUNT"].tolist() == [[want.unknown]]
        assert out["TOP_IDS"].dtype == np.int64 and out["TOP_SCORES"].dtype == np.float32
    assert sum(want_unknown > 0 for want_unknown in (ref.ranking(x, c, 1).unknown for x, c, _ in cases)) >= 5


def test_a_bad_request_in_a_batched_execute_fails_alone(cpu_steps, cases):
    reqs = list(cases[:6])
    reqs[1] = (cases[1][0], [], None)               # no candidates
    reqs[3] = (cases[3][0], cases[3][1], 0)         # top_k 0
    reqs[4] = ("   ", cases[4][1], None)            # blank query
    results = run_cpu(cpu_steps, reqs)
    for i, (error, out) in enumerate(results):
        if i in (1, 3, 4):
            assert isinstance(error, FakeError) and error.code == FakeError.INVALID_ARG, (i, error)
            assert str(error).startswith("bad request: ")
        else:
            assert error is None and out["TOP_IDS"].size > 0, (i, error)
    assert "CANDIDATE_IDS is empty" in str(results[1][0]) and "top_k must be at least 1" in str(results[3][0])
    assert "QUERY[0] is empty" in str(results[4][0])


def test_the_shared_module_is_the_only_copy_of_the_error_wrapper():
    """Issue 13: bad_request / parameters / the per-request error wrapper live in ensembles/common.py."""
    root = Path(__file__).resolve().parent.parent / "ensembles"
    models = sorted(root.glob("*/model.py"))
    assert {p.parent.name for p in models} == {"query_intent", "ranker", "preprocess", "feature_lookup", "postprocess"}
    for p in models:
        text = p.read_text()
        assert "def bad_request" not in text and "TritonError(" not in text and 'json.loads(args["model_config"])' not in text, p
        assert "from common import" in text, p
    assert (root / "common.py").read_text().count("def bad_request") == 1
