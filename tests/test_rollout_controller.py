"""The rollout controller (control/rollout/controller.py) against a real S3 endpoint (moto's server):
versions really published to the mirror, agents played by the test (each writes its own
InstanceStatus to S3), metric windows fed in. Desired state moves only by conditional writes; a
concurrent writer is re-read and re-decided; audit rows and Prometheus values follow each
transition; deleting the SQLite file loses no decision."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from prometheus_client import CollectorRegistry

from control.adapters import s3 as s3x
from control.cli import cli
from control.drills.models import ADD_ONE, write_add_model
from control.local.s3_endpoint import start_s3_server
from control.mirror.desired import (
    DesiredState,
    DesiredStateError,
    DesiredStore,
    InstanceStatus,
    ModelState,
)
from control.mirror.publish import publish_version
from control.rollout.analysis import MetricWindow
from control.rollout.controller import from_settings
from control.rollout.phases import Command, CommandError, CommandKind, Phase, state_of

M = ADD_ONE
SITES = {"onprem-1": "onprem", "onprem-2": "onprem", "cloud-1": "cloud", "cloud-2": "cloud"}
ROLLOUT = dict(interval_s=10, analysis_window_s=30, max_failed_checks=2, min_requests=50, wave_size=1,
               progress_deadline_s=120, canary_step_weight=50, canary_max_weight=100, status_stale_s=15)


class Agents:
    """Plays every host's agent: reads desired state from S3, 'loads' the target (live at the next
    report), writes its own status object. `quiet`: agents that stop reporting."""

    def __init__(self, store: DesiredStore, clock):
        self.store, self.clock = store, clock
        self.live = {n: 1 for n in SITES}
        self.quiet: set[str] = set()

    def report(self) -> None:
        d = self.store.read().state
        ms = d.models.get(M) or ModelState()
        for n, site in SITES.items():
            if n in self.quiet:
                continue
            target = ms.target(n)
            self.live[n] = target if target is not None else self.live[n]
            self.store.write_status(InstanceStatus(
                instance=n, site=site, at=self.clock(), ready=True, desired_revision=d.revision,
                metrics_url=f"http://127.0.0.1:1/{n}", models={M: {"live": self.live[n], "target": target,
                                                                   "state": "live"}}))


class Traffic:
    """Fed-in metric windows: per version an error ratio and a p99, 20 req/s per instance."""

    def __init__(self, agents: Agents):
        self.agents = agents
        self.profile = {1: (0.001, 10.0), 2: (0.001, 10.0)}
        self.calls: list[tuple[str, float]] = []

    def __call__(self, model, since, statuses, now):
        self.calls.append((model, since))
        out = {}
        for n, st in statuses.items():
            err, p99 = self.profile[self.agents.live[n]]
            req = 20.0 * max(0.0, now - since)
            out[n] = MetricWindow(n, st.site, req, req * err, p99, p99 / 2)
        return out


@pytest.fixture
def env(settings_factory, tmp_path):
    settings = settings_factory(control={"rollout": ROLLOUT})
    proc = start_s3_server(settings)
    try:
        client = s3x.make_client(settings.s3)
        s3x.ensure_bucket(client, settings.s3)
        repo = tmp_path / "repo"
        for v in (1, 2):
            write_add_model(repo, version=v, add=float(v))
            publish_version(settings, repo, M, v, client=client)
        store = DesiredStore(client, settings.s3)
        store.update(lambda d: _stable(d, 1), by="setup")
        yield settings, client, store
    finally:
        proc.stop()


def _stable(d: DesiredState, v: int) -> DesiredState:
    d.models.setdefault(M, ModelState()).stable = v
    return d


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def in_analysis(env):
    """(clock, agents, traffic, controller) with a rollout driven to its analysis phase."""
    settings, client, store = env
    clock = Clock()
    agents = Agents(store, clock)
    traffic = Traffic(agents)
    ctl = make(settings, client, clock, traffic)
    drive(ctl, agents, clock, until_phase=Phase.ANALYSIS)
    return clock, agents, traffic, ctl


def started(env):
    """(clock, agents, controller) on the env's S3, with a test clock and agents played by the test."""
    settings, client, store = env
    clock = Clock()
    agents = Agents(store, clock)
    return clock, agents, make(settings, client, clock, Traffic(agents))


def make(settings, client, clock, traffic, weights=None, registry=None, **kw):
    hook = (lambda m, i, w: weights.append((m, i, w))) if weights is not None else None
    return from_settings(settings, client=client, windows=traffic, clock=clock, weight_hook=hook,
                         registry=registry or CollectorRegistry(), **kw)


