"""Version state of the model mirror in the control plane's SQLite database (control/db.py).

Per instance, model and version one row whose status moves
``published -> pulled -> loaded -> live`` or to ``failed`` (with the reason and a kind:
``verify``, ``load``, ``smoke`` are about the version and are not retried on their own;
``unreachable`` is transient) and ``retired`` (removed from the host by retention). A restart
reads these rows and resumes: a verified pull is not repeated, a live version stays live.

Model-level: ``mirror_published`` caches what S3 holds, ``mirror_rejected`` lists versions an
operator rolled back from (sync never brings them back), ``mirror_instances`` the sync health of
each instance (for backoff while S3 or Triton is unreachable), ``mirror_events`` the history.
"""
from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

from control.db import Store

STATUSES = ("published", "pulled", "loaded", "live", "failed", "retired")
PERMANENT_FAILURES = ("verify", "load", "smoke")

DDL = """
CREATE TABLE IF NOT EXISTS mirror_published (
    model TEXT NOT NULL, version INTEGER NOT NULL, content_sha256 TEXT NOT NULL,
    files INTEGER NOT NULL, bytes INTEGER NOT NULL, published_at REAL NOT NULL, seen_at REAL NOT NULL,
    present INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (model, version));
CREATE TABLE IF NOT EXISTS mirror_versions (
    instance TEXT NOT NULL, model TEXT NOT NULL, version INTEGER NOT NULL,
    status TEXT NOT NULL, reason TEXT, failure_kind TEXT,
    content_sha256 TEXT, updated_at REAL NOT NULL,
    pulled_at REAL, loaded_at REAL, live_at REAL,
    PRIMARY KEY (instance, model, version));
CREATE TABLE IF NOT EXISTS mirror_rejected (
    model TEXT NOT NULL, version INTEGER NOT NULL, reason TEXT NOT NULL, at REAL NOT NULL,
    PRIMARY KEY (model, version));
CREATE TABLE IF NOT EXISTS mirror_instances (
    instance TEXT PRIMARY KEY, last_attempt_at REAL, last_ok_at REAL, last_error TEXT,
    consecutive_failures INTEGER NOT NULL DEFAULT 0, next_attempt_at REAL NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS mirror_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, instance TEXT, model TEXT, version INTEGER,
    event TEXT NOT NULL, detail TEXT);
CREATE INDEX IF NOT EXISTS mirror_events_at ON mirror_events(at);
"""
# Migration i takes the tables from schema version i to i+1 (control/db.migrate); append, never edit.
MIGRATIONS = [DDL]


def _filters(**columns) -> tuple[str, list]:
    """` AND col=?` for each given (non-empty) column value, and the arguments (names are ours, not input)."""
    given = {k: v for k, v in columns.items() if v}
    return "".join(f" AND {k}=?" for k in given), list(given.values())


