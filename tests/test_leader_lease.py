"""The leader lease decision (control/leader/lease.py), a pure function, on recorded sequences with
injected wall and monotonic clocks: two candidates sharing one lease object, expiry, the clock-skew
margin, S3 errors, the leader's own deadline. `Sim` plays S3's conditional write (the ETag) so a
sequence of rounds of two candidates runs exactly as the Elector would run it."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import pytest
from pydantic import ValidationError

from control.config import LeaderConfig
from control.leader.lease import (
    Action,
    LeaseRead,
    LeaseRecord,
    Me,
    Reason,
    View,
    deadline_after,
    decide,
    observe,
)

CFG = LeaderConfig(enabled=True, lease_s=5.0, renew_s=1.0, skew_margin_s=1.0)
A = Me("ctl-a", "sa", "onprem")
B = Me("ctl-b", "sb", "cloud")
T0 = 1_700_000_000.0


def rec(who: Me, generation: int, renewed_at: float, acquired_at: float | None = None, lease_s: float = 5.0):
    return LeaseRecord(holder=who.name, session=who.session, site=who.site, generation=generation,
                       acquired_at=renewed_at if acquired_at is None else acquired_at, renewed_at=renewed_at,
                       expires_at=renewed_at + lease_s)


@dataclass
class Candidate:
    me: Me
    skew: float = 0.0           # this host's wall clock minus true time
    view: View = field(default_factory=View)
    log: list = field(default_factory=list)

    def acting(self, mono: float) -> bool:
        return self.view.leading and mono < self.view.deadline


class Sim:
    """One lease object with ETags; `round(c, t)` is one Elector round of candidate c at true time t
    (both candidates' monotonic clocks = true time: only durations of it are used)."""

    def __init__(self):
        self.record: LeaseRecord | None = None
        self.etag = None
        self.n = 0
        self.reachable = {A.name: True, B.name: True}

    def round(self, c: Candidate, t: float):
        if not self.reachable[c.me.name]:
            read = None
        else:
            read = LeaseRead(self.record, self.etag)
        c.view = observe(c.view, read, t)
        d = decide(t + c.skew, t, read, c.view, c.me, CFG)
        if d.action in (Action.ACQUIRE, Action.RENEW):
            if self.etag == read.etag:  # the conditional write lands
                self.n += 1
                self.record, self.etag = d.record, f"e{self.n}"
                c.view = replace(c.view, leading=True, generation=d.record.generation,
                                 deadline=deadline_after(t, CFG), seen_etag=self.etag, seen_since=t)
        elif d.action == Action.STEP_DOWN:
            c.view = replace(c.view, leading=False)
        c.log.append((t, d.action, d.reason))
        return d


def run(sim: Sim, cands: list[Candidate], start: float, end: float, step: float = 1.0, offsets=None, events=None):
    """Rounds of every candidate every `step` s (candidate i offset by offsets[i]); at each 0.05 s
    check that at most one candidate acts; `events`: {time: fn()} applied once when reached."""
    offsets = offsets or [0.0] * len(cands)
    events = dict(events or {})
    next_round = [start + o for o in offsets]
    t, leaders_seen = start, []
    while t <= end:
        for at in sorted(k for k in events if k <= t):
            events.pop(at)()
        for i, c in enumerate(cands):
            if t >= next_round[i]:
                sim.round(c, t)
                next_round[i] += step
        acting = [c.me.name for c in cands if c.acting(t)]
        assert len(acting) <= 1, f"two leaders at t={t - start:.2f}: {acting}"
        leaders_seen.append((t, acting[0] if acting else None))
        t = round(t + 0.05, 2)
    return leaders_seen


def first_time(seen, name, after: float) -> float:
    return next(t for t, who in seen if who == name and t >= after)


def test_no_lease_is_acquired_with_generation_above_the_floor():
    d = decide(T0, 0.0, LeaseRead(None, None), View(), A, CFG, floor=7)
    assert (d.action, d.reason) == (Action.ACQUIRE, Reason.NO_LEASE)
    assert d.record.generation == 8 and d.record.expires_at == T0 + 5.0


def test_two_candidates_exactly_one_leads_and_renews():
    sim, a, b = Sim(), Candidate(A), Candidate(B)
    seen = run(sim, [a, b], 0.0, 30.0, offsets=[0.0, 0.3])
    assert {who for _, who in seen[1:]} == {"ctl-a"}          # a came first and keeps it
    assert sim.record.generation == 1 and sim.record.holder == "ctl-a"
    assert (Action.FOLLOW, Reason.HELD_BY_OTHER) in {(x, y) for _, x, y in b.log}
    assert all(x != Action.ACQUIRE for _, x, _ in b.log)


def test_dead_leader_is_taken_over_within_the_bound_with_a_new_generation():
    sim, a, b = Sim(), Candidate(A), Candidate(B)

    def kill():  # the process is gone: it acts no more, its rounds reach nothing
        a.view = replace(a.view, leading=False)
        sim.reachable[A.name] = False

    seen = run(sim, [a, b], 0.0, 30.0, offsets=[0.0, 0.5], events={10.0: kill})
    took = first_time(seen, "ctl-b", 10.0) - 10.0
    assert took <= CFG.lease_s + CFG.skew_margin_s + CFG.renew_s, took
    assert sim.record.holder == "ctl-b" and sim.record.generation == 2
    assert any(r in (Reason.EXPIRED, Reason.STALE) for _, x, r in b.log if x == Action.ACQUIRE)


def test_partitioned_leader_stops_acting_before_the_standby_takes_over():
    sim, a, b = Sim(), Candidate(A), Candidate(B)
    seen = run(sim, [a, b], 0.0, 40.0, offsets=[0.0, 0.5],
               events={10.0: lambda: sim.reachable.update({A.name: False}),
                       30.0: lambda: sim.reachable.update({A.name: True})})
    a_last = max(t for t, who in seen if who == "ctl-a")
    b_first = first_time(seen, "ctl-b", 10.0)
    assert b_first - a_last >= CFG.skew_margin_s - 0.05, (a_last, b_first)  # the safety gap
    steps = [(x, r) for _, x, r in a.log]
    assert (Action.HOLD, Reason.S3_ERROR) in steps                       # kept acting until its deadline
    assert (Action.STEP_DOWN, Reason.RENEW_DEADLINE) in steps            # then stopped by itself
    assert steps[-1] == (Action.FOLLOW, Reason.HELD_BY_OTHER)            # back: standby, never leads again
    assert sim.record.holder == "ctl-b" and sim.record.generation == 2


def test_short_s3_blip_leader_renews_and_keeps_its_generation():
    sim, a, b = Sim(), Candidate(A), Candidate(B)
    seen = run(sim, [a, b], 0.0, 20.0, offsets=[0.0, 0.5],
               events={5.0: lambda: sim.reachable.update({A.name: False}),
                       7.0: lambda: sim.reachable.update({A.name: True})})
    assert {who for t, who in seen if t > 1} == {"ctl-a"}
    assert sim.record.generation == 1


@pytest.mark.parametrize("skew", [0.9, -0.9, -30.0])
def test_clock_skew_within_margin_never_gives_two_leaders(skew):
    """The standby's wall clock off by `skew`: within the margin the wall-clock expiry is safe; far
    behind (-30 s) the takeover still comes from the standby's own clock (STALE) in time."""
    sim, a, b = Sim(), Candidate(A), Candidate(B, skew=skew)
    seen = run(sim, [a, b], 0.0, 40.0, offsets=[0.0, 0.5],
               events={10.0: lambda: sim.reachable.update({A.name: False})})
    b_first = first_time(seen, "ctl-b", 10.0)
    assert b_first - 10.0 <= CFG.lease_s + CFG.skew_margin_s + CFG.renew_s
    if skew == -30.0:
        assert any(r == Reason.STALE for _, x, r in b.log if x == Action.ACQUIRE)


def test_a_standby_clock_ahead_by_more_than_the_margin_is_what_the_margin_protects_against():
    """Negative control: a skew beyond the margin makes the wall-clock expiry unsafe; the run
    helper must see the two leaders (so the check above can fail)."""
    sim, a, b = Sim(), Candidate(A), Candidate(B, skew=4.0)
    with pytest.raises(AssertionError, match="two leaders"):
        run(sim, [a, b], 0.0, 40.0, offsets=[0.0, 0.5], events={10.0: lambda: sim.reachable.update({A.name: False})})


def test_released_lease_is_taken_at_once():
    r = rec(A, 3, T0).model_copy(update={"expires_at": T0})
    d = decide(T0 + 0.1, 100.0, LeaseRead(r, "e1"), observe(View(), LeaseRead(r, "e1"), 100.0), B, CFG)
    assert (d.action, d.reason, d.record.generation) == (Action.ACQUIRE, Reason.RELEASED, 4)


def test_expiry_needs_the_skew_margin_too():
    r = rec(A, 1, T0)  # expires T0+5
    v = observe(View(), LeaseRead(r, "e1"), 0.0)
    assert decide(T0 + 5.5, 0.5, LeaseRead(r, "e1"), v, B, CFG).action == Action.FOLLOW
    d = decide(T0 + 6.01, 0.6, LeaseRead(r, "e1"), v, B, CFG)
    assert (d.action, d.reason) == (Action.ACQUIRE, Reason.EXPIRED)


def test_unchanged_lease_counts_on_own_clock_and_restarts_on_a_new_version():
    r1, r2 = rec(A, 1, T0), rec(A, 1, T0 + 1)
    v = observe(View(), LeaseRead(r1, "e1"), 10.0)
    v = observe(v, LeaseRead(r1, "e1"), 14.0)
    assert v.seen_since == 10.0
    v = observe(v, LeaseRead(r2, "e2"), 14.5)        # renewed: the count starts again
    assert decide(T0 - 100, 19.0, LeaseRead(r2, "e2"), v, B, CFG).action == Action.FOLLOW
    d = decide(T0 - 100, 19.5, LeaseRead(r2, "e2"), v, B, CFG)
    assert (d.action, d.reason) == (Action.ACQUIRE, Reason.STALE)


def test_s3_error_leader_holds_until_its_deadline_then_steps_down():
    v = View(leading=True, generation=2, deadline=10.0, seen_etag="e1", seen_since=5.0)
    assert decide(T0, 9.9, None, v, A, CFG).action == Action.HOLD
    d = decide(T0, 10.0, None, v, A, CFG)
    assert (d.action, d.reason) == (Action.STEP_DOWN, Reason.RENEW_DEADLINE)
    assert decide(T0, 9.0, None, View(), B, CFG).action == Action.FOLLOW


def test_leader_that_sees_another_holder_steps_down_at_once():
    v = View(leading=True, generation=2, deadline=100.0)
    d = decide(T0, 5.0, LeaseRead(rec(B, 3, T0), "e9"), v, A, CFG)
    assert (d.action, d.reason) == (Action.STEP_DOWN, Reason.LOST)
    d = decide(T0, 5.0, LeaseRead(None, None), v, A, CFG)
    assert (d.action, d.reason) == (Action.STEP_DOWN, Reason.LOST)


def test_restarted_process_with_the_same_name_is_another_holder():
    old = rec(A, 4, T0)
    restarted = Me(A.name, "new-session", A.site)
    v = observe(View(), LeaseRead(old, "e1"), 0.0)
    assert decide(T0 + 1, 1.0, LeaseRead(old, "e1"), v, restarted, CFG).action == Action.FOLLOW


def test_own_unchanged_lease_after_a_missed_deadline_is_recovered_with_the_same_generation():
    mine = rec(A, 4, T0)
    v = View(leading=False, generation=4, deadline=5.0, seen_etag="e1", seen_since=0.0)
    d = decide(T0 + 20, 20.0, LeaseRead(mine, "e1"), v, A, CFG)
    assert (d.action, d.reason, d.record.generation) == (Action.RENEW, Reason.RECOVERED, 4)
    assert d.record.acquired_at == T0


@pytest.mark.parametrize("kw, msg", [
    (dict(lease_s=2.0, renew_s=1.0, skew_margin_s=1.0), "at least two renewals"),
    (dict(s3_timeout_s=2.0), "must not exceed renew_s"),
    (dict(lease_s=9.0), "exceeds takeover_target_s"),
    (dict(name="a b"), "may only hold"),
])
def test_config_refuses_unsafe_or_slow_timing(kw, msg):
    with pytest.raises(ValidationError, match=msg):
        LeaderConfig(**kw)
