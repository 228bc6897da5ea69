"""The Elector: one thread per control plane that reads the lease every `renew_s`, asks the pure
decision (lease.py) what to do, writes the lease conditionally (store.py), and records every change
of role (log line, audit row, metric).

Leadership is a time, not a flag: `is_leader` is true only while this process holds the lease AND
its own monotonic clock is before its deadline (the send time of its last successful renewal +
lease_s - skew_margin_s). A leader cut off from S3, or whose renewals hang, stops acting at that
deadline by itself, whether or not its thread is stuck in a request; a standby can only take over
`skew_margin_s` or more later (docs/leader.md).

After an acquisition and before acting, the new leader writes its generation into every fenced
control object (the fence: the desired state and the operator state): from then on, any write of an
older leader to them, even one already sent, is refused (If-Match fails on the changed ETag; the
re-read shows a newer generation).
"""
from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace

from prometheus_client import CollectorRegistry, Counter, Gauge

from control.adapters import s3 as s3x
from control.leader.audit import LeaderAudit, Transition
from control.leader.lease import (
    Action,
    Decision,
    Event,
    LeaseRead,
    Me,
    Reason,
    View,
    deadline_after,
    decide,
    is_mine,
    observe,
)
from control.leader.store import LeaseStore, lease_client
from control.mirror.desired import ControlObjectStore, DesiredStateError, DesiredStore
from control.traffic.entries import TrafficStore
from control.traffic.operator import OperatorStore

log = logging.getLogger("triton_hybrid.leader")


class LeaderMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        r = registry or CollectorRegistry()
        p = "triton_hybrid_"
        self.leader = Gauge(p + "leader", "1 while this control plane leads (holds the lease and acts)", registry=r)
        self.generation = Gauge(p + "leader_generation", "Generation of the lease this control plane last held "
                                "(its fencing token; 0: never led)", registry=r)
        self.transitions = Counter(p + "leader_transitions", "Changes of this control plane's role",
                                   ["event", "reason"], registry=r)
        self.errors = Counter(p + "leader_lease_errors", "Lease rounds that could not read or write S3", registry=r)


def me_from(cfg) -> Me:
    return Me(cfg.name or socket.gethostname(), uuid.uuid4().hex[:12], cfg.site)