class MirrorState(Store):
    component, migrations = "mirror_state", MIGRATIONS

    def __init__(self, db_path: str | Path):
        self.path = Path(db_path)
        super().__init__(self.path)
        self._lock = threading.Lock()

    @classmethod
    def for_settings(cls, settings) -> "MirrorState":
        return cls(settings.database_path)

    def _exec(self, sql: str, args=()) -> sqlite3.Cursor:
        with self._lock:
            return self.conn.execute(sql, args)

    # Published (what S3 holds) ---------------------------------------------------------------
    def record_published(self, model: str, version: int, content_sha256: str, files: int, nbytes: int,
                         published_at: float) -> None:
        now = time.time()
        self._exec("""INSERT INTO mirror_published(model, version, content_sha256, files, bytes, published_at, seen_at, present)
                      VALUES (?,?,?,?,?,?,?,1)
                      ON CONFLICT(model, version) DO UPDATE SET content_sha256=excluded.content_sha256,
                      files=excluded.files, bytes=excluded.bytes, published_at=excluded.published_at,
                      seen_at=excluded.seen_at, present=1""",
                   (model, version, content_sha256, files, nbytes, published_at, now))

    def mark_unpublished(self, model: str, version: int) -> None:
        self._exec("UPDATE mirror_published SET present=0 WHERE model=? AND version=?", (model, version))

    def published(self, model: str | None = None, present_only: bool = True) -> list[dict]:
        sql = "SELECT * FROM mirror_published WHERE 1=1"
        args: list = []
        if model:
            sql += " AND model=?"
            args.append(model)
        if present_only:
            sql += " AND present=1"
        return [dict(r) for r in self._exec(sql + " ORDER BY model, version", args).fetchall()]

    # Per instance ----------------------------------------------------------------------------
    def set_status(self, instance: str, model: str, version: int, status: str, reason: str | None = None,
                   failure_kind: str | None = None, content_sha256: str | None = None) -> None:
        if status not in STATUSES:
            raise ValueError(f"unknown version status {status!r}; one of {sorted(STATUSES)}")
        now = time.time()
        stamp = {"pulled": "pulled_at", "loaded": "loaded_at", "live": "live_at"}.get(status)
        self._exec(f"""INSERT INTO mirror_versions(instance, model, version, status, reason, failure_kind,
                          content_sha256, updated_at{', ' + stamp if stamp else ''})
                       VALUES (?,?,?,?,?,?,?,?{',?' if stamp else ''})
                       ON CONFLICT(instance, model, version) DO UPDATE SET status=excluded.status,
                          reason=excluded.reason, failure_kind=excluded.failure_kind,
                          content_sha256=COALESCE(excluded.content_sha256, content_sha256),
                          updated_at=excluded.updated_at{f', {stamp}=excluded.{stamp}' if stamp else ''}""",
                   (instance, model, version, status, reason, failure_kind, content_sha256, now, *([now] if stamp else [])))
        self.event(instance, model, version, status, reason)

    def get(self, instance: str, model: str, version: int) -> dict | None:
        r = self._exec("SELECT * FROM mirror_versions WHERE instance=? AND model=? AND version=?",
                       (instance, model, version)).fetchone()
        return dict(r) if r else None

    def rows(self, instance: str | None = None, model: str | None = None) -> list[dict]:
        where, args = _filters(instance=instance, model=model)
        return [dict(r) for r in self._exec(f"SELECT * FROM mirror_versions WHERE 1=1{where} "
                                            "ORDER BY instance, model, version", args).fetchall()]

    def live_version(self, instance: str, model: str) -> int | None:
        r = self._exec("SELECT version FROM mirror_versions WHERE instance=? AND model=? AND status='live' "
                       "ORDER BY live_at DESC LIMIT 1", (instance, model)).fetchone()
        return int(r[0]) if r else None

    def live_versions_anywhere(self, model: str) -> set[int]:
        return {int(r[0]) for r in self._exec(
            "SELECT DISTINCT version FROM mirror_versions WHERE model=? AND status='live'", (model,)).fetchall()}

    def permanently_failed(self, instance: str, model: str) -> set[int]:
        q = ",".join("?" * len(PERMANENT_FAILURES))
        return {int(r[0]) for r in self._exec(
            f"SELECT version FROM mirror_versions WHERE instance=? AND model=? AND status='failed' "
            f"AND failure_kind IN ({q})", (instance, model, *PERMANENT_FAILURES)).fetchall()}

    def clear_failures(self, model: str | None = None, instance: str | None = None) -> int:
        where, args = _filters(model=model, instance=instance)
        return self._exec("UPDATE mirror_versions SET status='published', reason=NULL, failure_kind=NULL "
                          f"WHERE status='failed'{where}", args).rowcount

    # Rejected (rolled back from) --------------------------------------------------------------
    def reject(self, model: str, version: int, reason: str) -> None:
        self._exec("INSERT OR REPLACE INTO mirror_rejected(model, version, reason, at) VALUES (?,?,?,?)",
                   (model, version, reason, time.time()))
        self.event(None, model, version, "rejected", reason)

    def unreject(self, model: str, version: int) -> None:
        self._exec("DELETE FROM mirror_rejected WHERE model=? AND version=?", (model, version))

    def rejected(self, model: str) -> dict[int, str]:
        return {int(r["version"]): r["reason"] for r in self._exec(
            "SELECT version, reason FROM mirror_rejected WHERE model=?", (model,)).fetchall()}

    # Instance sync health (backoff) -----------------------------------------------------------
    def instance_health(self, instance: str) -> dict:
        r = self._exec("SELECT * FROM mirror_instances WHERE instance=?", (instance,)).fetchone()
        return dict(r) if r else {"instance": instance, "last_attempt_at": None, "last_ok_at": None,
                                  "last_error": None, "consecutive_failures": 0, "next_attempt_at": 0}

    def instance_ok(self, instance: str) -> None:
        now = time.time()
        self._exec("""INSERT INTO mirror_instances(instance, last_attempt_at, last_ok_at, last_error, consecutive_failures, next_attempt_at)
                      VALUES (?,?,?,NULL,0,0) ON CONFLICT(instance) DO UPDATE SET last_attempt_at=excluded.last_attempt_at,
                      last_ok_at=excluded.last_ok_at, last_error=NULL, consecutive_failures=0, next_attempt_at=0""",
                   (instance, now, now))

    def instance_failed(self, instance: str, error: str, base_delay: float, max_delay: float = 300.0) -> float:
        """Record a transient failure; return the backoff delay before the next scheduled attempt."""
        h = self.instance_health(instance)
        n = int(h["consecutive_failures"]) + 1
        delay = min(max_delay, base_delay * (2 ** (n - 1)))
        now = time.time()
        self._exec("""INSERT INTO mirror_instances(instance, last_attempt_at, last_ok_at, last_error, consecutive_failures, next_attempt_at)
                      VALUES (?,?,NULL,?,?,?) ON CONFLICT(instance) DO UPDATE SET last_attempt_at=excluded.last_attempt_at,
                      last_error=excluded.last_error, consecutive_failures=excluded.consecutive_failures,
                      next_attempt_at=excluded.next_attempt_at""",
                   (instance, now, error, n, now + delay))
        return delay

    # Events ------------------------------------------------------------------------------------
    def event(self, instance: str | None, model: str | None, version: int | None, event: str,
              detail: str | None = None) -> None:
        self._exec("INSERT INTO mirror_events(at, instance, model, version, event, detail) VALUES (?,?,?,?,?,?)",
                   (time.time(), instance, model, version, event, detail))

    def events(self, limit: int = 50, model: str | None = None) -> list[dict]:
        sql = "SELECT * FROM mirror_events"
        args: list = []
        if model:
            sql += " WHERE model=?"
            args.append(model)
        return [dict(r) for r in self._exec(sql + " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()]
