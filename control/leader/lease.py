"""The leader lease decision: a pure function of (wall time, monotonic time, the lease read from S3,
this control plane's own view, the config) -> what to do. No I/O; the Elector (elector.py) reads,
calls `decide`, writes, and records what happened.

Two clocks, on purpose:
- `now` (wall clock, seconds since the epoch) is what the lease object carries (`renewed_at`,
  `expires_at`) and what another site can compare with its own wall clock, within `skew_margin_s`.
- `mono` (this process's monotonic clock) bounds this process's own leadership: it acts only until
  `deadline` = (monotonic time it SENT its last successful renewal) + lease_s - skew_margin_s, whatever
  its wall clock or S3 do. A standby also counts how long it has seen the same lease version
  unchanged on its monotonic clock: a takeover that needs no clock agreement at all.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

from pydantic import BaseModel, Field


class Action(StrEnum):
    ACQUIRE = "acquire"      # write a new lease (create, or take over): generation + 1
    RENEW = "renew"          # write my lease again (same generation), new expiry
    HOLD = "hold"            # keep acting until my deadline; nothing can be written now (S3 error)
    FOLLOW = "follow"        # do not act: another holds the lease, or S3 cannot be read
    STEP_DOWN = "step_down"  # stop acting now


class Reason(StrEnum):
    NO_LEASE = "no_lease"              # no lease object: the first control plane up takes it
    EXPIRED = "expired"                # the holder's expiry + skew margin has passed (wall clock)
    STALE = "stale"                    # the same lease version seen unchanged for lease_s (own clock)
    RELEASED = "released"              # the holder handed it over (clean stop)
    HELD = "held"                      # mine: renewed
    RECOVERED = "recovered"            # mine, renewed again after missing my deadline (S3 was away)
    HELD_BY_OTHER = "held_by_other"    # another control plane leads
    LOST = "lost"                      # I led, but the lease is someone else's now (or gone)
    RENEW_DEADLINE = "renew_deadline"  # I led, and could not renew before my own deadline
    S3_ERROR = "s3_error"              # the lease could not be read or written
    STOPPED = "stopped"                # this daemon stops (and releases the lease)


class LeaseRecord(BaseModel):
    """The body of `<prefix>/_control/leader.json`."""
    holder: str
    session: str              # random per process: a restarted daemon (same name) is another holder
    site: str
    generation: int = Field(ge=1)
    acquired_at: float        # when this generation began (wall clock of the holder)
    renewed_at: float
    expires_at: float         # renewed_at + lease_s; == renewed_at: released

    @property
    def released(self) -> bool:
        return self.expires_at <= self.renewed_at


@dataclass(frozen=True)
class LeaseRead:
    record: LeaseRecord | None  # None: there is no lease object
    etag: str | None


@dataclass(frozen=True)
class Me:
    name: str
    session: str
    site: str


@dataclass(frozen=True)
class View:
    """What this process knows besides the lease object: whether it acts, until when, and since
    when it has seen the current lease version (for the clock-free takeover)."""
    leading: bool = False
    generation: int = 0
    deadline: float = 0.0            # monotonic; acting stops here unless renewed
    seen_etag: str | None = None
    seen_since: float | None = None  # monotonic time `seen_etag` was first read


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: Reason
    record: LeaseRecord | None = None  # what to write (ACQUIRE, RENEW)
    message: str = ""


def observe(view: View, read: LeaseRead | None, mono: float) -> View:
    """The view after reading `read` at `mono`: a new lease version restarts the unchanged-for count.
    (A failed read changes nothing.)"""
    if read is None or read.etag == view.seen_etag:
        return view
    return replace(view, seen_etag=read.etag, seen_since=mono)


def is_mine(rec: LeaseRecord, me: Me) -> bool:
    return rec.holder == me.name and rec.session == me.session


def _record(me: Me, now: float, cfg, generation: int, acquired_at: float) -> LeaseRecord:
    return LeaseRecord(holder=me.name, session=me.session, site=me.site, generation=generation,
                       acquired_at=acquired_at, renewed_at=now, expires_at=now + cfg.lease_s)


def _who(rec: LeaseRecord) -> str:
    return f"{rec.holder} ({rec.site}, generation {rec.generation})"


def decide(now: float, mono: float, read: LeaseRead | None, view: View, me: Me, cfg, floor: int = 0) -> Decision:
    """What to do now. `read`: the lease as S3 holds it (None: it could not be read); `view` must
    already have observed `read` (`observe`); `floor`: the highest generation seen in what the
    leader writes (desired state), so a lease object that was deleted never restarts the
    generations below a fencing token already in use."""
    if view.leading and mono >= view.deadline:
        return Decision(Action.STEP_DOWN, Reason.RENEW_DEADLINE,
                        message=f"no renewal in the last {cfg.lease_s - cfg.skew_margin_s:g}s; stopped acting")
    if read is None:
        if view.leading:
            return Decision(Action.HOLD, Reason.S3_ERROR,
                            message=f"lease unreadable; acting for {view.deadline - mono:.1f}s more unless renewed")
        return Decision(Action.FOLLOW, Reason.S3_ERROR, message="lease unreadable")
    rec = read.record
    if rec is None:
        if view.leading:
            return Decision(Action.STEP_DOWN, Reason.LOST, message="the lease object is gone")
        return Decision(Action.ACQUIRE, Reason.NO_LEASE, _record(me, now, cfg, floor + 1, now),
                        "no lease yet")
    if is_mine(rec, me):
        if view.leading and rec.generation == view.generation:
            return Decision(Action.RENEW, Reason.HELD, _record(me, now, cfg, rec.generation, rec.acquired_at))
        if view.leading:  # my session, another generation: not written by this process's term
            return Decision(Action.STEP_DOWN, Reason.LOST, message=f"the lease now says {_who(rec)}")
        # Unchanged since I wrote it, so nobody took over in between; the conditional write
        # (If-Match) makes sure nobody does before it lands.
        return Decision(Action.RENEW, Reason.RECOVERED, _record(me, now, cfg, rec.generation, rec.acquired_at),
                        f"my lease of generation {rec.generation} is still unchanged in S3")
    if view.leading:
        return Decision(Action.STEP_DOWN, Reason.LOST, message=f"the lease is held by {_who(rec)}")
    generation = max(rec.generation, floor) + 1
    if rec.released:
        return Decision(Action.ACQUIRE, Reason.RELEASED, _record(me, now, cfg, generation, now),
                        f"released by {_who(rec)}")
    if now > rec.expires_at + cfg.skew_margin_s:
        return Decision(Action.ACQUIRE, Reason.EXPIRED, _record(me, now, cfg, generation, now),
                        f"{_who(rec)} expired {now - rec.expires_at:.1f}s ago")
    if view.seen_etag == read.etag and view.seen_since is not None and mono - view.seen_since >= cfg.lease_s:
        return Decision(Action.ACQUIRE, Reason.STALE, _record(me, now, cfg, generation, now),
                        f"{_who(rec)} not renewed for {mono - view.seen_since:.1f}s (own clock)")
    return Decision(Action.FOLLOW, Reason.HELD_BY_OTHER, message=f"{_who(rec)} leads")


def deadline_after(sent_mono: float, cfg) -> float:
    """Until when a lease written by a request sent at `sent_mono` lets its holder act."""
    return sent_mono + cfg.lease_s - cfg.skew_margin_s


class Event(StrEnum):
    """What the Elector records (log line, audit row, metric) when this control plane's role changes."""
    ACQUIRED = "acquired"          # now leads (a new generation)
    RENEWED = "renewed"            # renewed after failed rounds, before its deadline
    RECOVERED = "recovered"        # leads again with its unchanged lease after missing its deadline
    STEPPED_DOWN = "stepped_down"  # stopped acting (deadline passed, or the lease is another's)
    RELEASED = "released"          # handed the lease over on a clean stop
    FOLLOWING = "following"        # sees a new leader (another control plane)
