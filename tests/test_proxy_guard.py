"""The client-facing proxy's request guard (issue 15; deploy/haproxy/request_guard.lua): real Tritons
serving the search_ranking repository behind the real HAProxy.

- Query of death: a request declaring a huge shape with little data (it aborts Triton 2.51 over
  HTTP/JSON) is refused with a 400 naming the input and the limit, over HTTP/JSON, HTTP binary
  tensors and gRPC; nothing crashes.
- Retry budget: with the guard off, such a request crashes the server it reaches and is not
  re-sent to the other one (no `retry-on empty-response`).
- Allowlist: health, server metadata and infer/ready/metadata/config/stats of the served models;
  step models, unknown models and Triton's admin APIs are refused (403) over HTTP and gRPC.
"""
from __future__ import annotations

import json
import struct
import subprocess
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from pydantic import ValidationError
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from bench import perf
from control.adapters.haproxy_config import (
    GUARD_FILE,
    GUARD_SCRIPT,
    install_guard,
    render,
)
from control.adapters.haproxy_runtime import HAProxyRuntime
from control.config import PROJECT_ROOT, HAProxyConfig
from control.local.admin_keys import admin_key
from control.local.demo import MODEL, ensemble_inputs
from control.local.haproxy import haproxy_binary, start_haproxy
from control.local.isolated import isolated_settings
from control.local.procs import free_port, http_ok
from control.local.triton_server import start_instance
from control.waiting import wait_until

QOD_BODY = {"inputs": [
    {"name": "QUERY", "datatype": "BYTES", "shape": [1, 1], "data": ["x"]},
    {"name": "CANDIDATE_IDS", "datatype": "INT64", "shape": [1, 1000000000000], "data": [1, 2, 3, 4]}]}
QOD_ERROR = ("input CANDIDATE_IDS: declared shape [1,1000000000000] has 1000000000000 elements, "
             "limit 8000 (haproxy.limits.max_elements)")


@pytest.fixture(scope="module")
def tritons(tmp_path_factory, cpu_repository):
    """Two Tritons (onprem-1, cloud-1, weights 50/50) on the repository; restarted by `revive`."""
    run = tmp_path_factory.mktemp("guard") / "run"
    settings = isolated_settings(run, instances=(("onprem-1", "onprem", 50, True), ("cloud-1", "cloud", 50, False)),
                                 models={"repository_dir": str(cpu_repository)})
    procs = {i.name: start_instance(settings, i, cpu_repository, ready_timeout=120) for i in settings.instances}

    def revive():
        for i in settings.instances:
            if not procs[i.name].alive:
                procs[i.name].stop()
                procs[i.name] = start_instance(settings, i, cpu_repository, ready_timeout=120)

    yield settings, procs, revive
    for p in procs.values():
        p.stop()


@contextmanager
def proxy(settings, run_dir: Path, **haproxy):
    """A HAProxy of its own (ports, run dir) in front of the test's Tritons, once both are UP."""
    h = settings.haproxy.model_copy(update={"http_port": free_port(), "grpc_port": free_port(),
                                            "stats_port": free_port(), **haproxy})
    s = settings.model_copy(update={"run_dir": str(run_dir), "haproxy": h})
    s.run_path.mkdir(parents=True, exist_ok=True)
    proc = start_haproxy(s)
    try:
        rt = HAProxyRuntime.for_settings(s)
        wait_until(lambda: all(x.up for x in rt.servers()), 30, "every server UP in HAProxy")
        yield s
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def guarded(tritons, tmp_path_factory):
    settings, _, _ = tritons
    with proxy(settings, tmp_path_factory.mktemp("hp") / "g") as s:
        yield s


def http_url(s) -> str:
    return f"http://{s.haproxy.host}:{s.haproxy.http_port}"


def grpc_stub(s):
    return service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(f"{s.haproxy.host}:{s.haproxy.grpc_port}"))


def held_query(tiny_export):
    q = json.loads((tiny_export / "heldout_queries.json").read_text())[0]
    return q["query"], q["candidate_ids"]


