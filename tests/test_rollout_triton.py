"""The rollout controller on real Tritons: two instances of one site serve the `add_one` test model,
the controller scrapes their real `/metrics` (summary latencies on), the test plays the agents (loads
the version desired state asks for through Triton's repository API, writes the status to a real S3)
and sends real requests to both. v2 fails one request in four: the analysis must see it on the
canary against the stable instance of the same site and roll back, with the reason, by itself."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import requests
import tritonclient.http as th
from prometheus_client import CollectorRegistry

from control.adapters import s3 as s3x
from control.adapters.triton import TritonAdmin, TritonAdminError
from control.drills.models import ADD_ONE, write_add_model
from control.local.s3_endpoint import start_s3_server
from control.local.triton_server import start_triton
from control.mirror.desired import DesiredStore, InstanceStatus, ModelState
from control.mirror.publish import publish_version
from control.rollout.controller import from_settings
from control.rollout.phases import Phase, Reason, state_of
from control.rollout.signals import parse_models
from control.waiting import wait_until

M = ADD_ONE
SUMMARY = "--metrics-config=summary_latencies=true"


# v2 fails one request in four by RAISING from execute(): Triton 2.51 counts that in
# nv_inference_request_failure{reason="BACKEND"}. (An error *response* -- what
# control/drills/models.py's error_every returns -- is counted as a success by Triton's metrics:
# measured; the client sees the error, the counters do not.)
_FAILING_V2 = '''import os, sys
sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.seen = 0

    def execute(self, requests):
        self.seen += 1
        if self.seen % 4 == 0:
            raise pb_utils.TritonModelException("v2 broken on purpose")
        return [pb_utils.InferenceResponse([pb_utils.Tensor(
            "OUTPUT0", (pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy() + 2).astype(np.float32))])
            for r in requests]
'''


def _repo(root):
    write_add_model(root, version=1, add=1.0)
    write_add_model(root, version=2, add=2.0)
    (root / M / "2" / "model.py").write_text(_FAILING_V2)
    cfg = root / M / "config.pbtxt"
    cfg.write_text(cfg.read_text() + "version_policy: { specific: { versions: [ 1 ] } }\n")
    return root


@pytest.fixture
def fleet(settings_factory, tmp_path):
    settings = settings_factory(
        instances=(("onprem-1", "onprem", 50, True), ("onprem-2", "onprem", 50, True)),
        control={"rollout": dict(interval_s=1.5, analysis_window_s=4.5, max_failed_checks=2, min_requests=20,
                                 canary_step_weight=0, progress_deadline_s=60, status_stale_s=30)})
    repo = _repo(tmp_path / "repo")
    procs = [start_s3_server(settings)]
    try:
        for inst in settings.instances:
            procs.append(start_triton(inst.name, repo, inst.http_port, inst.grpc_port, inst.metrics_port,
                                      settings.run_path, load_models=(M,), ready_timeout=90, extra_args=[SUMMARY]))
        client = s3x.make_client(settings.s3)
        s3x.ensure_bucket(client, settings.s3)
        for v in (1, 2):
            publish_version(settings, repo, M, v, client=client)
        store = DesiredStore(client, settings.s3)
        store.update(lambda d: d.models.setdefault(M, ModelState(stable=1)) and d, by="setup")
        yield settings, client, store
    finally:
        for p in procs[::-1]:
            p.stop()


class PlayedAgent:
    """What the host agent does, reduced: load the target version through Triton's repository API,
    then report it."""

    def __init__(self, settings, inst, store):
        self.inst, self.store = inst, store
        self.admin = TritonAdmin(inst.name, inst.http_url, None)
        self.live = 1

    def report(self):
        d = self.store.read().state
        target = d.models[M].target(self.inst.name)
        entry = {"live": self.live, "target": target, "state": "live"}
        if target != self.live:
            cfg = self.admin.model_config(M)
            cfg["version_policy"] = {"specific": {"versions": [target]}}
            try:
                self.admin.load(M, cfg)
                self.live = entry["live"] = target
            except TritonAdminError as e:
                entry.update(state="failed", error=str(e))
        self.store.write_status(InstanceStatus(
            instance=self.inst.name, site=self.inst.site, at=time.time(), ready=entry["state"] == "live",
            metrics_url=self.inst.metrics_url, http_url=self.inst.http_url, models={M: entry}))


def _traffic(settings, stop: threading.Event, counts: dict):
    clients = {i.name: th.InferenceServerClient(i.http_url.split("://")[1]) for i in settings.instances}
    x = th.InferInput("INPUT0", [1, 4], "FP32")
    x.set_data_from_numpy(np.zeros((1, 4), dtype=np.float32))
    while not stop.is_set():
        for name, c in clients.items():
            try:
                c.infer(M, [x])
                counts[name] = counts.get(name, 0) + 1
            except th.InferenceServerException:
                counts[name + ":err"] = counts.get(name + ":err", 0) + 1


def test_a_real_canary_failing_one_request_in_four_is_rolled_back(fleet):
    settings, client, store = fleet
    agents = [PlayedAgent(settings, i, store) for i in settings.instances]
    reg = CollectorRegistry()
    ctl = from_settings(settings, client=client, registry=reg)
    stop, counts = threading.Event(), {}
    load = threading.Thread(target=_traffic, args=(settings, stop, counts), daemon=True)
    load.start()
    events = []
    try:
        def progressed():
            for a in agents:
                a.report()
            events.extend(ctl.tick())
            st = state_of(store.read().state.models.get(M), 0)
            return bool(events) and (st is None or st.phase == Phase.STOPPED)
        wait_until(progressed, 90, "the rollout of v2 to end")
    finally:
        stop.set()
        load.join(10)
        ctl.close()
    reasons = [(str(e.from_phase), str(e.to_phase), str(e.reason)) for e in events if e.from_phase != e.to_phase]
    assert reasons == [("idle", "published", "published"), ("published", "canary", "canary_chosen"),
                       ("canary", "analysis", "canary_live"), ("analysis", "rolled_back", "error_rate")], reasons
    last = events[-1]
    assert "onprem-1" in last.message and "on the stable instances of onprem" in last.message
    check = last.details["check"]["instances"][0]
    assert check["instance"] == "onprem-1" and check["baseline"]["instances"] == ["onprem-2"]
    ratio = check["canary"]["errors"] / check["canary"]["requests"]
    assert 0.2 < ratio < 0.3, check  # one in four, measured from Triton's own counters
    assert check["baseline"]["errors"] == 0 and check["canary"]["p99_ms"] is not None  # summary latencies on
    d = store.read().state
    assert d.models[M].stable == 1 and d.models[M].canary is None
    assert d.models[M].rejected[2].reason.startswith(str(Reason.ERROR_RATE))
    agents[0].report()
    assert agents[0].live == 1  # the played agent goes back to stable because desired state did
    assert counts.get("onprem-1:err", 0) > 0 and counts.get("onprem-2:err", 0) == 0
    assert reg.get_sample_value("triton_hybrid_rollout_transitions_total",
                                {"model": M, "from": "analysis", "to": "rolled_back", "reason": "error_rate"}) == 1


def test_real_metrics_page_parses_per_model(fleet):
    settings, _, _ = fleet
    inst = settings.instances[0]
    x = th.InferInput("INPUT0", [1, 4], "FP32")
    x.set_data_from_numpy(np.zeros((1, 4), dtype=np.float32))
    c = th.InferenceServerClient(inst.http_url.split("://")[1])
    for _ in range(5):
        c.infer(M, [x])
    text = requests.get(inst.metrics_url, timeout=5).text
    s = parse_models(text)[M].series(1)["1"]
    assert s["success"] == 5 and s["failure"] == 0 and s["duration_us"] > 0 and s["p99_us"] > 0
