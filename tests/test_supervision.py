"""The local stack's supervisor with every real component (S3 endpoint, two Tritons, HAProxy):
a Triton killed from outside (kill -9 of the server process alone, as the OOM killer does) has
the stubs it left in its process group reaped, is restarted with the models it served, re-enters
HAProxy once ready and gets traffic again, while requests through HAProxy keep succeeding.
The restart policy itself (`decide`) is a pure function, tested on injected times."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from control.config import SuperviseConfig
from control.local import stack
from control.local.agents import agent_ready
from control.local.demo import MODEL, ensemble_inputs, served_per_instance
from control.local.isolated import isolated_settings as make_settings
from control.local.procs import http_ok, load_managed, pid_alive, rss_bytes
from control.local.procs import processes_in_group as group_of
from control.local.supervisor import Action, backoff, decide, read_state
from control.waiting import wait_until

CFG = SuperviseConfig(max_restarts=3, window_s=60, backoff_initial_s=2, backoff_max_s=5)


# The restart policy, on injected times ------------------------------------------------------------

def test_first_restart_is_immediate_then_backoff_doubles_up_to_its_cap():
    assert [backoff(n, CFG) for n in (1, 2, 3, 4, 5)] == [0, 2, 4, 5, 5]
    assert decide(100.0, 100.0, [], CFG).action is Action.RESTART
    d = decide(100.5, 100.0, [90.0], CFG)
    assert d.action is Action.WAIT and d.due == 102.0
    assert decide(102.0, 100.0, [90.0], CFG).action is Action.RESTART


def test_too_many_restarts_in_the_window_gives_up_and_old_ones_expire():
    d = decide(100.0, 100.0, [50.0, 70.0, 90.0], CFG)
    assert d.action is Action.GIVE_UP and "3 restarts within 60s" in d.reason
    d = decide(100.0, 100.0, [10.0, 20.0, 90.0], CFG)  # two expired: one left, so the second backoff
    assert d.action is Action.WAIT and d.due == 102.0


# The real stack ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def supervised(tmp_path_factory, cpu_repository, tiny_export):
    settings = make_settings(tmp_path_factory.mktemp("supervised") / "run",
                             models={"repository_dir": str(cpu_repository), "exports_dir": str(tiny_export.parent)},
                             control={"start_daemon": False}, triton={"supervise": {"poll_interval_s": 0.2}})
    stack.up(settings)
    yield settings
    stack.down(settings)


class Load:
    """Requests through HAProxy (HTTP and gRPC alternating) until stopped; counts failures."""

    def __init__(self, settings, tiny_export, threads: int = 3):
        h = settings.haproxy
        q = json.loads((tiny_export / "heldout_queries.json").read_text())[0]
        self.args = (q["query"], q["candidate_ids"], 3)
        self.urls = (f"{h.host}:{h.http_port}", f"{h.host}:{h.grpc_port}")
        self.ok, self.failures, self._stop = 0, [], threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, i: int) -> None:
        module = httpclient if i % 2 == 0 else grpcclient
        client = module.InferenceServerClient(self.urls[i % 2])
        while not self._stop.is_set():
            sent = time.monotonic()
            try:
                client.infer(MODEL, ensemble_inputs(module, *self.args))
                self.ok += 1
            except Exception as e:  # noqa: BLE001 - every failure is recorded and asserted on
                self.failures.append((sent, f"{module.__name__}: {e}"))

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join(30)


def kill_leader_leaving_a_stub(proc) -> list[int]:
    """kill -9 of the Triton server process alone. One stub is frozen first: a stub busy in a
    request does not notice its parent's death and stays forever (measured under load); a
    stopped one is that case made deterministic. Returns the stubs of the dead server."""
    stubs = [p for p in group_of(proc.pid) if p != proc.pid]
    assert stubs, "a Triton with Python-backend models has stubs"
    os.kill(stubs[0], signal.SIGSTOP)
    os.kill(proc.pid, signal.SIGKILL)
    return stubs


def test_killed_triton_is_reaped_restarted_and_gets_traffic_again(supervised, tiny_export):
    settings = supervised
    victim = settings.instance("onprem-1")
    old = load_managed(settings.run_path, victim.name)
    with Load(settings, tiny_export) as load:
        wait_until(lambda: load.ok >= 10, 30, "requests flowing through HAProxy")
        stubs = kill_leader_leaving_a_stub(old)
        t_kill = time.monotonic()
        new = wait_until(lambda: (p := load_managed(settings.run_path, victim.name)) and p.pid != old.pid and p.alive
                         and http_ok(f"{victim.http_url}/v2/health/ready") and p, 120, "the supervisor's restart")
        t_ready = time.monotonic()
        assert not [p for p in stubs if pid_alive(p)]
        assert not group_of(old.pid)
        # The restarted Triton loaded the same models, and HAProxy gives it traffic again.
        wait_until(lambda: served_per_instance(settings)[victim.name] >= 5, 60,
                   "the restarted instance serving requests through HAProxy")
        t_traffic = time.monotonic()
    # The proxy never re-sends a request that dropped its server (it may be a query of death), so a
    # request inside the killed Triton at the kill fails, and so can one HAProxy sent in that instant on a
    # connection to it that was already open: at most one per client thread, all within a second of the
    # kill. Every later request succeeds.
    late = [(round(sent - t_kill, 3), f) for sent, f in load.failures if sent > t_kill + 1.0]
    assert late == [], late[:5]
    assert len(load.failures) <= len(load._threads), load.failures
    events = read_state(settings)["instances"][victim.name]["events"]
    kinds = [e["event"] for e in events]
    assert kinds[-3:] == ["crashed", "reaped", "restarted"], events
    reaped, restarted = events[-2], events[-1]
    assert stubs[0] in reaped["pids"] and restarted["pid"] == new.pid
    # The old stubs were gone before the new server started (and so before its stubs loaded).
    started = json.loads((settings.run_path / "pids" / f"{victim.name}.json").read_text())["started"]
    assert reaped["t"] <= started
    comps = {c["name"]: c for c in stack.status(settings)["components"]}
    assert comps[victim.name]["restarts"] == 1 and comps[victim.name]["healthy"]
    assert comps["supervisor"]["running"]
    print(f"\nkill -> ready again: {t_ready - t_kill:.2f}s; kill -> serving through HAProxy: {t_traffic - t_kill:.2f}s; "
          f"reaped {len(reaped['pids'])} stub(s), {reaped['rss_bytes'] / 2**20:.0f} MiB; "
          f"{load.ok} requests through HAProxy, {len(load.failures)} failed (in flight at the kill)")


def test_killed_agent_is_restarted_and_reports_its_host_ready_again(supervised):
    """The host agent is supervised like its Triton: killed, it is started again with its own
    config, and its first pass finds every model live (nothing reloads, Triton keeps serving)."""
    settings = supervised
    inst = settings.instance("cloud-1")
    old = load_managed(settings.run_path, f"agent-{inst.name}")
    triton_pid = load_managed(settings.run_path, inst.name).pid
    os.kill(old.pid, signal.SIGKILL)
    new = wait_until(lambda: (p := load_managed(settings.run_path, f"agent-{inst.name}")) and p.pid != old.pid
                     and p.alive and p, 60, "the supervisor restarting the agent")
    wait_until(lambda: agent_ready(inst), 60, "the restarted agent ready")
    assert load_managed(settings.run_path, inst.name).pid == triton_pid  # its Triton was left alone
    events = read_state(settings)["instances"][f"agent-{inst.name}"]["events"]
    assert [e["event"] for e in events][-2:] == ["crashed", "restarted"] and events[-1]["pid"] == new.pid, \
        [(e["event"], e["message"]) for e in events]
    comps = {c["name"]: c for c in stack.status(settings)["components"]}
    assert comps[f"agent-{inst.name}"]["restarts"] == 1 and comps[f"agent-{inst.name}"]["not_live"] == []


def test_status_shows_leftovers_of_a_dead_triton_and_down_reaps_them(supervised):
    settings = supervised
    sup = load_managed(settings.run_path, "supervisor")
    sup.stop()  # nobody restarts or reaps now: what remains is for `status` and `down`
    victim = settings.instance("cloud-1")
    old = load_managed(settings.run_path, victim.name)
    stubs = kill_leader_leaving_a_stub(old)
    wait_until(lambda: not load_managed(settings.run_path, victim.name).alive, 10, "the server to die")
    comps = {c["name"]: c for c in stack.status(settings)["components"]}
    dead = comps[victim.name]
    assert dead["state"] == "dead" and not dead["running"]
    assert stubs[0] in dead["leftovers"] and dead["leftover_rss_bytes"] > 0
    rss = rss_bytes(dead["leftovers"])
    stack.down(settings)
    assert group_of(old.pid) == [], "down left processes of the dead Triton's group"
    assert stack.running_components(settings) == []
    print(f"\nleftovers of the dead Triton before down: {len(dead['leftovers'])} process(es), {rss / 2**20:.0f} MiB; "
          f"after down: {len(group_of(old.pid))}")