def assert_all_alive(tritons):
    settings, procs, _ = tritons
    for i in settings.instances:
        assert procs[i.name].alive, f"{i.name} crashed"
        assert http_ok(f"{i.http_url}/v2/health/ready"), f"{i.name} not ready"


def infer_request(shape, n_data, raw=True, model=MODEL):
    """A gRPC ModelInferRequest with CANDIDATE_IDS declared as `shape` and n_data values."""
    req = service_pb2.ModelInferRequest(model_name=model)
    q = service_pb2.ModelInferRequest.InferInputTensor(name="QUERY", datatype="BYTES", shape=[1, 1])
    c = service_pb2.ModelInferRequest.InferInputTensor(name="CANDIDATE_IDS", datatype="INT64", shape=shape)
    if raw:
        req.inputs.extend([q, c])
        req.raw_input_contents.extend([struct.pack("<I", 1) + b"x", struct.pack(f"<{n_data}q", *range(n_data))])
    else:
        q.contents.bytes_contents.append(b"x")
        c.contents.int64_contents.extend(range(n_data))
        req.inputs.extend([q, c])
    return req


def binary_body(shape, n_data, declared_size=None):
    hdr = json.dumps({"inputs": [
        {"name": "QUERY", "datatype": "BYTES", "shape": [1, 1], "parameters": {"binary_data_size": 5}},
        {"name": "CANDIDATE_IDS", "datatype": "INT64", "shape": shape,
         "parameters": {"binary_data_size": 8 * n_data if declared_size is None else declared_size}}]}).encode()
    return hdr + struct.pack("<I", 1) + b"x" + struct.pack(f"<{n_data}q", *range(n_data)), len(hdr)


# Query of death ---------------------------------------------------------------------------------------

def test_query_of_death_over_http_json_is_refused_and_nothing_crashes(guarded, tritons):
    r = requests.post(f"{http_url(guarded)}/v2/models/{MODEL}/infer", json=QOD_BODY, timeout=10)
    assert r.status_code == 400
    assert r.json() == {"error": QOD_ERROR}
    assert_all_alive(tritons)


def test_query_of_death_over_http_binary_is_refused(guarded, tritons):
    body, n = binary_body([1, 10**12], 4, declared_size=32)
    r = requests.post(f"{http_url(guarded)}/v2/models/{MODEL}/infer", data=body, timeout=10,
                      headers={"Inference-Header-Content-Length": str(n)})
    assert r.status_code == 400 and r.json() == {"error": QOD_ERROR}
    assert_all_alive(tritons)