def drive(ctl, agents, clock, until_phase=None, max_ticks=200, dt=5.0):
    """tick + agents report, every dt seconds, until the model is idle again (or `until_phase`)."""
    events = []
    for _ in range(max_ticks):
        agents.report()
        events += ctl.tick()
        st = state_of(ctl.store.read().state.models.get(M), clock())
        if until_phase is not None and st is not None and st.phase == until_phase:
            return events
        if until_phase is None and events and st is None:
            return events
        clock.t += dt
    raise AssertionError(f"no end after {max_ticks} ticks: {[(e.to_phase, e.reason) for e in events]}")


def metric(reg, name, **labels):
    return reg.get_sample_value(name, labels)


def test_rollout_to_done_through_conditional_writes_with_audit_and_metrics(env):
    settings, client, store = env
    clock, reg, weights = Clock(), CollectorRegistry(), []
    agents = Agents(store, clock)
    traffic = Traffic(agents)
    ctl = make(settings, client, clock, traffic, weights, reg)
    rev0 = store.read().state.revision
    events = drive(ctl, agents, clock)
    d = store.read().state
    assert d.models[M].stable == 2 and d.models[M].canary is None and d.models[M].rejected == {}
    assert d.revision > rev0 and d.updated_by == "rollout-controller"
    assert set(agents.live.values()) == {2}
    phases = [(str(e.from_phase), str(e.to_phase), str(e.reason)) for e in events if e.from_phase != e.to_phase]
    assert phases == [("idle", "published", "published"), ("published", "canary", "canary_chosen"),
                      ("canary", "analysis", "canary_live"), ("analysis", "promoting", "analysis_passed"),
                      ("promoting", "done", "promoted")]
    # the analysis looked at windows that start no earlier than the analysis
    analysis_since = next(e.at for e in events if e.reason == "canary_live")
    assert traffic.calls and all(since >= analysis_since for _, since in traffic.calls)
    # weights went 50 -> 100 on the canary through the hook
    canary = next(e for e in events if e.reason == "canary_chosen").message.split()[2]
    assert weights == [(M, canary, 50), (M, canary, 100)]
    # audit: one row per event, with the desired revision it wrote
    rows = ctl.audit.history(M, 100)
    assert [(r["from_phase"], r["to_phase"], r["reason"]) for r in rows] == \
        [(str(e.from_phase), str(e.to_phase), str(e.reason)) for e in events]
    assert all(r["revision"] and r["revision"] > rev0 for r in rows)
    revs = [r["revision"] for r in rows]
    assert revs == sorted(revs)
    # metrics
    name = "triton_hybrid_rollout_transitions_total"
    assert metric(reg, name, model=M, **{"from": "analysis", "to": "promoting", "reason": "analysis_passed"}) == 1
    assert metric(reg, name, model=M, **{"from": "promoting", "to": "done", "reason": "promoted"}) == 1
    waves = metric(reg, name, model=M, **{"from": "promoting", "to": "promoting", "reason": "wave"})
    assert waves == 3  # 4 instances, 1 canary, wave_size 1
    assert metric(reg, "triton_hybrid_rollout_phase", model=M, phase="idle") == 1
    assert metric(reg, "triton_hybrid_rollout_phase", model=M, phase="promoting") == 0
    ctl.close()


def test_regression_rolls_back_and_a_new_controller_without_the_sqlite_keeps_the_decision(env):
    settings, client, store = env
    clock, reg = Clock(), CollectorRegistry()
    agents = Agents(store, clock)
    traffic = Traffic(agents)
    traffic.profile[2] = (0.10, 10.0)
    ctl = make(settings, client, clock, traffic, registry=reg)
    events = drive(ctl, agents, clock)
    last = events[-1]
    assert (last.to_phase, last.reason) == (Phase.ROLLED_BACK, "error_rate")
    d = store.read().state
    assert d.models[M].stable == 1 and d.models[M].canary is None
    assert d.models[M].rejected[2].reason.startswith("error_rate: failed check 2/2")
    assert metric(reg, "triton_hybrid_rollout_transitions_total", model=M,
                  **{"from": "analysis", "to": "rolled_back", "reason": "error_rate"}) == 1
    assert metric(reg, "triton_hybrid_rollout_failed_checks", model=M) == 0  # idle again
    ctl.close()
    for suffix in ("", "-wal", "-shm"):
        settings.database_path.with_name(settings.database_path.name + suffix).unlink(missing_ok=True)
    ctl2 = make(settings, client, clock, traffic)
    rev = store.read().state.revision
    for _ in range(3):
        clock.t += 10
        agents.report()
        assert ctl2.tick() == []  # v2 is rejected in S3: never started again
    assert store.read().state.revision == rev
    st = ctl2.status(M)["models"][M]
    assert st["phase"] == "idle" and st["stable"] == 1 and st["history"] == []
    assert st["rejected"][2]["reason"].startswith("error_rate")
    ctl2.close()


