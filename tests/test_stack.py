"""The local stack with every real component: S3 endpoint, publish + desired state, two hosts (a
Triton and its agent each; the agent alone writes the instance's repository), HAProxy. Inference through the proxy over HTTP and gRPC, the admin surface refused at the proxy,
one admin key per instance kept out of pid files and world-readable files, one Triton killed, a
second `up` starting only what is missing, `down` leaving nothing behind (also of a Triton killed
from outside). The supervisor is off here; tests/test_supervision.py covers it."""
import json
import os
import signal
import stat
import time

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from click.testing import CliRunner
from tritonclient.utils import InferenceServerException

from control.adapters import s3 as s3x
from control.cli import cli
from control.local import stack
from control.local.admin_keys import admin_key, ensure_agent_token, key_dir
from control.local.demo import MODEL, ensemble_inputs
from control.local.isolated import isolated_settings as make_settings
from control.local.procs import load_managed, managed_names, pid_alive
from control.local.procs import processes_in_group as group_of
from control.mirror.desired import DesiredStore
from control.waiting import wait_until
from export.reference import ReferencePipeline


@pytest.fixture(scope="module")
def live_stack(tmp_path_factory, cpu_repository, tiny_export):

    settings = make_settings(tmp_path_factory.mktemp("stack") / "run",
                             models={"repository_dir": str(cpu_repository), "exports_dir": str(tiny_export.parent)},
                             control={"start_daemon": False}, triton={"supervise": {"enabled": False}})
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
    h, key = settings.haproxy, admin_key(settings, settings.instances[0])
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
        agent = comps[f"agent-{inst.name}"]
        assert agent["healthy"] and agent["pid"] and agent["not_live"] == []
        assert agent["versions"][MODEL]["state"] == "live" and agent["versions"]["ranker"]["live"] == 1
    assert comps["haproxy"]["weights"]["be_triton_http"] == {i.name: i.weight for i in settings.instances}
    for inst in settings.instances:
        assert admin_key(settings, inst) not in result.output
        assert ensure_agent_token(settings, inst) not in result.output


def test_the_stack_wrote_no_file_of_an_instance_repository_its_agent_did(live_stack):
    """Desired state in S3 names every model's stable version; each agent reports it live, and the
    agent's config file names the secrets by file (mode 600), never inline."""
    settings, _ = live_stack
    store = DesiredStore(s3x.make_client(settings.s3), settings.s3)
    desired = store.read().state
    statuses, problems = store.statuses()
    assert not problems and desired.models[MODEL].stable == 1 and desired.updated_by == "triton-hybrid up"
    for inst in settings.instances:
        st = statuses[inst.name]
        assert st.ready and st.agent_url == inst.agent_url and st.site == inst.site
        assert {m: r["live"] for m, r in st.models.items()} == {m: s.stable for m, s in desired.models.items()}
        cfg = settings.run_path / "instances" / inst.name / "agent.yaml"
        assert stat.S_IMODE(cfg.stat().st_mode) == 0o600
        assert admin_key(settings, inst) not in cfg.read_text() and ensure_agent_token(settings, inst) not in cfg.read_text()


def test_status_table_fits_80_columns_when_piped(live_stack):
    """CliRunner's output is not a terminal: what `status | less` or a log shows, at rich's 80 columns."""
    settings, _ = live_stack
    result = CliRunner().invoke(cli, ["--config", settings.source, "status"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line.rstrip()) for line in lines) <= 80, result.output
    for name in [n for i in settings.instances for n in (i.name, f"agent-{i.name}")]:
        row = next(line for line in lines if line.startswith("│ " + name))  # nothing cut to "…"
        assert " healthy " in row and "…" not in result.output, result.output
    for inst in settings.instances:
        assert any(line.startswith(f"{inst.name}: ") and inst.http_url in line for line in lines)
    # the models line may fold over several lines at 80 columns; its content stays whole
    flat = " ".join(result.output.split())
    assert "models: " in flat and "search_ranking v" in flat, result.output