@pytest.mark.parametrize("raw", [True, False], ids=["raw_input_contents", "typed_contents"])
def test_query_of_death_over_grpc_gets_an_error_and_no_crash(guarded, tritons, raw):
    # Straight to a Triton: its gRPC path checks byte sizes itself (DESIGN.md fact 15).
    inst = tritons[0].instances[0]
    direct = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(inst.grpc_url))
    with pytest.raises(grpc.RpcError) as e:
        direct.ModelInfer(infer_request([1, 10**12], 4, raw=raw), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "byte size" in e.value.details()
    # Through the proxy: refused there, with the limit.
    with pytest.raises(grpc.RpcError) as e:
        grpc_stub(guarded).ModelInfer(infer_request([1, 10**12], 4, raw=raw), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details() == QOD_ERROR
    assert_all_alive(tritons)


@pytest.mark.parametrize("shape,n,want", [
    ([1, 5], 4, "input CANDIDATE_IDS: declared shape [1,5] has 5 elements, data has 4"),
    ([9, 1], 9, "input CANDIDATE_IDS: declared shape [9,1] has batch size 9, limit 8 (haproxy.limits.max_batch)"),
    ([1, 1001], 1001, "input CANDIDATE_IDS: declared shape [1,1001] has 1001 candidates per query, limit 1000 "
                      "(haproxy.limits.max_candidates)"),
    ([1, -4], 4, "input CANDIDATE_IDS: declared shape [1,-4] has a dimension that is not a non-negative integer"),
    # the product overflows 64 bits: still refused
    ([2 ** 32, 2 ** 32], 4, "input CANDIDATE_IDS: declared shape [4294967296,4294967296] has "
                            "1.8446744073709552e+19 elements, limit 8000 (haproxy.limits.max_elements)"),
])
def test_declared_shape_is_checked_against_limits_and_data_over_http_json(guarded, tritons, shape, n, want):
    body = {"inputs": [QOD_BODY["inputs"][0],
                       {"name": "CANDIDATE_IDS", "datatype": "INT64", "shape": shape, "data": list(range(n))}]}
    r = requests.post(f"{http_url(guarded)}/v2/models/{MODEL}/infer", json=body, timeout=10)
    assert (r.status_code, r.json()) == (400, {"error": want})


def test_binary_sizes_must_agree_with_the_declared_shape(guarded):
    url = f"{http_url(guarded)}/v2/models/{MODEL}/infer"
    body, n = binary_body([1, 5], 4, declared_size=32)
    r = requests.post(url, data=body, headers={"Inference-Header-Content-Length": str(n)}, timeout=10)
    assert r.status_code == 400
    assert r.json()["error"] == ("input CANDIDATE_IDS: binary_data_size is 32 bytes, but the declared shape holds "
                                 "5 INT64 elements = 40 bytes")
    body, n = binary_body([1, 4], 4)
    r = requests.post(url, data=body + b"extra", headers={"Inference-Header-Content-Length": str(n)}, timeout=10)
    assert r.status_code == 400 and "the body carries 42 after the JSON header" in r.json()["error"]


def test_grpc_contents_must_agree_with_the_declared_shape(guarded):
    with pytest.raises(grpc.RpcError) as e:
        grpc_stub(guarded).ModelInfer(infer_request([1, 5], 4), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details() == ("input CANDIDATE_IDS: raw_input_contents is 32 bytes, but the declared shape "
                                 "holds 5 INT64 elements = 40 bytes")
    with pytest.raises(grpc.RpcError) as e:
        grpc_stub(guarded).ModelInfer(infer_request([1, 5], 4, raw=False), timeout=10)
    assert e.value.details() == "input CANDIDATE_IDS: declared shape [1,5] has 5 elements, contents has 4"


def test_bodies_over_the_limit_are_refused(guarded):
    r = requests.post(f"{http_url(guarded)}/v2/models/{MODEL}/infer", data=b"x" * 300_000, timeout=10)
    assert r.status_code == 413
    assert r.json()["error"] == "request body is 300000 bytes, limit 262144 (haproxy.limits.max_body_bytes)"


def test_bad_json_is_refused_not_passed_on(guarded):
    url = f"{http_url(guarded)}/v2/models/{MODEL}/infer"
    for body, want in ((b"not json", "not valid JSON"), (b'{"inputs": 1}', '"inputs" list'),
                       (b"[" * 100 + b"]" * 100, "nested deeper")):
        r = requests.post(url, data=body, timeout=10)
        assert r.status_code == 400 and want in r.json()["error"], (body[:20], r.text)


def test_valid_requests_pass_over_every_form(guarded, tiny_export):
    query, cands = held_query(tiny_export)
    for module, url in ((httpclient, http_url(guarded).split("//")[1]),
                        (grpcclient, f"{guarded.haproxy.host}:{guarded.haproxy.grpc_port}")):
        client = module.InferenceServerClient(url)
        res = client.infer(MODEL, ensemble_inputs(module, query, cands, 3))  # binary tensors (tritonclient)
        assert len(res.as_numpy("TOP_IDS")[0]) == 3
    # JSON data, nested as the shape ([[...]]), with escapes in the query string
    body = {"inputs": [{"name": "QUERY", "datatype": "BYTES", "shape": [1, 1], "data": [[query + ' \\"\u00e9']]},
                       {"name": "CANDIDATE_IDS", "datatype": "INT64", "shape": [1, len(cands)], "data": [cands]}]}
    r = requests.post(f"{http_url(guarded)}/v2/models/{MODEL}/infer", json=body, timeout=10)
    assert r.status_code == 200, r.text
    # At the limits: reaches Triton (whatever it answers, the guard did not refuse it)
    many = (cands * (1000 // len(cands) + 1))[:1000]
    body["inputs"][1].update(shape=[1, 1000], data=many)
    r = requests.post(f"{http_url(guarded)}/v2/models/{MODEL}/infer", json=body, timeout=30)
    assert "haproxy.limits" not in r.text, r.text


# Allowlist ------------------------------------------------------------------------------------------

ALLOWED_GET = ["/v2/health/ready", "/v2/health/live", "/v2", f"/v2/models/{MODEL}", f"/v2/models/{MODEL}/ready",
               f"/v2/models/{MODEL}/config", f"/v2/models/{MODEL}/stats", f"/v2/models/{MODEL}/versions/1/stats",
               # read-only: perf_analyzer parses the ensemble's steps and asks for every model's statistics
               "/v2/models/ranker/config", "/v2/models/stats"]
REFUSED = [("POST", "/v2/models/preprocess/infer"), ("POST", "/v2/models/preprocess/versions/1/infer"),
           ("POST", "/v2/models/ranker/infer"), ("GET", "/v2/models/nope/config"), ("POST", "/v2/models/nope/infer"),
           ("POST", "/v2/repository/index"), ("POST", "/v2/repository/models/ranker/unload"),
           ("GET", "/v2/logging"), ("POST", "/v2/trace/setting"), ("GET", "/v2/systemsharedmemory/status"),
           ("GET", "/v2/cudasharedmemory/status"), ("POST", f"/v2/models/{MODEL}/trace/setting"),
           ("POST", f"/v2/models/{MODEL}/generate"), ("GET", f"/v2/models/{MODEL}/infer"),
           ("POST", f"/v2/models/{MODEL}/config"), ("GET", "/metrics"), ("GET", "/v2/models/pre%70rocess/infer"),
           ("POST", "/v2/health/ready")]


def test_http_allowlist(guarded, tritons):
    for path in ALLOWED_GET:
        assert requests.get(f"{http_url(guarded)}{path}", timeout=10).status_code == 200, path
    key = admin_key(tritons[0], tritons[0].instances[0])
    for method, path in REFUSED:
        r = requests.request(method, f"{http_url(guarded)}{path}", json={"inputs": []}, timeout=10,
                             headers={"admin-key": key})
        assert r.status_code == 403, (method, path, r.status_code, r.text)
        assert "not served through this proxy" in r.json()["error"], (method, path, r.text)
    r = requests.post(f"{http_url(guarded)}/v2/models/preprocess/infer", json={}, timeout=10)
    assert "internal step" in r.json()["error"] and MODEL in r.json()["error"]


GRPC_REFUSED = [
    ("RepositoryIndex", service_pb2.RepositoryIndexRequest()),
    ("RepositoryModelUnload", service_pb2.RepositoryModelUnloadRequest(model_name="ranker")),
    ("LogSettings", service_pb2.LogSettingsRequest()),
    ("TraceSetting", service_pb2.TraceSettingRequest()),
    ("SystemSharedMemoryStatus", service_pb2.SystemSharedMemoryStatusRequest()),
    ("CudaSharedMemoryStatus", service_pb2.CudaSharedMemoryStatusRequest()),
    ("ModelReady", service_pb2.ModelReadyRequest(name="nope")),
    ("ModelConfig", service_pb2.ModelConfigRequest(name="nope")),
]


def test_grpc_allowlist(guarded, tritons, tiny_export):
    stub = grpc_stub(guarded)
    for method, req in GRPC_REFUSED:
        with pytest.raises(grpc.RpcError) as e:
            getattr(stub, method)(req, timeout=10)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED, (method, e.value)
        assert "not served through this proxy" in e.value.details(), (method, e.value.details())
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelInfer(infer_request([1, 4], 4, model="preprocess"), timeout=10)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and '"preprocess"' in e.value.details()
    # Allowed: what Triton's own clients call (tritonclient, perf_analyzer)
    client = grpcclient.InferenceServerClient(f"{guarded.haproxy.host}:{guarded.haproxy.grpc_port}")
    assert client.is_server_live() and client.is_server_ready() and client.get_server_metadata().version
    assert client.is_model_ready(MODEL) and client.get_model_metadata(MODEL).name == MODEL
    assert client.get_model_config(MODEL).config.name == MODEL
    assert client.get_inference_statistics(MODEL).model_stats[0].name == MODEL
    assert client.get_model_config("ranker").config.name == "ranker"  # read-only step config
    with pytest.raises(InferenceServerException, match="PERMISSION_DENIED"):
        client.get_model_repository_index()


def test_perf_analyzer_works_through_the_proxy(guarded, tiny_export):

    try:
        perf.install()
    except Exception as e:  # noqa: BLE001 - a missing download, not a missing feature
        pytest.skip(f"perf_analyzer could not be installed here: {e}")
    query, cands = held_query(tiny_export)
    data = perf.input_data([{"query": query, "candidate_ids": cands}])
    for proto, port in (("grpc", guarded.haproxy.grpc_port), ("http", guarded.haproxy.http_port)):
        try:
            r = perf.measure(f"{guarded.haproxy.host}:{port}", 1, data, proto, 1000)
        except perf.PerfError as e:
            assert "not served through this proxy" not in str(e), str(e)[-800:]
            raise
        assert r["throughput"] > 0, (proto, r)


# Retry budget (guard off: what reaches a Triton) --------------------------------------------------------

def test_a_request_that_crashed_a_server_is_not_resent_to_the_other(tritons, tmp_path, tiny_export):
    settings, procs, revive = tritons
    try:
        with proxy(settings, tmp_path / "off", guard=False) as s:
            assert "lua" not in (s.run_path / "haproxy.cfg").read_text()
            try:
                r = requests.post(f"{http_url(s)}/v2/models/{MODEL}/infer", json=QOD_BODY, timeout=30)
                answered = r.status_code
            except requests.RequestException as e:
                answered = type(e).__name__
            wait_until(lambda: sum(not p.alive for p in procs.values()) >= 1, 15, "one Triton crashed")
            # The other one survives and answers: the request was not re-sent after the first one
            # dropped it (the client's answer came after any re-send, so a second crash is under way).
            alive = [i for i in settings.instances if procs[i.name].alive]
            assert len(alive) == 1, f"both Tritons crashed: the query of death was re-sent (answer {answered})"
            query, cands = held_query(tiny_export)
            client = httpclient.InferenceServerClient(alive[0].http_url.split("//")[1])
            assert len(client.infer(MODEL, ensemble_inputs(httpclient, query, cands, 3)).as_numpy("TOP_IDS")[0]) == 3
            assert procs[alive[0].name].alive
            assert answered != 200
    finally:
        revive()


# Config ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("keyword", ["empty-response", "junk-response", "all-retryable-errors"])
def test_config_refuses_retrying_a_request_the_server_dropped(keyword):
    with pytest.raises(ValidationError, match="query of death"):
        HAProxyConfig(retry_on=["conn-failure", keyword])


def test_rendered_config_carries_the_limits_and_is_valid(tmp_path):
    s = isolated_settings(tmp_path / "run", haproxy={"limits": {"max_elements": 5000, "max_candidates": 500},
                                                     "served_models": ["search_ranking", "other"]})
    cfg = render(s)
    for line in ("setenv TRITON_HYBRID_GUARD_MAX_ELEMENTS 5000", "setenv TRITON_HYBRID_GUARD_MAX_CANDIDATES 500",
                 "setenv TRITON_HYBRID_GUARD_MODELS search_ranking,other", f"lua-load {GUARD_FILE}",
                 "http-request lua.guard_http", "http-request lua.guard_grpc", "retries 1",
                 "retry-on conn-failure response-timeout 0rtt-rejected 503 504"):
        assert line in cfg, line
    (tmp_path / "haproxy.cfg").write_text(cfg)
    install_guard(tmp_path)
    done = subprocess.run([haproxy_binary(s), "-c", "-f", str(tmp_path / "haproxy.cfg")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_one_guard_script_for_every_deployment():
    # The k8s ConfigMap can only take files below its kustomization: the one copy lives there.
    lb_hosts = PROJECT_ROOT / "deploy" / "haproxy" / GUARD_FILE
    assert lb_hosts.is_symlink() and lb_hosts.resolve() == GUARD_SCRIPT.resolve()
    assert "lua-load request_guard.lua" in (PROJECT_ROOT / "deploy" / "haproxy" / "haproxy.cfg").read_text()