def test_sqlite_deleted_mid_analysis_the_next_controller_carries_on_from_s3(env):
    settings, client, store = env
    clock, agents, traffic, ctl = in_analysis(env)
    ctl.tick()
    before = state_of(store.read().state.models[M], clock())
    assert before.phase == Phase.ANALYSIS and before.last_check_at is not None
    ctl.close()
    settings.database_path.unlink()
    ctl2 = make(settings, client, clock, traffic)
    clock.t += 5
    events = drive(ctl2, agents, clock)
    assert events[0].from_phase in (Phase.ANALYSIS,)  # no new canary, no new start
    assert store.read().state.models[M].stable == 2
    assert not any(e.reason in ("published", "canary_chosen") for e in events)
    ctl2.close()


class RacingStore(DesiredStore):
    """Lets another writer land between this store's read and its conditional write, once."""

    def __init__(self, client, s3cfg, other):
        super().__init__(client, s3cfg)
        self.other, self.lost = other, 0

    def write(self, state, etag):
        if self.other is not None:
            other, self.other = self.other, None
            other()
        try:
            return super().write(state, etag)
        except s3x.PreconditionFailed:
            self.lost += 1
            raise


def test_a_concurrent_operator_pause_wins_and_the_tick_re_decides(env):
    settings, client, store = env
    clock, agents, traffic, ctl = in_analysis(env)
    operator = make(settings, client, clock, traffic, audit=True, by="cli")
    clock.t += 10  # a check is due
    agents.report()
    racing = RacingStore(client, settings.s3, lambda: operator.command(M, Command(CommandKind.PAUSE, by="ann")))
    ctl.store = racing
    rev = store.read().state.revision
    assert ctl.tick() == []  # the check it meant to record was re-decided away: paused now
    assert racing.lost == 1
    d = store.read().state
    st = state_of(d.models[M], clock())
    assert st.paused and st.reason == "operator_pause" and d.revision == rev + 1  # only the pause was written
    rows = operator.audit.history(M, 100)
    assert rows[-1]["reason"] == "operator_pause" and rows[-1]["by"] == "ann"
    # paused: time passes beyond the deadline, nothing moves
    for _ in range(5):
        clock.t += 60
        agents.report()
        assert ctl.tick() == []
    assert state_of(store.read().state.models[M], clock()).phase == Phase.ANALYSIS
    operator.command(M, Command(CommandKind.RESUME, by="ann"))
    events = drive(ctl, agents, clock)
    assert store.read().state.models[M].stable == 2 and events[-1].reason == "promoted"
    ctl.close()
    operator.close()


def test_another_model_written_concurrently_is_kept(env):
    settings, client, store = env
    clock, agents, ctl = started(env)
    other = DesiredStore(client, settings.s3)

    def writer():
        other.update(lambda d: d.models.setdefault("ranker", ModelState(stable=7)) and d, by="someone")
    ctl.store = RacingStore(client, settings.s3, writer)
    agents.report()
    events = ctl.tick()
    assert [e.reason for e in events] == ["published"]
    d = store.read().state
    assert d.models["ranker"].stable == 7 and state_of(d.models[M], clock()).phase == Phase.PUBLISHED
    assert ctl.store.lost == 1
    ctl.close()


def test_operator_commands_errors_and_rollback_to(env):
    settings, client, store = env
    clock, agents, ctl = started(env)
    with pytest.raises(CommandError, match="no rollout in progress"):
        ctl.command(M, Command(CommandKind.PROMOTE))
    rev = store.read().state.revision
    with pytest.raises(CommandError, match="no published, non-rejected version older than v1"):
        ctl.command(M, Command(CommandKind.ROLLBACK))
    assert store.read().state.revision == rev  # nothing written
    drive(ctl, agents, clock)  # v2 goes out
    t = ctl.command(M, Command(CommandKind.ROLLBACK, by="ann"))
    assert (t.to_phase, t.reason, t.by) == (Phase.ROLLED_BACK, "operator_rollback", "ann")
    d = store.read().state
    assert d.models[M].stable == 1 and d.models[M].rejected[2].by == "ann"
    assert ctl.audit.history(M)[-1]["reason"] == "operator_rollback"
    ctl.close()


