"""Operator state: what an operator sets that changes the traffic decisions (the manual override
with its expiry, drained sites and instances), in the S3 mirror next to the desired state:

    <prefix>/_control/operator.json     one writer: the leading control plane (its admin API)

A control object like desired.json and traffic.json (control/mirror/desired.ControlObjectStore):
conditional writes, sha256 checked on read, encrypted at rest, every write carrying the writer's
lease generation (refused once a newer leader has written it; the elector fences it on acquisition).
Both sites' control planes read the same object, so a standby that takes over inherits every drain
and the override with its absolute expiry, not from the other site's disk (docs/leader.md).
The control database keeps only the audit of who changed what (control/traffic/audit.py).

    view = OperatorView(OperatorStore(client, s3cfg), refresh_s=5, generation=gate.fencing_token)
    view.state(now, leading_generation)   # the cached object: a conditional GET at most every refresh_s,
                                          # and at once when this daemon starts leading a new generation
    view.change(drain("onprem-2", "instance", by="api:..", now=now), by="api:..")   # fenced write
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, Field

from control.adapters import s3 as s3x
from control.mirror.desired import ControlObject, ControlObjectStore, DesiredStateError, Read
from control.traffic.policy import Controls, Override

log = logging.getLogger("triton_hybrid.control")

OPERATOR_NAME = "operator.json"
OPERATOR_SCHEMA = 1


class OverrideSet(BaseModel):
    weights: dict[str, int]
    expires_at: float          # wall clock: the same instant for whichever control plane leads
    set_at: float
    by: str = ""
    note: str = ""


class Drain(BaseModel):
    kind: Literal["site", "instance"]
    at: float
    by: str = ""


class OperatorState(ControlObject):
    schema_version: int = OPERATOR_SCHEMA
    # The newest override, kept after its expiry (the policy reports the expiry; a new one replaces it).
    override: OverrideSet | None = None
    drains: dict[str, Drain] = Field(default_factory=dict)   # target (site or instance name) -> drain

    def controls(self) -> Controls:
        ov = self.override
        return Controls(override=None if ov is None else Override(dict(ov.weights), ov.expires_at, ov.by, ov.note),
                        drained=frozenset(self.drains))


class OperatorStore(ControlObjectStore):
    name = OPERATOR_NAME
    model = OperatorState
    schema = OPERATOR_SCHEMA
    what = "operator state"
    restore_hint = ("delete it and set the overrides and drains again (`triton-hybrid weights set`, "
                    "`triton-hybrid drain`)")


# ---- changes for OperatorStore.update (pure: the new state, or None for "nothing to do") ------------
Change = Callable[[OperatorState], OperatorState | None]


def set_override(weights: dict[str, int], ttl_s: float, by: str, note: str, now: float) -> Change:
    def change(s: OperatorState) -> OperatorState:
        s.override = OverrideSet(weights=dict(weights), expires_at=now + ttl_s, set_at=now, by=by, note=note)
        return s
    return change


def clear_override(now: float) -> Change:
    """Ends an override still in force; None when there is none."""
    def change(s: OperatorState) -> OperatorState | None:
        if s.override is None or s.override.expires_at <= now:
            return None
        s.override = None
        return s
    return change


def drain(target: str, kind: Literal["site", "instance"], by: str, now: float) -> Change:
    def change(s: OperatorState) -> OperatorState | None:
        if target in s.drains:
            return None
        s.drains[target] = Drain(kind=kind, at=now, by=by)
        return s
    return change


def undrain(target: str) -> Change:
    def change(s: OperatorState) -> OperatorState | None:
        return s if s.drains.pop(target, None) is not None else None
    return change


def import_legacy(override: Override | None, drains: list[dict], now: float) -> Change:
    """The one-time import of what an earlier release kept in the control database: every drain is
    added; the override only while in force and when S3 holds none in force (S3 is newer)."""
    def change(s: OperatorState) -> OperatorState | None:
        changed = False
        for d in drains:
            if d["target"] not in s.drains:
                s.drains[d["target"]] = Drain(kind=d["kind"], at=d["created_at"], by=d["by"] or "database import")
                changed = True
        in_force = s.override is not None and s.override.expires_at > now
        if override is not None and override.expires_at > now and not in_force:
            s.override = OverrideSet(weights=dict(override.weights), expires_at=override.expires_at, set_at=now,
                                     by=override.by or "database import", note=override.note)
            changed = True
        return s if changed else None
    return change


class OperatorView:
    """This daemon's copy of operator.json. Read with If-None-Match (a 304 costs no body) at most every
    `refresh_s`, and at once when `state()` is told of a lease generation it has not read under:
    a new leader decides from what S3 holds, not from what it saw as standby. Its own writes update
    the copy (the ETag from the PUT), so a change through the admin API is decided on at once.
    S3 unreachable: the last copy holds (and `error` says why)."""

    def __init__(self, store: OperatorStore, refresh_s: float, generation: Callable[[], int] = lambda: 0,
                 clock: Callable[[], float] = time.time):
        self.store, self.refresh_s, self.generation, self.clock = store, refresh_s, generation, clock
        self._lock = threading.Lock()
        self._read: Read | None = None
        self._read_at: float | None = None
        self._read_generation: int | None = None
        self.error: str | None = None

    def state(self, now: float | None = None, leading_generation: int | None = None) -> OperatorState:
        now = self.clock() if now is None else now
        with self._lock:
            stale = self._read_at is None or now - self._read_at >= self.refresh_s
            new_term = leading_generation is not None and leading_generation != self._read_generation
            if stale or new_term:
                try:
                    self._read = self.store.read(self._read)
                    self._read_at, self.error = now, None
                    if leading_generation is not None:
                        self._read_generation = leading_generation
                except (s3x.S3Error, DesiredStateError) as e:
                    self.error = f"could not read the operator state: {e}"
                    self._read_at = now  # retried after refresh_s, not at every tick
                    log.warning("%s; deciding with the last copy (revision %s)", self.error,
                                None if self._read is None else self._read.state.revision)
            return self._read.state if self._read is not None else OperatorState()

    def change(self, fn: Change, by: str) -> Read:
        """A fenced, conditional write of `fn` applied to what S3 holds: the state now in S3, and
        whether it was written (`written`; False: nothing to do). Raises NotLeader (standby),
        DesiredStateError (a newer leader wrote it, or it is damaged) or s3x.S3Error."""
        generation = self.generation()
        with self._lock:
            read = self.store.update_read(fn, by=by, generation=generation, clock=self.clock, current=self._read)
            self._read, self._read_at, self.error = read, self.clock(), None
            return read

    def status(self) -> dict:
        r = self._read
        return {"key": f"s3://{self.store.bucket}/{self.store.key}", "error": self.error, "read_at": self._read_at,
                "revision": None if r is None else r.state.revision,
                "generation": None if r is None else r.state.generation,
                "updated_by": None if r is None else r.state.updated_by}
