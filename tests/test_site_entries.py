"""A client entry per site (issue 16; docs/traffic.md "Site entries"): real processes throughout:
moto's S3 server, two Tritons (onprem-1 answers INPUT0 + 1, cloud-1 INPUT0 + 100, so a client sees
which one served it), two HAProxies (the on-prem and the cloud entry, each listing both sites' Tritons,
its own first) and an entry agent beside each (`triton-hybrid entry`, its own process).

- The leader writes the weights once (traffic.json in S3); both entries' HAProxies get them.
- A sensitive request at the cloud entry is served on-prem; with the on-prem Triton stopped it gets a
  503 with the reason, and the cloud Triton never serves one (its own request counter).
- With S3 gone, an entry whose HAProxy and agent both restart gets the last weights again (state file).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import requests
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from control.adapters import haproxy_config
from control.adapters import s3 as s3x
from control.adapters.haproxy_runtime import HAProxyRuntime
from control.config import load_config, plain_dump
from control.daemon.controller import Controller
from control.daemon.metrics import ControlMetrics
from control.drills.models import ADD_ONE, write_add_model
from control.drills.load import OpenLoopLoad, auto_spec
from control.local.haproxy import haproxy_binary, start_haproxy
from control.local.isolated import isolated_settings
from control.local.procs import free_port, http_ok, processes_in_group, start_ready
from control.local.s3_endpoint import start_s3_server
from control.local.triton_server import start_triton
from control.mirror.desired import DesiredStateError
from control.leader.gate import NotLeader
from control.traffic.actuators import ActuatorError, Plan
from control.traffic.entries import EntriesActuator, TrafficState, TrafficStore
from control.waiting import wait_until

ADD = {"onprem-1": 1.0, "cloud-1": 100.0}
TOKEN = "entry-test-token"
SENSITIVE = {"X-Data-Sensitive": "1"}


def served_by(output: float, x: float = 1.0) -> str:
    return next(n for n, a in ADD.items() if abs(output - (x + a)) < 1e-3)


class Sites:
    def __init__(self, tmp_path):
        self.tmp = tmp_path
        self.settings = isolated_settings(
            tmp_path / "run", instances=(("onprem-1", "onprem", 50, True), ("cloud-1", "cloud", 50, False)),
            haproxy={"served_models": [ADD_ONE]})
        self.procs: dict = {}
        self.entries: dict[str, object] = {}    # site -> settings of that entry

    def start_s3(self):
        self.procs["s3"] = start_s3_server(self.settings)
        self.client = s3x.make_client(self.settings.s3, connect_timeout=1.0, read_timeout=2.0)
        s3x.ensure_bucket(self.client, self.settings.s3)
        self.store = TrafficStore(self.client, self.settings.s3)

    def start_triton(self, name: str):
        i = self.settings.instance(name)
        repo = self.tmp / f"repo-{name}"
        if not repo.exists():
            write_add_model(repo, 1, ADD[name])
        self.procs[name] = start_triton(name, repo, i.http_port, i.grpc_port, i.metrics_port,
                                        self.settings.run_path, ready_timeout=120)

    def entry_settings(self, site: str):
        if site not in self.entries:
            s = self.settings
            data = plain_dump(s)
            data.pop("source")
            data["run_dir"] = str(self.tmp / f"entry-{site}")
            data["haproxy"].update({"http_port": free_port(), "grpc_port": free_port(), "stats_port": free_port()})
            data["entry"] = {"site": site, "name": "lb-1", "interval_s": 0.2, "api_port": free_port(),
                             "token": TOKEN, "report_stale_s": 10.0}
            path = self.tmp / f"entry-{site}.yaml"
            path.touch(mode=0o600)
            path.write_text(yaml.safe_dump(data))
            self.entries[site] = load_config(path, environ={})
        return self.entries[site]

    def start_haproxy(self, site: str):
        s = self.entry_settings(site)
        s.run_path.mkdir(parents=True, exist_ok=True)
        self.procs[f"haproxy-{site}"] = start_haproxy(s, site=site)

    def start_agent(self, site: str):
        s = self.entry_settings(site)
        api = f"http://127.0.0.1:{s.entry.api_port}"
        self.procs[f"entry-{site}"] = start_ready(
            f"entry-{site}", [sys.executable, "-m", "control.cli", "--config", s.source, "entry"], s.run_path,
            lambda: http_ok(f"{api}/ready"), 30, "ready (/ready)")

    def start_two_entries(self) -> None:
        """S3, both Tritons, and per site its HAProxy + entry agent, every server UP."""
        self.start_s3()
        for name in ADD:
            self.start_triton(name)
        for site in ("onprem", "cloud"):
            self.start_haproxy(site)
            self.start_agent(site)
            wait_until(lambda site=site: all(x.up for x in self.runtime(site).servers()), 30, f"{site} entry: all UP")

    def stop(self, name: str):
        p = self.procs.pop(name, None)
        if p is not None:
            p.stop()

    def runtime(self, site: str) -> HAProxyRuntime:
        return HAProxyRuntime(haproxy_config.socket_path(self.entry_settings(site)))

    def weights(self, site: str) -> dict[str, int]:
        return {s.server: s.weight for s in self.runtime(site).servers(haproxy_config.HTTP_BACKEND)}

    def status(self, site: str) -> dict:
        s = self.entry_settings(site)
        return requests.get(f"http://127.0.0.1:{s.entry.api_port}/v1/status",
                            headers={"Authorization": f"Bearer {TOKEN}"}, timeout=2).json()

    def infer(self, site: str, headers: dict | None = None) -> requests.Response:
        h = self.entry_settings(site).haproxy
        body = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 4], "data": [1.0] * 4}]}
        return requests.post(f"http://{h.host}:{h.http_port}/v2/models/{ADD_ONE}/infer", json=body,
                             headers=headers or {}, timeout=5)

    def successes(self, name: str) -> float:
        text = requests.get(self.settings.instance(name).metrics_url, timeout=2).text
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == "nv_inference_request_success" and s.labels.get("model") == ADD_ONE)

    def close(self):
        for name in list(self.procs)[::-1]:
            self.stop(name)


@pytest.fixture
def sites(tmp_path):
    s = Sites(tmp_path)
    try:
        yield s
    finally:
        s.close()


def test_site_entry_config_lists_its_own_site_first_and_pins_sensitive_to_onprem(tmp_path):
    s = isolated_settings(tmp_path / "run", instances=(("onprem-1", "onprem", 50, True),
                                                       ("cloud-1", "cloud", 50, False)), write_file=False)

    def servers(text: str, backend: str) -> list[str]:
        lines = text.split(f"\nbackend {backend}\n", 1)[1].splitlines()
        block = lines[:next((k for k, ln in enumerate(lines) if ln and not ln[0].isspace()), len(lines))]
        return [ln.split()[1] for ln in block if ln.strip().startswith("server ")]

    cloud, onprem = haproxy_config.render(s, site="cloud"), haproxy_config.render(s, site="onprem")
    assert servers(cloud, "be_triton_http") == ["cloud-1", "onprem-1"]
    assert servers(onprem, "be_triton_grpc") == ["onprem-1", "cloud-1"]
    for text in (cloud, onprem):
        assert servers(text, "be_onprem_http") == ["onprem-1"] and servers(text, "be_onprem_grpc") == ["onprem-1"]
        assert f"hdr {haproxy_config.REASON_HEADER} {haproxy_config.SENSITIVE_503_REASON}" in text
        # The runtime API is a unix socket only; the stats frontend has no admin level.
        assert "level admin" in text and "stats admin" not in text
    assert haproxy_config.render(s) == haproxy_config.render(s, site=None)


def test_traffic_writes_are_fenced_by_generation(sites):
    sites.start_s3()
    old = EntriesActuator(sites.store, sites.settings.instances, by="old", generation=lambda: 1)
    new = EntriesActuator(sites.store, sites.settings.instances, by="new", generation=lambda: 2)
    old.apply(Plan({"onprem": 50, "cloud": 50}, {"onprem-1": 50, "cloud-1": 50}))
    res = new.apply(Plan({"onprem": 80, "cloud": 20}, {"onprem-1": 80, "cloud-1": 20}))
    assert res.commands and "revision 2" in res.commands[0]
    assert new.apply(Plan({"onprem": 80, "cloud": 20}, {"onprem-1": 80, "cloud-1": 20})).commands == []
    with pytest.raises(ActuatorError, match="generation 2; this writer has 1"):
        old.apply(Plan({"onprem": 0, "cloud": 100}, {"onprem-1": 0, "cloud-1": 100}))
    st = sites.store.read().state
    assert (st.revision, st.generation, st.instance_weights) == (2, 2, {"onprem-1": 80, "cloud-1": 20})
    # The daemon's gate: a control plane that lost its lease mid-tick writes nothing.
    def standby() -> int:
        raise NotLeader("this control plane (b@cloud) is standby; the leader is a@onprem: send changes there")
    lost = EntriesActuator(sites.store, sites.settings.instances, by="new", generation=standby)
    with pytest.raises(ActuatorError, match="not writing .*traffic.json: this control plane .* is standby"):
        lost.apply(Plan({"onprem": 0, "cloud": 100}, {"onprem-1": 0, "cloud-1": 100}))
    assert sites.store.read().state.revision == 2
    # A damaged object is refused by name, never half-read.
    sites.client.put_object(Bucket=sites.settings.s3.bucket, Key=sites.store.key, Body=b"{}")
    with pytest.raises(DesiredStateError, match="traffic.json: sha256"):
        sites.store.read()


@pytest.mark.slow
def test_weights_reach_both_entries_and_sensitive_requests_never_reach_the_cloud(sites):
    sites.start_two_entries()
    assert sites.weights("cloud") == {"onprem-1": 50, "cloud-1": 50}   # config weights until decided

    # The leader writes once; both entries apply it.
    leader = EntriesActuator(sites.store, sites.settings.instances, by="leader", generation=lambda: 1)
    t0 = time.monotonic()
    leader.apply(Plan({"onprem": 80, "cloud": 20}, {"onprem-1": 80, "cloud-1": 20}))
    want = {"onprem-1": 80, "cloud-1": 20}
    for site in ("onprem", "cloud"):
        wait_until(lambda site=site: sites.weights(site) == want, 15, f"{site} entry at 80/20")
    print(f"weights written once reached both entries in {time.monotonic() - t0:.2f}s")
    def reported():
        o = leader.observe()
        return o if len(o.servers) == 2 and not any(s["lagging"] or s["stale"] for s in o.servers) else None
    obs = wait_until(reported, 15, "both entries report revision 1")
    assert {s["entry"] for s in obs.servers} == {"onprem-lb-1", "cloud-lb-1"}
    assert obs.health == {"onprem-1": True, "cloud-1": True}

    # Sensitive requests at the cloud entry: served on-prem only.
    cloud_before = sites.successes("cloud-1")
    for _ in range(20):
        r = sites.infer("cloud", SENSITIVE)
        assert r.status_code == 200, r.text
        assert served_by(r.json()["outputs"][0]["data"][0]) == "onprem-1"
    assert sites.successes("cloud-1") == cloud_before
    # Plain requests at the cloud entry reach both sites.
    seen = {served_by(sites.infer("cloud").json()["outputs"][0]["data"][0]) for _ in range(20)}
    assert seen == {"onprem-1", "cloud-1"}

    # On-prem down: a clear 503 with the reason, never a cloud answer.
    cloud_before = sites.successes("cloud-1")
    sites.stop("onprem-1")
    reason = haproxy_config.REASON_HEADER

    def refused():
        r = sites.infer("cloud", SENSITIVE)
        assert r.status_code in (200, 503), r.text
        if r.status_code == 200:  # before HAProxy's check sees it down: it can only be on-prem's answer
            assert served_by(r.json()["outputs"][0]["data"][0]) == "onprem-1"
        return r.headers.get(reason) == haproxy_config.SENSITIVE_503_REASON
    wait_until(refused, 15, "sensitive requests refused with the reason at the cloud entry")
    for _ in range(20):
        r = sites.infer("cloud", SENSITIVE)
        assert r.status_code == 503 and r.headers.get(reason) == haproxy_config.SENSITIVE_503_REASON
        assert "never sent to the cloud" in r.json()["error"]
    assert sites.successes("cloud-1") == cloud_before
    assert sites.infer("cloud").status_code == 200   # plain requests: the cloud serves them

    # A traffic.json of an older generation (a restored backup, bypassing the store's fencing) is refused.
    cur = sites.store.read()
    sites.store.write(TrafficState(revision=cur.state.revision + 1, generation=0,
                                   site_weights={"onprem": 0, "cloud": 100},
                                   instance_weights={"onprem-1": 0, "cloud-1": 100}), cur.etag)
    wait_until(lambda: any("older than the applied one" in e for e in sites.status("cloud")["errors"]), 15,
               "the cloud entry refusing the older generation")
    assert sites.weights("cloud") == want and sites.weights("onprem") == want

    # S3 gone: the cloud entry's HAProxy and agent restart and get the last weights from the state file.
    sites.stop("s3")
    sites.stop("entry-cloud")
    sites.stop("haproxy-cloud")
    sites.start_haproxy("cloud")
    assert sites.weights("cloud") == {"onprem-1": 50, "cloud-1": 50}   # the config's again
    sites.start_agent("cloud")
    wait_until(lambda: sites.weights("cloud") == want, 15, "cloud entry at 80/20 again without S3")
    st = sites.status("cloud")
    assert st["source"] == "state_file" and st["s3_ok"] is False and st["applied_revision"] == 1
    assert any("traffic.json unreadable" in e for e in st["errors"])
    assert sites.infer("cloud").status_code == 200
    # The on-prem entry kept its weights all along.
    assert sites.weights("onprem") == want


@pytest.mark.slow
def test_a_seamless_reload_of_an_entry_haproxy_under_load_fails_no_request(sites):
    """How an on-prem LB host rolls its HAProxy (deploy/systemd/triton-hybrid-haproxy.service:
    `haproxy -Ws`, reload = SIGUSR2 to the master: the new worker takes over the listening sockets,
    the old one finishes its requests): under load through the entry, twice, no request fails, and
    the entry agent gives the new worker the decided weights again."""
    sites.start_s3()
    for name in ADD:
        sites.start_triton(name)
    s = sites.entry_settings("cloud")
    s.run_path.mkdir(parents=True, exist_ok=True)
    start_haproxy(s, site="cloud").stop()       # writes and checks the config, then stops
    cfg = haproxy_config.config_path(s)
    h = s.haproxy
    master = start_ready("haproxy-master", [haproxy_binary(s), "-W", "-db", "-f", str(cfg)], s.run_path,
                         lambda: http_ok(f"http://{h.host}:{h.stats_port}/metrics"), 15, "serving its stats port")
    sites.procs["haproxy-master"] = master
    sites.start_agent("cloud")
    want = {"onprem-1": 80, "cloud-1": 20}
    EntriesActuator(sites.store, sites.settings.instances, generation=lambda: 1).apply(
        Plan({"onprem": 80, "cloud": 20}, want))
    wait_until(lambda: sites.weights("cloud") == want and all(x.up for x in sites.runtime("cloud").servers()),
               30, "cloud entry at 80/20, every server UP")

    url = f"{h.host}:{h.http_port}"
    load = OpenLoopLoad(url, f"{h.host}:{h.grpc_port}", auto_spec(f"http://{url}", ADD_ONE),
                        rate=40.0, duration_s=14.0).start()
    reapplied = []
    for _ in range(2):
        # Load flowing through the current worker before the reload: 100 more answers.
        n = len(load.records) + 100
        wait_until(lambda n=n: len(load.records) >= n, 15, f"{n} answers through the entry")
        workers = set(processes_in_group(master.pgid)) - {master.pid}
        os.kill(master.pid, signal.SIGUSR2)
        t0 = time.monotonic()
        # The new worker starts with the config's weights; the entry agent applies the decided ones.
        wait_until(lambda: set(processes_in_group(master.pgid)) - {master.pid} - workers, 15, "a new worker")
        wait_until(lambda: sites.weights("cloud") == want, 15, "the decided weights in the new worker")
        reapplied.append(time.monotonic() - t0)
    records = load.join()
    failed = [r for r in records if not r.ok]
    print(f"{len(records)} requests through two reloads, {len(failed)} failed; weights back after "
          f"{', '.join(f'{x:.2f}s' for x in reapplied)}")
    assert len(records) >= 0.9 * 40 * 14
    assert not failed, failed[:5]


@pytest.mark.slow
def test_the_control_planes_decisions_reach_both_entries(sites):
    """The daemon's traffic job with the `entries` actuator: every decision lands in traffic.json and
    both entries' HAProxies follow it; the on-prem Triton stopped -> both entries send it nothing."""
    sites.start_two_entries()
    actuator = EntriesActuator(sites.store, sites.settings.instances, by="control-test", generation=lambda: 1)
    ctl = Controller(sites.settings, actuator=actuator, metrics=ControlMetrics(CollectorRegistry()))
    try:
        def entries_follow():
            ctl.poll()
            ctl.tick()
            plan = ctl.traffic.last_plan
            return plan is not None and all(sites.weights(s) == plan.instance_weights for s in ("onprem", "cloud"))
        wait_until(entries_follow, 30, "both entries at the control plane's decision", interval=0.5)
        assert ctl.traffic.last_error is None
        assert sites.store.read().state.updated_by == "control-test"
        sites.stop("onprem-1")
        t0 = time.monotonic()

        def onprem_out():
            entries_follow()
            return all(sites.weights(s)["onprem-1"] == 0 and sites.weights(s)["cloud-1"] > 0
                       for s in ("onprem", "cloud"))
        wait_until(onprem_out, 30, "both entries sending onprem-1 nothing", interval=0.5)
        print(f"on-prem Triton stopped -> both entries at {sites.weights('cloud')} after {time.monotonic() - t0:.1f}s")
        obs = actuator.observe()
        assert obs.health.get("onprem-1") is False and obs.health.get("cloud-1") is True
        assert sites.infer("onprem").status_code == 200 and sites.infer("cloud").status_code == 200
    finally:
        ctl.close()


def test_entry_cli_refuses_bad_setups_with_a_clear_error(tmp_path):
    """`entry --once` with no HAProxy and no S3 exits 1 naming both; a bad entry name and a token in
    a config file others can read are refused before anything starts."""
    s = isolated_settings(tmp_path / "run", s3={"retry_attempts": 1},
                          entry={"name": "lb-1", "token": TOKEN, "interval_s": 0.2})
    argv = [sys.executable, "-m", "control.cli", "--config", s.source, "entry"]

    def run(*extra, env=None):
        return subprocess.run(argv + list(extra), capture_output=True, text=True, timeout=60,
                              env={**os.environ, **(env or {})})
    r = run("--once")
    assert r.returncode == 1
    assert "traffic.json unreadable" in r.stderr and str(haproxy_config.socket_path(s)) in r.stderr, r.stderr
    r = run("--once", env={"TRITON_HYBRID__ENTRY__NAME": "bad/name"})
    assert r.returncode == 1 and "entry.name" in r.stderr, r.stderr
    os.chmod(s.source, 0o644)
    r = run()
    assert r.returncode == 1 and "holds entry.token but is readable by others" in r.stderr, r.stderr
