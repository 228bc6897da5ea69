"""Cost per site: instance-hours from observed up-time times each instance's `cost_per_hour`
(the registry), and the current burn rate. Pure functions plus a small ledger table in the
control DB (control/db.py), so cost survives a daemon restart and `status` reads it with the
daemon down.

Observed up-time: an instance accrues the time between two consecutive observations in which it
was up (the poller's readiness answered 200, or the scale actuator says its process runs), never
more than `max_gap_s` per step (a daemon that was stopped does not bill the gap).
Burn rate: sum of cost_per_hour of the instances up at the last observation (fresh ones only).

`cost_summary(settings)` is the `cost` part of `triton-hybrid status`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from control import db

DDL = """
CREATE TABLE IF NOT EXISTS cost_ledger (
    instance TEXT PRIMARY KEY,
    site TEXT NOT NULL,
    cost_per_hour REAL NOT NULL,
    up_seconds REAL NOT NULL DEFAULT 0,
    dollars REAL NOT NULL DEFAULT 0,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    up INTEGER NOT NULL
);
"""
# Migration i takes the tables from schema version i to i+1 (control/db.migrate); append, never edit.
MIGRATIONS = [DDL]


@dataclass(frozen=True)
class Usage:
    instance: str
    site: str
    cost_per_hour: float
    up_seconds: float
    dollars: float
    first_seen: float
    last_seen: float
    up: bool


def accrue(prev: Usage | None, instance: str, site: str, cost_per_hour: float, up: bool, now: float,
           max_gap_s: float = 60.0) -> Usage:
    """The usage after one observation (pure)."""
    if prev is None:
        return Usage(instance, site, cost_per_hour, 0.0, 0.0, now, now, up)
    dt = now - prev.last_seen
    add = dt if (prev.up and up and 0 < dt <= max_gap_s) else 0.0
    # The rate in force over the interval is the one observed at its start.
    return Usage(instance, site, cost_per_hour, prev.up_seconds + add, prev.dollars + add / 3600.0 * prev.cost_per_hour,
                 prev.first_seen, now, up)


def site_totals(usages: list[Usage], now: float, fresh_s: float = 60.0) -> dict[str, dict]:
    """{site: {dollars, instance_hours, burn_per_hour, up_instances}} (pure)."""
    out: dict[str, dict] = {}
    for u in usages:
        t = out.setdefault(u.site, {"dollars": 0.0, "instance_hours": 0.0, "burn_per_hour": 0.0, "up_instances": []})
        t["dollars"] += u.dollars
        t["instance_hours"] += u.up_seconds / 3600.0
        if u.up and now - u.last_seen <= fresh_s:
            t["burn_per_hour"] += u.cost_per_hour
            t["up_instances"].append(u.instance)
    for t in out.values():
        t["dollars"] = round(t["dollars"], 6)
        t["instance_hours"] = round(t["instance_hours"], 6)
        t["burn_per_hour"] = round(t["burn_per_hour"], 6)
    return out


class CostLedger(db.Store):
    component, migrations = "cost", MIGRATIONS

    def get(self, instance: str) -> Usage | None:
        r = self.conn.execute("SELECT * FROM cost_ledger WHERE instance = ?", (instance,)).fetchone()
        return None if r is None else _usage(r)

    def all(self) -> list[Usage]:
        return [_usage(r) for r in self.conn.execute("SELECT * FROM cost_ledger ORDER BY instance")]

    def observe(self, instance: str, site: str, cost_per_hour: float, up: bool, now: float | None = None,
                max_gap_s: float = 60.0) -> Usage:
        now = time.time() if now is None else now
        u = accrue(self.get(instance), instance, site, cost_per_hour, up, now, max_gap_s)
        self.conn.execute(
            "INSERT OR REPLACE INTO cost_ledger (instance, site, cost_per_hour, up_seconds, dollars, first_seen,"
            " last_seen, up) VALUES (?,?,?,?,?,?,?,?)",
            (u.instance, u.site, u.cost_per_hour, u.up_seconds, u.dollars, u.first_seen, u.last_seen, int(u.up)))
        return u

    def totals(self, now: float | None = None, fresh_s: float = 60.0) -> dict[str, dict]:
        return site_totals(self.all(), time.time() if now is None else now, fresh_s)


def _usage(r) -> Usage:
    return Usage(r["instance"], r["site"], r["cost_per_hour"], r["up_seconds"], r["dollars"], r["first_seen"],
                 r["last_seen"], bool(r["up"]))


def cost_summary(settings, now: float | None = None) -> dict:
    """For `triton-hybrid status`: cost so far and burn rate per site, the cloud budget."""
    budget = settings.control.scaler.budget_per_hour
    if not settings.database_path.exists():
        return {"sites": {}, "budget_per_hour": budget, "note": "no control database yet"}
    ledger = CostLedger(settings.database_path)
    try:
        totals = ledger.totals(now)
    finally:
        ledger.close()
    cloud_burn = totals.get("cloud", {}).get("burn_per_hour", 0.0)
    return {"sites": totals, "total_dollars": round(sum(t["dollars"] for t in totals.values()), 6),
            "budget_per_hour": budget,
            "cloud_budget_left_per_hour": None if budget is None else round(budget - cloud_burn, 6)}