class Elector:
    def __init__(self, store: LeaseStore, cfg, me: Me, *, fenced: Sequence[ControlObjectStore] = (),
                 audit: LeaderAudit | None = None, metrics: LeaderMetrics | None = None,
                 clock: Callable[[], float] = time.time, mono: Callable[[], float] = time.monotonic,
                 on_change: Callable[[Transition], None] | None = None):
        self.store, self.cfg, self.me, self.fenced_stores = store, cfg, me, list(fenced)
        self.audit, self.clock, self.mono, self.on_change = audit, clock, mono, on_change
        self.metrics = metrics or LeaderMetrics()
        self.metrics.leader.set_function(lambda: 1 if self.is_leader else 0)
        self.view = View()
        self.last_read: LeaseRead | None = None
        self.last_decision: Decision | None = None
        self.last_error: str | None = None
        self.fenced = 0                   # the generation written into every fenced control object
        self.role_since = clock()         # wall time of the last change of role
        self.failed_rounds = 0
        self._announced: tuple[str, str, int] | None = None  # the other leader last recorded as followed
        self._round = threading.Lock()    # one round at a time (the thread, a test, stop)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- what the daemon asks ------------------------------------------------------------------
    @property
    def is_leader(self) -> bool:
        v = self.view
        return v.leading and self.fenced == v.generation and self.mono() < v.deadline

    @property
    def generation(self) -> int:
        return self.view.generation

    # ---- one round -----------------------------------------------------------------------------
    def step(self) -> Decision:
        with self._round:
            try:
                read = self.store.read()
                self.last_error = None
            except s3x.S3Error as e:
                read, self.last_error = None, str(e)
                self.metrics.errors.inc()
            if read is not None:
                self.last_read = read
            mono, now = self.mono(), self.clock()
            self.view = observe(self.view, read, mono)
            d = decide(now, mono, read, self.view, self.me, self.cfg)
            if d.action == Action.ACQUIRE and self.fenced_stores:
                try:  # the generations already used in the fenced objects stay below ours
                    floor = max(st.read().state.generation for st in self.fenced_stores)
                    d = decide(now, mono, read, self.view, self.me, self.cfg, floor=floor)
                except (s3x.S3Error, DesiredStateError) as e:
                    self.last_error = f"control objects unreadable, not acquiring: {e}"
                    d = Decision(Action.FOLLOW, Reason.S3_ERROR, message=self.last_error)
            self.last_decision = d
            self._act(d, read, mono, now)
            return d

    def _act(self, d: Decision, read: LeaseRead | None, mono: float, now: float) -> None:
        if d.action in (Action.ACQUIRE, Action.RENEW):
            self._write(d, read)
        elif d.action == Action.STEP_DOWN:
            at = now - max(0.0, mono - self.view.deadline) if d.reason == Reason.RENEW_DEADLINE else now
            self.view = replace(self.view, leading=False)
            self._transition(Event.STEPPED_DOWN, d.reason, d.message, at=at)
        elif d.action == Action.HOLD:
            self.failed_rounds += 1
            log.warning("lease round failed (%d in a row): %s; %s", self.failed_rounds, self.last_error, d.message)
        elif d.action == Action.FOLLOW and read is not None and read.record is not None:
            rec = read.record
            key = (rec.holder, rec.session, rec.generation)
            if key != self._announced and not is_mine(rec, self.me):
                self._announced = key
                self._transition(Event.FOLLOWING, d.reason, d.message, generation=rec.generation,
                                 leader=f"{rec.holder}@{rec.site}")

    def _write(self, d: Decision, read: LeaseRead | None) -> None:
        rec = d.record
        assert rec is not None and read is not None
        sent = self.mono()
        try:
            etag = self.store.write(rec, read.etag)
        except s3x.PreconditionFailed:
            # Another control plane wrote the lease since we read it: it leads (or renewed).
            if self.view.leading:
                self.view = replace(self.view, leading=False)
                self._transition(Event.STEPPED_DOWN, Reason.LOST, "a conditional lease write lost: another "
                                 "control plane wrote the lease")
            return
        except s3x.S3Error as e:
            self.last_error = str(e)
            self.failed_rounds += 1
            self.metrics.errors.inc()
            log.warning("lease write failed (%d in a row): %s", self.failed_rounds, e)
            return
        was_leading = self.view.leading
        self.last_read = LeaseRead(rec, etag)
        self.view = replace(self.view, leading=True, generation=rec.generation, deadline=deadline_after(sent, self.cfg),
                            seen_etag=etag, seen_since=sent)
        self.metrics.generation.set(rec.generation)
        failed, self.failed_rounds = self.failed_rounds, 0
        if self.fenced != rec.generation and not self._fence(rec.generation):
            return  # holds the lease but does not act; the next renewal fences again
        if d.action == Action.ACQUIRE:
            self._transition(Event.ACQUIRED, d.reason, d.message)
        elif d.reason == Reason.RECOVERED or not was_leading:
            self._transition(Event.RECOVERED, d.reason, d.message)
        elif failed:
            self._transition(Event.RENEWED, d.reason, f"renewed after {failed} failed round(s)")

    def _fence(self, generation: int) -> bool:
        """Write `generation` into every fenced control object (no other change) before acting on it."""
        for st in self.fenced_stores:
            keep = (lambda s: s) if st.fence_creates else (lambda s: s if s.revision else None)
            try:
                st.update(keep, by=f"leader {self.me.name}@{self.me.site}", generation=generation,
                          clock=self.clock)
            except (s3x.S3Error, DesiredStateError) as e:
                self.last_error = f"could not fence the {st.what} with generation {generation}: {e}"
                log.error("%s; not acting until it is written", self.last_error)
                return False
        self.fenced = generation
        return True

    def _transition(self, event: Event, reason: Reason, message: str, *, at: float | None = None,
                    generation: int | None = None, leader: str | None = None) -> None:
        t = Transition(at=self.clock() if at is None else at, event=event, reason=reason, name=self.me.name,
                       site=self.me.site, generation=self.view.generation if generation is None else generation,
                       leader=leader if leader is not None else (f"{self.me.name}@{self.me.site}" if self.view.leading
                                                                 else ""), message=message)
        if event != Event.FOLLOWING or self.role_since is None:
            self.role_since = t.at
        log.info("leader: %s %s (%s) generation %d: %s", self.me.name, event, reason, t.generation, message)
        self.metrics.transitions.labels(str(event), str(reason)).inc()
        if self.audit is not None:
            self.audit.record(t)
        if self.on_change is not None:
            try:
                self.on_change(t)
            except Exception:  # noqa: BLE001 - a hook must not stop the elector
                log.exception("leader change hook failed")

    # ---- the thread ----------------------------------------------------------------------------
    def start(self) -> "Elector":
        self._thread = threading.Thread(target=self._run, daemon=True, name="leader-elector")
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except Exception:  # noqa: BLE001 - the elector must keep running
                log.exception("leader round failed")
            wait = self.cfg.renew_s
            if self.view.leading:  # wake at the deadline too, to record the step-down on time
                wait = min(wait, max(0.01, self.view.deadline - self.mono()))
            self._stop.wait(wait)

    def stop(self, release: bool = True) -> None:
        """Stop the thread; when leading, stop acting and (release) hand the lease over at once."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.cfg.renew_s + 2 * self.cfg.s3_timeout_s + 1)
        with self._round:
            if not self.view.leading:
                return
            self.view = replace(self.view, leading=False)
            read = self.last_read
            if not (release and read is not None and read.record is not None and is_mine(read.record, self.me)):
                self._transition(Event.STEPPED_DOWN, Reason.STOPPED, "daemon stopped")
                return
            now = self.clock()
            gone = read.record.model_copy(update={"renewed_at": now, "expires_at": now})
            try:
                self.store.write(gone, self.view.seen_etag)
                self._transition(Event.RELEASED, Reason.STOPPED, "daemon stopped; lease handed over")
            except s3x.S3Error as e:
                self._transition(Event.STEPPED_DOWN, Reason.STOPPED, f"daemon stopped; release failed: {e}")

    def close(self) -> None:
        if self.audit is not None:
            self.audit.close()

    # ---- views ---------------------------------------------------------------------------------
    def status(self) -> dict:
        v, now, mono = self.view, self.clock(), self.mono()
        rec = self.last_read.record if self.last_read is not None else None
        leading = self.is_leader
        lease = None
        if rec is not None:
            lease = rec.model_dump() | {
                "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(rec.acquired_at)),
                "valid": not rec.released and now <= rec.expires_at + self.cfg.skew_margin_s}
        return {
            "enabled": True, "name": self.me.name, "site": self.me.site, "session": self.me.session,
            "role": "leader" if leading else "standby", "is_leader": leading,
            "generation": v.generation if v.leading else None, "role_since": self.role_since,
            "acting_for_s": round(v.deadline - mono, 2) if leading else 0.0,
            "leader": (f"{rec.holder}@{rec.site}" if lease is not None and lease["valid"] else None),
            "lease": lease, "key": self.store.where, "last_error": self.last_error,
            "last_decision": None if self.last_decision is None else
            {"action": self.last_decision.action, "reason": self.last_decision.reason,
             "message": self.last_decision.message},
            "timing": {k: getattr(self.cfg, k) for k in ("lease_s", "renew_s", "skew_margin_s", "takeover_target_s")},
        }


def from_settings(settings, registry: CollectorRegistry | None = None,
                  on_change: Callable[[Transition], None] | None = None) -> Elector | None:
    """The elector for a config (None when `control.leader.enabled` is off): the lease and the fenced
    objects (desired and operator state, and traffic.json when the entries apply weights) through a client with the lease's short timeouts, the audit
    in the control database."""
    cfg = settings.control.leader
    if not cfg.enabled:
        return None
    client = lease_client(settings.s3, cfg.s3_timeout_s)
    fenced = [DesiredStore(client, settings.s3), OperatorStore(client, settings.s3)]
    if "entries" in settings.control.actuators:
        fenced.append(TrafficStore(client, settings.s3))
    return Elector(LeaseStore(client, settings.s3), cfg, me_from(cfg), fenced=fenced,
                   audit=LeaderAudit(settings.database_path), metrics=LeaderMetrics(registry), on_change=on_change)
