"""Decision audit in the control plane's SQLite database (control/db.py). Every policy decision is a
row: time, inputs summary, old and new weights, reason and message, what the actuator did. The last
row also carries the policy state, so a restarted daemon resumes where it stopped. Every change an
operator made (override, drain) is a row of `operator_actions`; the operator state itself lives in
S3 (control/traffic/operator.py), so the other site's control plane inherits it.

The tables `control_overrides` and `control_drains` held the operator state before it moved to S3:
they are only read once, to import what they still hold into S3 (`legacy_controls`), then emptied."""
from __future__ import annotations

import functools
import json
import sqlite3
import threading
import time
from dataclasses import dataclass

from control import db
from control.traffic.policy import Override, PolicyState

DDL = """
CREATE TABLE IF NOT EXISTS control_decisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    reason TEXT NOT NULL,
    message TEXT NOT NULL,
    old_weights TEXT NOT NULL,
    new_weights TEXT NOT NULL,
    instance_weights TEXT NOT NULL,
    changed INTEGER NOT NULL,
    inputs TEXT NOT NULL,
    state TEXT NOT NULL,
    actuator TEXT NOT NULL,
    applied INTEGER NOT NULL,
    commands TEXT NOT NULL DEFAULT '[]',
    drift TEXT NOT NULL DEFAULT '[]',
    error TEXT
);
CREATE INDEX IF NOT EXISTS control_decisions_ts ON control_decisions(ts);
CREATE INDEX IF NOT EXISTS control_decisions_changed ON control_decisions(changed, ts);
CREATE TABLE IF NOT EXISTS control_overrides (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    weights TEXT NOT NULL,
    by TEXT NOT NULL DEFAULT '',
    note TEXT NOT NULL DEFAULT '',
    cleared_at REAL
);
CREATE TABLE IF NOT EXISTS scale_decisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    action TEXT NOT NULL,
    reason TEXT NOT NULL,
    message TEXT NOT NULL,
    count_before INTEGER NOT NULL,
    count_after INTEGER NOT NULL,
    instance TEXT,
    inputs TEXT NOT NULL,
    state TEXT NOT NULL,
    cost TEXT NOT NULL,
    actuator TEXT NOT NULL,
    result TEXT NOT NULL DEFAULT '{}',
    error TEXT
);
CREATE INDEX IF NOT EXISTS scale_decisions_ts ON scale_decisions(ts);
CREATE TABLE IF NOT EXISTS control_drains (
    target TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    created_at REAL NOT NULL,
    by TEXT NOT NULL DEFAULT ''
);
"""
OPERATOR_ACTIONS = """
CREATE TABLE IF NOT EXISTS operator_actions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL DEFAULT '',
    detail TEXT NOT NULL DEFAULT '{}',
    by TEXT NOT NULL DEFAULT '',
    generation INTEGER NOT NULL DEFAULT 0,
    revision INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS operator_actions_ts ON operator_actions(ts);
"""
# Migration i takes the tables from schema version i to i+1 (control/db.migrate); append, never edit.
MIGRATIONS = [DDL, OPERATOR_ACTIONS]


@dataclass
class DecisionRow:
    id: int
    ts: float
    reason: str
    message: str
    old_weights: dict
    new_weights: dict
    instance_weights: dict
    changed: bool
    inputs: dict
    state: dict
    actuator: str
    applied: bool
    commands: list
    drift: list
    error: str | None

    def to_dict(self, full: bool = False) -> dict:
        d = {"id": self.id, "ts": self.ts, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.ts)),
             "reason": self.reason, "message": self.message, "old_weights": self.old_weights,
             "new_weights": self.new_weights, "instance_weights": self.instance_weights, "changed": self.changed,
             "actuator": self.actuator, "applied": self.applied, "commands": self.commands, "drift": self.drift,
             "error": self.error}
        if full:
            d.update(inputs=self.inputs, state=self.state)
        return d


def _row(r: sqlite3.Row) -> DecisionRow:
    return DecisionRow(r["id"], r["ts"], r["reason"], r["message"], json.loads(r["old_weights"]),
                       json.loads(r["new_weights"]), json.loads(r["instance_weights"]), bool(r["changed"]),
                       json.loads(r["inputs"]), json.loads(r["state"]), r["actuator"], bool(r["applied"]),
                       json.loads(r["commands"]), json.loads(r["drift"]), r["error"])


def _locked(fn):
    """One statement (or a read-modify-write) at a time on the shared connection: the decide job,
    the scale job and the admin API's threads all use it. Held only for the local SQLite call."""
    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return fn(self, *args, **kwargs)
    return wrapper


