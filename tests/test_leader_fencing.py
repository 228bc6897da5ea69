"""Fencing against a real S3 endpoint (moto's server, its own process): two Electors on one lease
object with injected wall and monotonic clocks, so "the old leader froze between its read and its
write" happens exactly where the test puts it.

- A new leader writes its generation into the desired state before it acts (the fence): a write the
  old leader had prepared on the state it read before (If-Match on that ETag) is refused, and so is
  one it re-reads for; without the fence (negative control) that very write lands.
- The gate: a standby's rollout job writes nothing; the generation callable refuses (NotLeader).
- S3 unreachable: the leader holds until its own deadline, then steps down by itself (audit row,
  metric); back with its lease unchanged it recovers it with the same generation.
"""
from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from control.adapters import s3 as s3x
from control.config import LeaderConfig
from control.daemon.metrics import ControlMetrics
from control.daemon.rollout_job import RolloutJob
from control.leader.audit import LeaderAudit
from control.leader.elector import Elector, LeaderMetrics
from control.leader.gate import Gate, NotLeader
from control.leader.lease import Action, Me, Reason
from control.leader.store import LeaseStore, lease_client
from control.mirror.desired import DesiredStateError, DesiredStore, ModelState
from control.rollout.controller import from_settings
from control.rollout.phases import Command, CommandKind
from control.traffic.actuators import Plan
from control.traffic.entries import TrafficStore, set_plan

CFG = LeaderConfig(enabled=True, lease_s=5.0, renew_s=1.0, skew_margin_s=1.0, s3_timeout_s=1.0)


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def fresh(s3_server):
    settings, client = s3_server
    for key in s3x.list_keys(client, settings.s3.bucket, ""):
        client.delete_object(Bucket=settings.s3.bucket, Key=key)
    return settings, client


def elector(settings, client, name, site, wall, mono, fence=True, audit=None, store=None):
    registry = CollectorRegistry()
    e = Elector(store or LeaseStore(client, settings.s3), CFG, Me(name, f"s-{name}", site),
                fenced=[DesiredStore(client, settings.s3)] if fence else (), audit=audit,
                metrics=LeaderMetrics(registry), clock=wall, mono=mono)
    return e, registry


def _stable(v: int):
    def change(d):
        d.models.setdefault("m", ModelState()).stable = v
        return d
    return change


def take_over_while_a_is_frozen(settings, client, fence_b: bool):
    """A leads and reads the desired state; then A freezes; B takes over after the lease expired.
    Returns (A's gate, the desired store, what A read, B's elector)."""
    store = DesiredStore(client, settings.s3)
    wall, mono_a, mono_b = Clock(1_000.0), Clock(0.0), Clock(0.0)
    a, _ = elector(settings, client, "ctl-a", "onprem", wall, mono_a)
    b, _ = elector(settings, client, "ctl-b", "cloud", wall, mono_b, fence=fence_b)
    assert a.step().action == Action.ACQUIRE and a.is_leader and a.generation == 1
    store.update(_stable(1), by="ctl-a", generation=Gate(a).fencing_token())
    read_by_a = store.read()  # A's next write is prepared on this read... and A freezes here.
    assert b.step().action == Action.FOLLOW
    wall.t += CFG.lease_s + CFG.skew_margin_s + 0.5
    mono_b.t += CFG.lease_s + CFG.skew_margin_s + 0.5
    d = b.step()
    assert (d.action, d.reason) == (Action.ACQUIRE, Reason.EXPIRED) and b.generation == 2
    assert b.is_leader
    return a, store, read_by_a, b


def test_old_leaders_prepared_write_is_refused_after_the_fence(fresh):
    settings, client = fresh
    a, store, read_by_a, b = take_over_while_a_is_frozen(settings, client, fence_b=True)
    assert store.read().state.generation == 2          # the fence landed before B acts
    with pytest.raises(DesiredStateError, match="generation 2; this writer has 1"):
        store.update(_stable(99), by="ctl-a", generation=1, current=read_by_a)
    with pytest.raises(DesiredStateError, match="newer leader"):
        store.update(_stable(99), by="ctl-a", generation=1)
    now = store.read().state
    assert now.models["m"].stable == 1 and now.generation == 2


def test_without_the_fence_the_old_leaders_write_lands(fresh):
    """Negative control: the same sequence, B acquiring without writing its generation first; A's
    write, prepared before B led, lands after B leads. This is what the fence is for."""
    settings, client = fresh
    a, store, read_by_a, b = take_over_while_a_is_frozen(settings, client, fence_b=False)
    store.update(_stable(99), by="ctl-a", generation=1, current=read_by_a)
    assert store.read().state.models["m"].stable == 99


