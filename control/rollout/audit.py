"""The rollout audit: one row per transition in the control plane's SQLite (table `rollouts`).
Only an audit and a cache: every decision lives in S3 desired state, so deleting this file loses
history, never a decision (a restarted controller reads the phase, and the rejected versions with
their reasons, from S3)."""
from __future__ import annotations

import json
import time

from control import db
from control.rollout.phases import Transition

DDL = """
CREATE TABLE IF NOT EXISTS rollouts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    model TEXT NOT NULL,
    version INTEGER NOT NULL,
    from_phase TEXT NOT NULL,
    to_phase TEXT NOT NULL,
    reason TEXT NOT NULL,
    message TEXT NOT NULL,
    by TEXT NOT NULL DEFAULT '',
    revision INTEGER,
    details TEXT NOT NULL DEFAULT '{}',
    error TEXT
);
CREATE INDEX IF NOT EXISTS rollouts_model_ts ON rollouts(model, ts);
"""
# Migration i takes the table from schema version i to i+1 (control/db.migrate); append, never edit.
MIGRATIONS = [DDL]


class RolloutAudit(db.Store):
    component, migrations = "rollout", MIGRATIONS

    def record(self, t: Transition, revision: int | None, error: str | None = None) -> int:
        cur = self.conn.execute(
            "INSERT INTO rollouts (ts, model, version, from_phase, to_phase, reason, message, by, revision, details,"
            " error) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (t.at, t.model, t.version, str(t.from_phase), str(t.to_phase), str(t.reason), t.message, t.by, revision,
             json.dumps(t.details, default=str), error))
        return cur.lastrowid

    def history(self, model: str | None = None, limit: int = 50) -> list[dict]:
        """Rows oldest first (the last `limit`), for one model or all."""
        q, args = "SELECT * FROM rollouts", []
        if model:
            q, args = q + " WHERE model = ?", [model]
        rows = self.conn.execute(q + " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
        out = []
        for r in reversed(rows):
            d = {k: r[k] for k in ("id", "ts", "model", "version", "from_phase", "to_phase", "reason", "message", "by",
                                   "revision", "error")}
            d["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r["ts"]))
            d["details"] = json.loads(r["details"])
            out.append(d)
        return out