class Audit(db.Store):
    component, migrations = "audit", MIGRATIONS

    def __init__(self, path):
        self._lock = threading.RLock()
        super().__init__(path)

    @_locked
    def close(self) -> None:
        super().close()

    # ---- decisions -----------------------------------------------------------------------------
    @_locked
    def record(self, *, ts: float, reason: str, message: str, old: dict, new: dict, instance_weights: dict,
               inputs: dict, state: PolicyState, actuator: str, applied: bool, commands=(), drift=(),
               error: str | None = None) -> int:
        cur = self.conn.execute(
            "INSERT INTO control_decisions (ts, reason, message, old_weights, new_weights, instance_weights, changed,"
            " inputs, state, actuator, applied, commands, drift, error) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (ts, str(reason), message, json.dumps(old), json.dumps(new), json.dumps(instance_weights),
             int(old != new or bool(drift)), json.dumps(inputs, default=str), json.dumps(state.to_dict()), actuator,
             int(applied), json.dumps(list(commands)), json.dumps(list(drift)), error))
        return cur.lastrowid

    @_locked
    def last(self) -> DecisionRow | None:
        r = self.conn.execute("SELECT * FROM control_decisions ORDER BY id DESC LIMIT 1").fetchone()
        return _row(r) if r else None

    @_locked
    def history(self, since: float | None = None, limit: int = 100, changes_only: bool = False) -> list[DecisionRow]:
        """Decisions since `since`, oldest first. `changes_only`: rows that changed weights, fixed
        drift, failed, or whose reason differs from the previous row (no run of identical ticks)."""
        return [_row(r) for r in self._recent("control_decisions", "changed = 1", since, limit, changes_only)]

    def _recent(self, table: str, acted: str, since: float | None, limit: int, changes_only: bool) -> list:
        """The last `limit` rows of `table` since `since`, oldest first; `changes_only`: rows where
        the SQL condition `acted` holds, errors, and rows whose reason differs from the previous row."""
        if changes_only:
            q = (f"SELECT * FROM (SELECT *, LAG(reason) OVER (ORDER BY id) AS prev_reason FROM {table}"
                 f" WHERE ts >= ?) WHERE {acted} OR error IS NOT NULL OR prev_reason IS NULL"
                 " OR prev_reason != reason")
        else:
            q = f"SELECT * FROM {table} WHERE ts >= ?"
        rows = self.conn.execute(q + " ORDER BY id DESC LIMIT ?", (since or 0.0, limit)).fetchall()
        return list(reversed(rows))

    @_locked
    def prune(self, older_than: float) -> int:
        """Drop unchanged decisions older than `older_than` (weight changes are kept)."""
        return self.conn.execute("DELETE FROM control_decisions WHERE ts < ? AND changed = 0", (older_than,)).rowcount

    # ---- scaling decisions (control/capacity/scaler.py) --------------------------------------------------
    @_locked
    def record_scale(self, *, ts: float, action: str, reason: str, message: str, count_before: int,
                     count_after: int, instance: str | None, inputs: dict, state: dict, cost: dict, actuator: str,
                     result: dict | None = None, error: str | None = None) -> int:
        cur = self.conn.execute(
            "INSERT INTO scale_decisions (ts, action, reason, message, count_before, count_after, instance, inputs,"
            " state, cost, actuator, result, error) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (ts, str(action), str(reason), message, count_before, count_after, instance, json.dumps(inputs, default=str),
             json.dumps(state), json.dumps(cost, default=str), actuator, json.dumps(result or {}, default=str), error))
        return cur.lastrowid

    @_locked
    def scale_history(self, since: float | None = None, limit: int = 100, changes_only: bool = False) -> list[dict]:
        """Scaling decisions since `since`, oldest first; `changes_only`: actions, errors and
        rows whose reason differs from the previous row."""
        out = []
        for r in self._recent("scale_decisions", "action != 'hold'", since, limit, changes_only):
            d = {k: r[k] for k in ("id", "ts", "action", "reason", "message", "count_before", "count_after",
                                   "instance", "actuator", "error")}
            d["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r["ts"]))
            for k in ("inputs", "state", "cost", "result"):
                d[k] = json.loads(r[k])
            out.append(d)
        return out

    @_locked
    def last_scale_state(self) -> dict | None:
        r = self.conn.execute("SELECT state FROM scale_decisions ORDER BY id DESC LIMIT 1").fetchone()
        return json.loads(r["state"]) if r else None

    @_locked
    def prune_scale(self, older_than: float) -> int:
        return self.conn.execute("DELETE FROM scale_decisions WHERE ts < ? AND action = 'hold' AND error IS NULL",
                                 (older_than,)).rowcount

    # ---- operator actions (the state is in S3: control/traffic/operator.py) -------------------------
    @_locked
    def record_operator(self, *, ts: float, action: str, target: str = "", detail: dict | None = None, by: str = "",
                        generation: int = 0, revision: int = 0) -> int:
        return self.conn.execute(
            "INSERT INTO operator_actions (ts, action, target, detail, by, generation, revision) VALUES (?,?,?,?,?,?,?)",
            (ts, action, target, json.dumps(detail or {}), by, generation, revision)).lastrowid

    @_locked
    def operator_history(self, since: float | None = None, limit: int = 100) -> list[dict]:
        rows = self.conn.execute("SELECT * FROM operator_actions WHERE ts >= ? ORDER BY id DESC LIMIT ?",
                                 (since or 0.0, limit)).fetchall()
        return [dict(r) | {"detail": json.loads(r["detail"]),
                           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r["ts"]))} for r in reversed(rows)]

    # ---- the one-time import of an earlier release's operator state ------------------------------
    @_locked
    def legacy_controls(self) -> tuple[Override | None, list[dict]]:
        """What the control database still holds from before operator state moved to S3: the
        uncleared override (expired or not) and the drains."""
        r = self.conn.execute("SELECT * FROM control_overrides WHERE cleared_at IS NULL ORDER BY id DESC LIMIT 1").fetchone()
        ov = None if r is None else Override(json.loads(r["weights"]), r["expires_at"], r["by"], r["note"])
        return ov, [dict(d) for d in self.conn.execute("SELECT * FROM control_drains ORDER BY target")]

    @_locked
    def forget_legacy_controls(self, now: float) -> None:
        """After the import: the rows stay as history (overrides cleared), drains go."""
        self.conn.execute("UPDATE control_overrides SET cleared_at = ? WHERE cleared_at IS NULL", (now,))
        self.conn.execute("DELETE FROM control_drains")