def test_traffic_weights_are_fenced_on_acquisition_but_never_created_empty(fresh):
    """traffic.json (the entries' weights) is fenced like the desired state: a new leader raises the
    generation of the existing object before it acts, so the old leader's prepared weights are
    refused. A missing traffic.json is not created by the fence: an empty one is a plan with every
    weight 0, which the entries would apply."""
    settings, client = fresh
    traffic = TrafficStore(client, settings.s3)
    wall, mono = Clock(1_000.0), Clock(0.0)
    a = Elector(LeaseStore(client, settings.s3), CFG, Me("ctl-a", "s-a", "onprem"), fenced=[traffic],
                metrics=LeaderMetrics(CollectorRegistry()), clock=wall, mono=mono)
    assert a.step().action == Action.ACQUIRE and a.is_leader
    assert traffic.read().etag is None                     # nothing created
    traffic.update(set_plan(Plan({"onprem": 100, "cloud": 0}, {"onprem-1": 100}, frozenset())),
                   by="ctl-a", generation=a.generation)
    read_by_a = traffic.read()
    wall.t += CFG.lease_s + CFG.skew_margin_s + 0.5
    b = Elector(LeaseStore(client, settings.s3), CFG, Me("ctl-b", "s-b", "cloud"), fenced=[traffic],
                metrics=LeaderMetrics(CollectorRegistry()), clock=wall, mono=Clock(100.0))
    assert b.step().action == Action.ACQUIRE and b.is_leader and b.generation == 2
    now = traffic.read().state
    assert (now.generation, now.instance_weights) == (2, {"onprem-1": 100})   # fenced, weights kept
    with pytest.raises(DesiredStateError, match="newer leader|generation 2; this writer has 1"):
        traffic.update(set_plan(Plan({"onprem": 0, "cloud": 100}, {"onprem-1": 0}, frozenset())),
                       by="ctl-a", generation=1, current=read_by_a)
    assert traffic.read().state.instance_weights == {"onprem-1": 100}


def test_standby_rollout_job_writes_nothing_and_the_token_refuses(fresh):
    settings, client = fresh
    wall, mono = Clock(1_000.0), Clock(0.0)
    a, _ = elector(settings, client, "ctl-a", "onprem", wall, mono)
    b, _ = elector(settings, client, "ctl-b", "cloud", wall, mono)
    a.step(), b.step()
    gate_b = Gate(b)
    assert a.is_leader and not gate_b.acting()
    with pytest.raises(NotLeader, match="standby; the leader is ctl-a@onprem"):
        gate_b.fencing_token()
    ctl = from_settings(settings, client=client, registry=CollectorRegistry(), audit=False, windows=lambda *a: {},
                        generation=gate_b.fencing_token)
    job = RolloutJob(settings, ControlMetrics(), controller=ctl, gate=gate_b)
    before = store_etag(settings, client)
    assert job.tick() == [] and job.last_tick["standby"] is True
    assert store_etag(settings, client) == before
    # A lease lost during a tick: the write that was still to come is not attempted.
    with pytest.raises(NotLeader):
        ctl.command("m", Command(CommandKind.PAUSE, by="test"))
    assert store_etag(settings, client) == before


def store_etag(settings, client):
    return DesiredStore(client, settings.s3).read().etag


def test_leader_without_s3_steps_down_by_its_deadline_and_recovers_its_unchanged_lease(fresh, tmp_path):
    settings, client = fresh
    wall, mono = Clock(1_000.0), Clock(0.0)
    audit = LeaderAudit(tmp_path / "control.db")
    good = LeaseStore(client, settings.s3)
    dead_cfg = settings.s3.model_copy(update={"port": 1, "endpoint_url": "http://127.0.0.1:1"})
    dead = LeaseStore(lease_client(dead_cfg, 0.5), dead_cfg)
    a, registry = elector(settings, client, "ctl-a", "onprem", wall, mono, audit=audit, store=good)
    assert a.step().action == Action.ACQUIRE and a.is_leader
    a.store = dead
    mono.t, wall.t = 3.9, 1_003.9
    d = a.step()
    assert (d.action, d.reason) == (Action.HOLD, Reason.S3_ERROR) and a.is_leader
    mono.t, wall.t = 4.0, 1_004.0   # deadline: acquired at 0 + lease_s - skew_margin_s
    assert not a.is_leader           # leadership is a time: no round needed to stop acting
    d = a.step()
    assert (d.action, d.reason) == (Action.STEP_DOWN, Reason.RENEW_DEADLINE)
    assert registry.get_sample_value("triton_hybrid_leader") == 0
    assert registry.get_sample_value("triton_hybrid_leader_transitions_total",
                                     {"event": "stepped_down", "reason": "renew_deadline"}) == 1
    a.store = good                   # back, and nobody took the lease meanwhile
    mono.t, wall.t = 8.0, 1_008.0
    d = a.step()
    assert (d.action, d.reason) == (Action.RENEW, Reason.RECOVERED) and a.is_leader and a.generation == 1
    events = [(r["event"], r["reason"]) for r in audit.history()]
    assert events == [("acquired", "no_lease"), ("stepped_down", "renew_deadline"), ("recovered", "recovered")]
    assert audit.history()[1]["at"] == pytest.approx(1_004.0)  # when the deadline passed, not when noticed
    audit.close()
