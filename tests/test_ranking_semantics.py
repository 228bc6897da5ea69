"""Issue 15 finding 8, in a real Triton: the ranking semantics a search page needs.

- duplicate candidate ids are ranked once (first position wins ties);
- an unknown candidate id (an item newer than the feature snapshot) is ranked with the cold-start
  feature row and counted: the UNKNOWN_COUNT output and Triton's
  `search_ranking_unknown_candidates_total` metric; strict mode (in the spec) refuses it instead;
- the request limits (max candidates, max top_k, max query bytes) come from the spec
  (`model_repository.spec.request_limits`) and are enforced at exactly those values.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from control.local.procs import free_port
from control.local.triton_server import start_triton
from export.tokenizer import Tokenizer
from model_repository.build import build_repository
from model_repository.spec import request_limits

pytestmark = pytest.mark.slow
ENSEMBLE = "search_ranking"


def _start(root, repo, name):
    ports = {"http_port": free_port(), "grpc_port": free_port(), "metrics_port": free_port()}
    proc = start_triton(name, repo, run_dir=root / "run", ready_timeout=120, **ports)
    return proc, {"http": f"127.0.0.1:{ports['http_port']}", "grpc": f"127.0.0.1:{ports['grpc_port']}",
                  "metrics": f"127.0.0.1:{ports['metrics_port']}"}


@pytest.fixture(scope="module")
def lenient(tiny_export, tmp_path_factory):
    """The default build: non-strict."""
    root = tmp_path_factory.mktemp("lenient")
    build = build_repository(tiny_export, root / "repo", "cpu")
    proc, urls = _start(root, build.out_dir, "triton-lenient")
    try:
        yield urls
    finally:
        proc.stop()


STRICT_LIMITS = {"max_candidates": 30, "max_top_k": 5, "max_query_bytes": 40}


@pytest.fixture(scope="module")
def strict(tiny_export, tmp_path_factory):
    """Strict mode and small limits, both from the spec."""
    from model_repository.build import spec_for_export  # noqa: PLC0415 - deferred: pulls in tritonclient, grpc
    with pytest.raises(ValueError, match="top_k_default 10 must be between 1 and max_top_k 5"):
        spec_for_export(tiny_export, strict_unknown_ids=True, **STRICT_LIMITS)
    spec = spec_for_export(tiny_export, strict_unknown_ids=True, top_k_default=3, **STRICT_LIMITS)
    assert {k: request_limits(spec)[k] for k in STRICT_LIMITS} == STRICT_LIMITS
    root = tmp_path_factory.mktemp("strict")
    build = build_repository(tiny_export, root / "repo", "cpu", spec=spec)
    proc, urls = _start(root, build.out_dir, "triton-strict")
    try:
        yield urls
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def held(tiny_export):
    return json.loads((tiny_export / "heldout_queries.json").read_text())


@pytest.fixture(scope="module")
def unknown_ids(tiny_export):
    table = np.load(tiny_export / "item_features.npz")["item_ids"]
    return [int(table.max()) + 1000, -5]


def infer(urls, protocol, query, candidates, top_k=None):
    module = grpcclient if protocol == "grpc" else httpclient
    ids = np.array(candidates, dtype=np.int64)
    ids = ids[None, :] if ids.ndim == 1 else ids
    arrays = {"QUERY": np.array([[query.encode()]] * ids.shape[0], dtype=object), "CANDIDATE_IDS": ids}
    if top_k is not None:
        arrays["TOP_K"] = np.array([[top_k]] * ids.shape[0], dtype=np.int32)
    ins = []
    for name, a in arrays.items():
        dt = "BYTES" if a.dtype == object else {np.dtype(np.int64): "INT64", np.dtype(np.int32): "INT32"}[a.dtype]
        t = module.InferInput(name, list(a.shape), dt)
        t.set_data_from_numpy(a)
        ins.append(t)
    res = module.InferenceServerClient(urls[protocol]).infer(ENSEMBLE, ins)
    return {n: res.as_numpy(n) for n in ("TOP_IDS", "TOP_SCORES", "UNKNOWN_COUNT")}


def cold_start_score(tiny_export, query):
    """The ranker graph's score of an all-zero feature row for this query, computed here directly
    (tokenizer + the two graphs), not through export.ranking."""
    import onnxruntime as ort  # noqa: PLC0415 - deferred: pulls in onnxruntime
    ids, mask = Tokenizer.load(tiny_export / "tokenizer.json").encode_batch([query])
    qi = ort.InferenceSession(str(tiny_export / "query_intent.onnx"), providers=["CPUExecutionProvider"])
    rk = ort.InferenceSession(str(tiny_export / "ranker.onnx"), providers=["CPUExecutionProvider"])
    logits, emb = qi.run(["intent_logits", "query_embedding"], {"input_ids": ids, "attention_mask": mask})
    e = np.exp(logits - logits.max(-1, keepdims=True))
    feats = np.zeros((1, 1, np.load(tiny_export / "item_features.npz")["features"].shape[1]), np.float32)
    return float(rk.run(["scores"], {"query_embedding": emb, "intent_probs": (e / e.sum(-1, keepdims=True)).astype(np.float32),
                                     "item_features": feats})[0][0, 0])


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_duplicate_candidates_are_ranked_once(lenient, held, protocol):
    h = held[1]
    cands = [int(c) for c in h["candidate_ids"]][:8]
    doubled = cands + cands[::-1] + cands[:3]
    out = infer(lenient, protocol, h["query"], doubled, top_k=len(doubled))
    top = out["TOP_IDS"].reshape(-1).tolist()
    assert len(top) == len(set(top)) == len(set(cands)), top            # old code: every id 2-3 times
    once = infer(lenient, protocol, h["query"], cands, top_k=len(doubled))
    assert top == once["TOP_IDS"].reshape(-1).tolist()
    np.testing.assert_allclose(out["TOP_SCORES"], once["TOP_SCORES"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_unknown_candidates_are_ranked_with_cold_start_features_and_counted(lenient, held, unknown_ids,
                                                                           tiny_export, protocol):
    h = held[2]
    cands = [int(c) for c in h["candidate_ids"]][:10]
    mixed = cands[:4] + [unknown_ids[0]] + cands[4:] + [unknown_ids[1], unknown_ids[0]]
    out = infer(lenient, protocol, h["query"], mixed, top_k=len(mixed))   # old code: HTTP 400 for the request
    top = out["TOP_IDS"].reshape(-1).tolist()
    assert out["UNKNOWN_COUNT"].tolist() == [[2]]
    assert sorted(top) == sorted(set(mixed))
    scores = dict(zip(top, out["TOP_SCORES"].reshape(-1).tolist()))
    cold = cold_start_score(tiny_export, h["query"])
    assert abs(scores[unknown_ids[0]] - cold) <= 1e-4 and abs(scores[unknown_ids[1]] - cold) <= 1e-4
    assert top.index(unknown_ids[0]) < top.index(unknown_ids[1])          # equal scores: candidate order
    known = infer(lenient, protocol, h["query"], cands, top_k=len(cands))
    assert [i for i in top if i not in unknown_ids] == known["TOP_IDS"].reshape(-1).tolist()
    assert infer(lenient, protocol, h["query"], cands)["UNKNOWN_COUNT"].tolist() == [[0]]


def test_unknown_and_duplicate_candidates_are_metrics(lenient, held, unknown_ids):
    def value(name):
        text = requests.get(f"http://{lenient['metrics']}/metrics", timeout=5).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))
    before_u, before_d = value("search_ranking_unknown_candidates_total"), value("search_ranking_duplicate_candidates_total")
    cands = [int(c) for c in held[3]["candidate_ids"]][:5]
    infer(lenient, "http", held[3]["query"], cands + [unknown_ids[0], cands[0], cands[1]])
    assert value("search_ranking_unknown_candidates_total") - before_u == 1
    assert value("search_ranking_duplicate_candidates_total") - before_d == 2


def test_rows_of_one_request_with_different_distinct_counts_are_padded(lenient, held):
    """[2,N] candidates whose rows dedupe to different lengths: the shorter row is padded with id -1."""
    cands = [int(c) for c in held[4]["candidate_ids"]][:6]
    rows = [cands, cands[:3] + cands[:3]]
    out = infer(lenient, "http", held[4]["query"], rows, top_k=6)
    assert out["TOP_IDS"].shape == (2, 6)
    assert sorted(out["TOP_IDS"][0].tolist()) == sorted(cands)
    assert out["TOP_IDS"][1, 3:].tolist() == [-1, -1, -1] and sorted(out["TOP_IDS"][1, :3].tolist()) == sorted(cands[:3])
    assert np.all(out["TOP_SCORES"][1, 3:] < -1e30)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_strict_mode_refuses_unknown_ids(strict, held, unknown_ids, protocol):
    h = held[2]
    cands = [int(c) for c in h["candidate_ids"]][:5]
    with pytest.raises(InferenceServerException) as err:
        infer(strict, protocol, h["query"], cands + [unknown_ids[1]])
    assert "1 unknown candidate id(s): -5" in str(err.value)
    assert ("400" in str(err.value.status())) or ("INVALID_ARGUMENT" in str(err.value.status()))
    assert infer(strict, protocol, h["query"], cands)["UNKNOWN_COUNT"].tolist() == [[0]]


def test_limits_from_the_spec_are_enforced_at_their_values(strict, held):
    lim = STRICT_LIMITS
    h = held[0]
    known = [int(c) for c in h["candidate_ids"]]
    many = (known * (lim["max_candidates"] // len(known) + 2))[: lim["max_candidates"]]
    assert infer(strict, "http", h["query"], many, top_k=lim["max_top_k"])["TOP_IDS"].shape[1] == \
        min(lim["max_top_k"], len(set(many)))
    for kw, message in ((dict(candidates=many + [known[0]]), f"the maximum is {lim['max_candidates']}"),
                        (dict(candidates=known, top_k=lim["max_top_k"] + 1), f"the maximum is {lim['max_top_k']}"),
                        (dict(candidates=known, query="x" * (lim["max_query_bytes"] + 1)),
                         f"the maximum is {lim['max_query_bytes']}")):
        args = {"query": h["query"], **kw}
        with pytest.raises(InferenceServerException) as err:
            infer(strict, "http", args.pop("query"), **args)
        assert message in str(err.value), (kw, err.value)
    at_limit = ("q" * (lim["max_query_bytes"] - 1)) + " "
    assert infer(strict, "http", at_limit, known[:3])["TOP_IDS"].size == 3