def test_each_instance_has_its_own_admin_key_that_opens_only_its_own_repository_api(live_stack):
    settings, _ = live_stack
    keys = {inst.name: admin_key(settings, inst) for inst in settings.instances}
    assert len(set(keys.values())) == len(keys)
    for inst in settings.instances:
        client = grpcclient.InferenceServerClient(inst.grpc_url)
        for name, key in keys.items():
            # Triton's gRPC side prefixes the header name of --grpc-restricted-protocol.
            headers = {"triton-grpc-protocol-admin-key": key}
            if name == inst.name:
                assert {m.name for m in client.get_model_repository_index(headers=headers).models} >= {MODEL}
            else:
                with pytest.raises(InferenceServerException, match="restricted"):
                    client.get_model_repository_index(headers=headers)
        http = httpclient.InferenceServerClient(inst.http_url.split("://", 1)[1])
        assert {m["name"] for m in http.get_model_repository_index(headers={"admin-key": keys[inst.name]})} >= {MODEL}
        other = next(k for n, k in keys.items() if n != inst.name)
        with pytest.raises(InferenceServerException, match="restricted"):
            http.get_model_repository_index(headers={"admin-key": other})


def test_no_key_in_pid_files_and_run_dir_private(live_stack):
    settings, _ = live_stack
    run = settings.run_path
    keys = [admin_key(settings, inst) for inst in settings.instances]
    pid_files = list((run / "pids").glob("*.json"))
    assert {p.stem for p in pid_files} >= {n for i in settings.instances for n in (i.name, f"agent-{i.name}")}
    for p in pid_files:
        assert not [k for k in keys if k in p.read_text()], p
    for p in pid_files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    assert (key_dir(settings) / f"{settings.instances[0].name}.admin-key").read_text() == keys[0]
    private = [run, run / "pids", run / "logs", key_dir(settings)]
    # (control.db appears with the daemon: checked in the `up` test below)
    files = [*key_dir(settings).iterdir(), *(run / "logs").glob("*.log"), *(run / "instances").glob("*/agent.yaml")]
    for path in private:
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


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


def test_up_with_some_components_running_starts_only_the_missing_ones(live_stack):
    settings, _ = live_stack
    before = {n: load_managed(settings.run_path, n).pid for n in stack.running_components(settings)}
    on, cloud = settings.instances
    # cloud-1 was killed above; its agent kept running (it reports the Triton unreachable).
    assert set(before) == {"s3", "haproxy", on.name, f"agent-{on.name}", f"agent-{cloud.name}"}
    st = stack.up(settings, with_control=True)  # e.g. after a crash, or to add the daemon
    assert sorted(st.kept) == sorted(before)
    assert sorted(p.name for p in st.procs) == sorted([cloud.name, "control"])
    after = {n: load_managed(settings.run_path, n).pid for n in stack.running_components(settings)}
    assert {n: after[n] for n in before} == before
    comps = {c["name"]: c for c in stack.status(settings)["components"]}
    assert all(comps[i.name]["healthy"] for i in settings.instances)
    assert comps["control"]["running"] and comps["control"]["healthy"]
    assert stat.S_IMODE(settings.database_path.stat().st_mode) == 0o600


def test_down_leaves_no_process_behind_also_of_a_triton_killed_from_outside(live_stack):
    settings, _ = live_stack
    procs = [p for n in managed_names(settings.run_path) if (p := load_managed(settings.run_path, n)) and p.alive]
    assert {p.name for p in procs} >= {"s3", "haproxy", settings.instances[0].name}
    groups = {p.pid: group_of(p.pid) for p in procs}
    # kill -9 of one Triton's server process alone; one of its stubs is frozen, as a stub busy in a
    # request is: it never notices the death and stays in the group (measured under load).
    victim = load_managed(settings.run_path, settings.instances[0].name)
    stub = next(m for m in groups[victim.pid] if m != victim.pid)
    os.kill(stub, signal.SIGSTOP)
    os.kill(victim.pid, signal.SIGKILL)
    # Reaped, as init reaps it when `up` ran from the CLI (here the test process is its parent).
    wait_until(lambda: not pid_alive(victim.pid), 10, "the killed server to be gone")
    stack.down(settings)
    assert not [pid for pids in groups.values() for pid in pids if pid_alive(pid)]
    assert stack.running_components(settings) == []
    assert managed_names(settings.run_path) == []
    assert (settings.run_path / "logs").is_dir()  # data kept
