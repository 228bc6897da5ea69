"""The local stack with every real component: S3 endpoint, publish + verified pull, two Tritons,
HAProxy. Inference through the proxy over HTTP and gRPC, the admin surface refused at the proxy,
one Triton killed, `down` leaving nothing behind."""
import json
import signal
import time

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from click.testing import CliRunner
from tritonclient.utils import InferenceServerException

from control.local import stack
from control.cli import cli
from control.local.demo import MODEL, ensemble_inputs
from control.local.procs import load_managed, pid_alive
from export.reference import ReferencePipeline


@pytest.fixture(scope="module")
def live_stack(tmp_path_factory, cpu_repository, tiny_export):
    from control.local.isolated import isolated_settings as make_settings

    settings = make_settings(tmp_path_factory.mktemp("stack") / "run",
                             models={"repository_dir": str(cpu_repository), "exports_dir": str(tiny_export.parent)},
                             control={"start_daemon": False})
    st = stack.up(settings)
    yield settings, st
    stack.down(settings)


def _query(tiny_export):
    q = json.loads((tiny_export / "heldout_queries.json").read_text())[0]
    return q["query"], q["candidate_ids"]


def test_http_and_grpc_through_haproxy_return_the_models_answer(live_stack, tiny_export):
    settings, _ = live_stack
    h = settings.haproxy
    query, cands = _query(tiny_export)
    want_ids, want_scores, want_intent, _ = ReferencePipeline(tiny_export).rank(query, np.asarray(cands), 5)
    http = httpclient.InferenceServerClient(f"{h.host}:{h.http_port}")
    grpc = grpcclient.InferenceServerClient(f"{h.host}:{h.grpc_port}")
    for module, client in ((httpclient, http), (grpcclient, grpc)):
        r = client.infer(MODEL, ensemble_inputs(module, query, cands, 5))
        assert r.as_numpy("TOP_IDS").reshape(-1).tolist() == list(want_ids)
        np.testing.assert_allclose(r.as_numpy("TOP_SCORES").reshape(-1), want_scores, atol=1e-4)
        intent = r.as_numpy("INTENT").reshape(-1)[0]
        assert (intent.decode() if isinstance(intent, bytes) else intent) == want_intent


def test_repository_api_refused_at_proxy_allowed_with_admin_key_on_instance(live_stack):
    settings, _ = live_stack
    h, key = settings.haproxy, settings.triton.admin_key.get_secret_value()
    proxied = requests.post(f"http://{h.host}:{h.http_port}/v2/repository/index", headers={"admin-key": key})
    assert proxied.status_code == 403
    for path in ("/v2/repository/models/ranker/unload", "/v2/logging", "/v2/trace/setting",
                 "/v2/systemsharedmemory/status", "/v2/models/ranker/trace/setting"):
        assert requests.post(f"http://{h.host}:{h.http_port}{path}", json={}, headers={"admin-key": key}).status_code == 403, path
    grpc = grpcclient.InferenceServerClient(f"{h.host}:{h.grpc_port}", )
    with pytest.raises(InferenceServerException, match="403|PERMISSION"):
        grpc.get_model_repository_index(headers={"admin-key": key})
    inst = settings.instances[0]
    assert requests.post(f"{inst.http_url}/v2/repository/index").status_code in (401, 403)
    direct = requests.post(f"{inst.http_url}/v2/repository/index", headers={"admin-key": key})
    assert direct.status_code == 200
    assert {m["name"] for m in direct.json()} >= {MODEL, "ranker", "query_intent"}


def test_status_json_shows_components_models_and_weights(live_stack):
    settings, _ = live_stack
    result = CliRunner().invoke(cli, ["--config", settings.source, "status", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    st = json.loads(result.output)
    comps = {c["name"]: c for c in st["components"]}
    for inst in settings.instances:
        assert comps[inst.name]["healthy"] and comps[inst.name]["pid"]
        assert MODEL in comps[inst.name]["models"]
        assert comps[inst.name]["sync_lag_versions"] == 0
        assert {r["model"] for r in comps[inst.name]["sync"]} >= {MODEL, "ranker"}
    assert comps["haproxy"]["weights"]["be_triton_http"] == {i.name: i.weight for i in settings.instances}
    assert settings.triton.admin_key.get_secret_value() not in result.output


def test_killed_triton_is_unhealthy_and_requests_still_succeed(live_stack, tiny_export):
    settings, _ = live_stack
    h = settings.haproxy
    victim = settings.instances[1]
    proc = load_managed(settings.run_path, victim.name)
    proc.signal(signal.SIGKILL)
    deadline = time.monotonic() + 5
    while pid_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    query, cands = _query(tiny_export)
    http = httpclient.InferenceServerClient(f"{h.host}:{h.http_port}")
    grpc = grpcclient.InferenceServerClient(f"{h.host}:{h.grpc_port}")
    for i in range(40):  # both protocols, straight after the kill: retries + redispatch cover it
        module, client = (httpclient, http) if i % 2 else (grpcclient, grpc)
        client.infer(MODEL, ensemble_inputs(module, query, cands, 3))
    comps = {c["name"]: c for c in stack.status(settings)["components"]}
    assert comps[victim.name]["healthy"] is False and comps[victim.name]["running"] is False
    assert comps[settings.instances[0].name]["healthy"] is True


def test_down_leaves_no_process_behind(live_stack):
    settings, _ = live_stack
    pids = [p.pid for n in ("s3", "haproxy", *[i.name for i in settings.instances])
            if (p := load_managed(settings.run_path, n)) and p.alive]
    assert pids
    stack.down(settings)
    assert not [pid for pid in pids if pid_alive(pid)]
    assert stack.running_components(settings) == []
    assert (settings.run_path / "logs").is_dir()  # data kept