def test_an_older_leader_generation_cannot_write(env):
    settings, client, store = env
    store.update(lambda d: d, by="new-leader", generation=5)
    clock = Clock()
    agents = Agents(store, clock)
    reg = CollectorRegistry()
    ctl = make(settings, client, clock, Traffic(agents), registry=reg, generation=4)
    agents.report()
    assert ctl.tick() == []
    assert metric(reg, "triton_hybrid_rollout_errors_total", model=M, kind="DesiredStateError") == 1
    assert state_of(store.read().state.models[M], clock()) is None
    with pytest.raises(DesiredStateError, match="newer leader"):
        ctl.command(M, Command(CommandKind.START))
    ctl.close()


def test_cli_drives_the_same_machine_against_s3_and_the_audit(env):
    settings, client, store = env
    def th(*args):
        return CliRunner().invoke(cli, ["--config", settings.source, "rollout", *args], catch_exceptions=False)

    r = th("pause", M)
    assert r.exit_code == 1 and "no rollout in progress" in r.output and "rollout start" in r.output
    r = th("start", M, "--version", "2", "--by", "ann")
    assert r.exit_code == 0, r.output
    assert "idle -> published (operator_start)" in r.output
    r = th("pause", M, "--by", "ann", "--json")
    assert r.exit_code == 0 and '"reason": "operator_pause"' in r.output
    r = th("status", M, "--json")
    st = json.loads(r.output)["models"][M]
    assert st["phase"] == "published" and st["rollout"]["paused"] is True
    assert [h["reason"] for h in st["history"]] == ["operator_start", "operator_pause"]
    r = th("abort", M, "--by", "bob")
    assert r.exit_code == 0 and "rolled_back (operator_abort)" in r.output
    d = store.read().state
    assert d.models[M].stable == 1 and d.models[M].rejected[2].by == "bob"
    r = th("start", M, "--version", "2")
    assert r.exit_code == 1 and "v2 is rejected" in r.output
    r = th("status")
    assert r.exit_code == 0 and "rejected v2: operator_abort" in r.output


def test_canary_weights_come_from_s3_so_a_new_daemon_gets_them_and_an_ended_rollout_releases_them(env):
    """The daemon reconciles its registry's canary weights with canary_weights() every tick."""
    settings, client, _ = env
    clock, agents, traffic, ctl = in_analysis(env)
    st = state_of(ctl.store.read().state.models.get(M), clock())
    assert st.weight == 50 and ctl.canary_weights() == {c: 50 for c in st.canaries}
    fresh = make(settings, client, clock, traffic)   # a restarted daemon's controller
    assert fresh.canary_weights() == {}               # nothing ticked yet: nothing known
    fresh.tick()
    assert fresh.canary_weights() == {c: 50 for c in st.canaries}
    ctl.command(M, Command(CommandKind.ABORT, by="cli"))  # from the CLI: no hook into the daemon
    fresh.tick()
    assert fresh.canary_weights() == {}
    for c in (ctl, fresh):
        c.close()


def test_a_registry_entry_no_agent_reports_under_is_not_waited_for(settings_factory):
    """A Kubernetes Service in the registry (agent_reports: false): its pods report under their own
    names, so a rollout's waves must not wait for the Service's name."""
    settings = settings_factory()
    settings.instance("cloud-1").agent_reports = False
    ctl = from_settings(settings, client=s3x.make_client(settings.s3), audit=False, windows=lambda *a: {},
                        registry=CollectorRegistry())
    try:
        assert ctl.expected() == ["onprem-1"]
    finally:
        ctl.close()


def test_with_leader_election_the_cli_sends_commands_to_the_leading_daemon(env, tmp_path):
    """Only the leader writes desired state: the CLI goes through the admin API, and says so
    clearly when no daemon answers (nothing written to S3)."""
    settings, client, store = env
    data = yaml.safe_load(Path(settings.source).read_text())
    data["control"]["leader"] = {"enabled": True}
    cfg = tmp_path / "leader.yaml"
    cfg.touch(mode=0o600)
    cfg.write_text(yaml.safe_dump(data))
    rev = store.read().state.revision
    r = CliRunner().invoke(cli, ["--config", str(cfg), "rollout", "start", M, "--version", "2"])
    assert r.exit_code == 1 and "control daemon is not answering" in r.output, r.output
    assert store.read().state.revision == rev
