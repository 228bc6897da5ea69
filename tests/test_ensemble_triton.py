"""The generated cpu repository in a real Triton (the pytriton wheel's server): search_ranking's
answers equal the in-process reference pipeline for every variant served (fp32, int8, student),
over HTTP and gRPC, top_k both ways, and every kind of bad request gets a clear Triton error while
the server and other requests carry on."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from control.local.procs import free_port
from control.local.triton_server import start_triton
from model_repository.build import build_repository
from model_repository.smoke import (
    OUTPUTS,
    check_response,
    run_smoke,
    smoke_request,
    to_infer_inputs,
)
from model_repository.spec import ENSEMBLE, VARIANTS

pytestmark = pytest.mark.slow
N_PARITY = 200
N_PARITY_VARIANT = 100


@pytest.fixture(scope="module")
def export_dir(tiny_export):
    return tiny_export


@pytest.fixture(scope="module")
def server(export_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ensemble")
    build_repository(export_dir, root / "repo", "cpu")            # version 1 stays beside version 2
    build = build_repository(export_dir, root / "repo", "cpu")
    ports = {"http_port": free_port(), "grpc_port": free_port(), "metrics_port": free_port()}
    proc = start_triton("triton-ensemble-test", build.out_dir, run_dir=root / "run", ready_timeout=120, **ports)
    try:
        yield {"http": f"127.0.0.1:{ports['http_port']}", "grpc": f"127.0.0.1:{ports['grpc_port']}",
               "repo": build.out_dir, "proc": proc}
    finally:
        proc.stop()


@pytest.fixture(scope="module", params=[v for v in VARIANTS if v != "fp32"])
def variant_server(request, export_dir, tmp_path_factory):
    """A Triton serving another variant of the same export (built with build_repository(variant=))."""
    variant = request.param
    files = VARIANTS[variant]
    if not all((export_dir / f).exists() for f in (files.query_intent, files.ranker)):
        pytest.fail(f"the test export has no {variant} files; the tiny profile keeps every variant")
    root = tmp_path_factory.mktemp(f"variant-{variant}")
    build = build_repository(export_dir, root / "repo", "cpu", variant=variant)
    ports = {"http_port": free_port(), "grpc_port": free_port(), "metrics_port": free_port()}
    proc = start_triton(f"triton-{variant}-test", build.out_dir, run_dir=root / "run", ready_timeout=120, **ports)
    try:
        yield {"http": f"127.0.0.1:{ports['http_port']}", "grpc": f"127.0.0.1:{ports['grpc_port']}",
               "repo": build.out_dir, "variant": variant}
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def reference(export_dir):
    from export.reference import ReferencePipeline  # noqa: PLC0415 - deferred: pulls in onnxruntime
    return ReferencePipeline(export_dir)


@pytest.fixture(scope="module")
def limits(server):
    ranker = requests.get(f"http://{server['http']}/v2/models/ranker/config", timeout=5).json()["parameters"]
    query = requests.get(f"http://{server['http']}/v2/models/query_intent/config", timeout=5).json()["parameters"]
    return {"max_candidates": int(ranker["max_candidates"]["string_value"]),
            "max_top_k": int(ranker["max_top_k"]["string_value"]),
            "max_query_bytes": int(query["max_query_bytes"]["string_value"]),
            "top_k_default": int(ranker["top_k_default"]["string_value"])}


def inputs(module, query, candidates, top_k=None, cand_dtype=np.int64, query_shape=None):
    q = np.array([[query.encode() if isinstance(query, str) else query]], dtype=object)
    if query_shape is not None:
        q = np.array([query.encode()] * int(np.prod(query_shape)), dtype=object).reshape(query_shape)
    arrays = {"QUERY": q, "CANDIDATE_IDS": np.array([candidates], dtype=cand_dtype).reshape(1, -1)}
    if top_k is not None:
        arrays["TOP_K"] = np.array([[top_k]], dtype=np.int32)
    return to_infer_inputs(arrays, module)


def infer(server, protocol, query, candidates, top_k=None, parameters=None, **kw):
    module = grpcclient if protocol == "grpc" else httpclient
    client = module.InferenceServerClient(server[protocol])
    result = client.infer(ENSEMBLE, inputs(module, query, candidates, top_k, **kw), parameters=parameters)
    return {n: result.as_numpy(n) for n in OUTPUTS + ("UNKNOWN_COUNT",)}


def parity_cases(export_dir, n):
    """n requests from the held-out set: the held-out queries, then the same queries with rotated
    and shortened candidate lists and varying top_k until there are n."""
    held = json.loads((export_dir / "heldout_queries.json").read_text())
    cases, i = [], 0
    while len(cases) < n:
        h = held[i % len(held)]
        rnd = i // len(held)
        cands = [int(c) for c in h["candidate_ids"]]
        if rnd:
            cands = cands[rnd % len(cands):] + cands[:rnd % len(cands)]
            cands = cands[: max(1, len(cands) - rnd)]
        cases.append((h["query"], cands, [None, 1, 3, 5, 10, 50][i % 6]))
        i += 1
    return cases


def assert_same(out, expected, where):
    ids, scores, intent, intent_score = expected
    assert out["TOP_IDS"].reshape(-1).tolist() == [int(x) for x in ids], where
    np.testing.assert_allclose(out["TOP_SCORES"].reshape(-1), np.asarray(scores, dtype=np.float32), atol=1e-4, rtol=0,
                               err_msg=where)
    assert out["INTENT"].reshape(-1)[0].decode() == intent, where
    assert abs(float(out["INTENT_SCORE"].reshape(-1)[0]) - float(intent_score)) <= 1e-4, where


def check_parity(server, cases, reference, top_k_default):
    def one(i_case):
        i, (query, cands, top_k) = i_case
        protocol = "grpc" if i % 2 else "http"
        out = infer(server, protocol, query, cands, top_k)
        return i, out

    # A few at a time, so the dynamic batcher does put several requests into one execute.
    with ThreadPoolExecutor(4) as pool:
        results = dict(pool.map(one, enumerate(cases)))
    for i, (query, cands, top_k) in enumerate(cases):
        expected = reference.rank(query, cands, top_k or top_k_default)
        assert_same(results[i], expected, f"case {i}: {query!r} top_k={top_k} n={len(cands)}")
        assert results[i]["UNKNOWN_COUNT"].tolist() == [[0]]


def test_answers_equal_the_reference_pipeline(server, export_dir, reference, limits):
    cases = parity_cases(export_dir, N_PARITY)
    assert len(cases) >= 200
    check_parity(server, cases, reference, limits["top_k_default"])


def test_each_variant_answers_like_its_reference(variant_server, export_dir, limits):
    """int8 and student served through the same ensemble equal the reference run on their files."""
    from export.reference import ReferencePipeline  # noqa: PLC0415 - deferred: pulls in onnxruntime
    files = VARIANTS[variant_server["variant"]]
    ref = ReferencePipeline(export_dir, query_model=files.query_intent, ranker_model=files.ranker)
    check_parity(variant_server, parity_cases(export_dir, N_PARITY_VARIANT), ref, limits["top_k_default"])
    assert run_smoke(variant_server["http"], variant_server["repo"]) == []
    assert run_smoke(variant_server["grpc"], variant_server["repo"], protocol="grpc") == []


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_top_k_by_input_and_by_request_parameter(server, export_dir, reference, protocol):
    h = json.loads((export_dir / "heldout_queries.json").read_text())[0]
    cands = [int(c) for c in h["candidate_ids"]]
    by_input = infer(server, protocol, h["query"], cands, top_k=2)
    by_param = infer(server, protocol, h["query"], cands, parameters={"top_k": 3})
    both = infer(server, protocol, h["query"], cands, top_k=1, parameters={"top_k": 3})
    assert by_input["TOP_IDS"].shape == (1, min(2, len(cands)))
    assert by_param["TOP_IDS"].shape == (1, min(3, len(cands)))
    assert both["TOP_IDS"].shape == (1, 1)           # the TOP_K input wins
    assert_same(by_param, reference.rank(h["query"], cands, 3), "top_k parameter")
    big = infer(server, protocol, h["query"], cands, top_k=len(cands) + 5)
    assert big["TOP_IDS"].shape == (1, len(set(cands)))   # k is capped at the distinct candidates


def bad_requests(export_dir, limits):
    held = json.loads((export_dir / "heldout_queries.json").read_text())
    known = [int(c) for c in held[0]["candidate_ids"]]
    q = held[0]["query"]
    return {
        "empty query": (dict(query="", candidates=known), "QUERY[0] is empty"),
        "blank query": (dict(query="   ", candidates=known), "QUERY[0] is empty"),
        "over-long query": (dict(query="a" * (limits["max_query_bytes"] + 1), candidates=known),
                            f"has {limits['max_query_bytes'] + 1} bytes; the maximum is {limits['max_query_bytes']}"),
        "over-long in bytes, not in characters": (dict(query="é" * (limits["max_query_bytes"] // 2 + 1),
                                                       candidates=known), f"the maximum is {limits['max_query_bytes']}"),
        "not UTF-8": (dict(query=b"\xff\xfe shoes", candidates=known), "not valid UTF-8"),
        "too many candidates": (dict(query=q, candidates=(known * (limits["max_candidates"] // len(known) + 2))
                                     [: limits["max_candidates"] + 1]),
                                f"{limits['max_candidates'] + 1} candidates; the maximum is {limits['max_candidates']}"),
        "no candidates": (dict(query=q, candidates=[]), "CANDIDATE_IDS is empty"),
        "wrong dtype": (dict(query=q, candidates=known, cand_dtype=np.int32), "CANDIDATE_IDS"),
        "wrong shape": (dict(query=q, candidates=known, query_shape=(1, 2)), "QUERY"),
        "zero top_k": (dict(query=q, candidates=known, top_k=0), "top_k must be at least 1"),
        "top_k over the limit": (dict(query=q, candidates=known, top_k=limits["max_top_k"] + 1),
                                 f"the maximum is {limits['max_top_k']}"),
        "bad top_k parameter": (dict(query=q, candidates=known, parameters={"top_k": "many"}),
                                "request parameter top_k must be an integer"),
    }


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_each_bad_request_gets_a_clear_error_and_the_server_carries_on(server, export_dir, limits, protocol):
    held = json.loads((export_dir / "heldout_queries.json").read_text())[0]
    good = dict(query=held["query"], candidates=[int(c) for c in held["candidate_ids"]])
    for kind, (request, message) in bad_requests(export_dir, limits).items():
        with pytest.raises(InferenceServerException) as err:
            infer(server, protocol, **request)
        assert message in str(err.value), f"{kind}: {err.value}"
        assert infer(server, protocol, **good)["TOP_IDS"].size > 0, f"a good request after {kind}"
    assert requests.get(f"http://{server['http']}/v2/health/ready", timeout=5).status_code == 200


def test_client_errors_are_invalid_argument(server, export_dir, limits):
    request, _ = bad_requests(export_dir, limits)["no candidates"]
    client = httpclient.InferenceServerClient(server["http"])
    with pytest.raises(InferenceServerException) as err:
        client.infer(ENSEMBLE, inputs(httpclient, request["query"], request["candidates"]))
    assert err.value.status() == "400"
    gclient = grpcclient.InferenceServerClient(server["grpc"])
    with pytest.raises(InferenceServerException) as err:
        gclient.infer(ENSEMBLE, inputs(grpcclient, request["query"], request["candidates"]))
    assert "INVALID_ARGUMENT" in str(err.value.status())


def test_bad_requests_mixed_into_a_batch_fail_alone(server, export_dir, reference, limits):
    """Concurrent good and bad requests share executes of the batched steps; only the bad fail."""
    held = json.loads((export_dir / "heldout_queries.json").read_text())
    bad = list(bad_requests(export_dir, limits).values())

    def send(i):
        if i % 3 == 0:
            request, message = bad[(i // 3) % len(bad)]
            try:
                infer(server, "http", **request)
            except InferenceServerException as e:
                return "error", message in str(e)
            return "answer", False
        h = held[i % len(held)]
        out = infer(server, "http", h["query"], [int(c) for c in h["candidate_ids"]])
        expected = reference.rank(h["query"], [int(c) for c in h["candidate_ids"]], limits["top_k_default"])
        return "answer", out["TOP_IDS"].reshape(-1).tolist() == [int(x) for x in expected[0]]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(send, range(60)))
    assert all(ok for _, ok in results), results
    assert sum(kind == "error" for kind, _ in results) == 20


def test_smoke_request_passes(server):
    inputs_, expected = smoke_request(server["repo"])
    assert expected is not None
    assert run_smoke(server["http"], server["repo"]) == []
    assert run_smoke(server["grpc"], server["repo"], protocol="grpc") == []
    wrong = dict(expected, top_ids=list(reversed(expected["top_ids"])))
    client = httpclient.InferenceServerClient(server["http"])
    result = client.infer(ENSEMBLE, to_infer_inputs(inputs_, httpclient))
    assert check_response({n: result.as_numpy(n) for n in OUTPUTS}, wrong) != [] or len(expected["top_ids"]) < 2


def test_only_the_latest_version_is_served(server):
    for model in ("query_intent", "ranker", ENSEMBLE):
        base = f"http://{server['http']}/v2/models/{model}"
        assert (server["repo"] / model / "1").is_dir() and (server["repo"] / model / "2").is_dir()
        assert requests.get(f"{base}/versions/2/ready", timeout=5).status_code == 200, model
        assert requests.get(f"{base}/versions/1/ready", timeout=5).status_code != 200, model


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_several_queries_in_one_request(server, export_dir, reference, protocol):
    """[B,1] queries with [B,N] candidates (equal N) in one request: one answer row per query."""
    held = json.loads((export_dir / "heldout_queries.json").read_text())
    n = min(len(h["candidate_ids"]) for h in held[:3])
    queries = [h["query"] for h in held[:3]]
    cands = np.array([h["candidate_ids"][:n] for h in held[:3]], dtype=np.int64)
    module = grpcclient if protocol == "grpc" else httpclient
    q = module.InferInput("QUERY", [3, 1], "BYTES")
    q.set_data_from_numpy(np.array([[x.encode()] for x in queries], dtype=object))
    c = module.InferInput("CANDIDATE_IDS", list(cands.shape), "INT64")
    c.set_data_from_numpy(cands)
    result = module.InferenceServerClient(server[protocol]).infer(ENSEMBLE, [q, c], parameters={"top_k": 4})
    for row in range(3):
        out = {name: result.as_numpy(name)[row:row + 1] for name in OUTPUTS}
        assert_same(out, reference.rank(queries[row], cands[row].tolist(), 4), f"row {row}")
