"""The leader audit: one row per change of this control plane's role (acquired, renewed after
failures, recovered, stepped down, released, following a new leader) in the control plane's SQLite
(table `leader_transitions`). Each site has its own database: put both sites' rows side by side to
check that two control planes never acted at once (acquired .. stepped_down/released intervals)."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from control import db

DDL = """
CREATE TABLE IF NOT EXISTS leader_transitions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    event TEXT NOT NULL,
    reason TEXT NOT NULL,
    name TEXT NOT NULL,
    site TEXT NOT NULL,
    generation INTEGER NOT NULL,
    leader TEXT NOT NULL DEFAULT '',
    message TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS leader_transitions_ts ON leader_transitions(ts);
"""
# Migration i takes the table from schema version i to i+1 (control/db.migrate); append, never edit.
MIGRATIONS = [DDL]


@dataclass(frozen=True)
class Transition:
    at: float         # wall clock; for a missed deadline: when the deadline passed, not when noticed
    event: str
    reason: str
    name: str         # this control plane
    site: str
    generation: int   # the lease generation it concerns
    leader: str = ""  # who leads after it ("" unknown / nobody)
    message: str = ""

    def to_dict(self) -> dict:
        return asdict(self) | {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.at))}


class LeaderAudit(db.Store):
    component, migrations = "leader", MIGRATIONS

    def record(self, t: Transition) -> int:
        return self.conn.execute(
            "INSERT INTO leader_transitions (ts, event, reason, name, site, generation, leader, message)"
            " VALUES (?,?,?,?,?,?,?,?)",
            (t.at, t.event, t.reason, t.name, t.site, t.generation, t.leader, t.message)).lastrowid

    def history(self, limit: int = 100) -> list[dict]:
        """Rows oldest first (the last `limit`)."""
        rows = self.conn.execute("SELECT * FROM leader_transitions ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [Transition(**{k: r[k] for k in ("event", "reason", "name", "site", "generation", "leader", "message")},
                           at=r["ts"]).to_dict() for r in reversed(rows)]
