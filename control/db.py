"""The control plane's SQLite database: one file under the run dir, shared by the traffic and
scaling audit (control/traffic/audit.py), the rollout audit (control/rollout/audit.py) and the cost
ledger. Only audit and cache: the decisions that must survive (desired versions, rejections, the
operator's overrides and drains) live in the S3 mirror, where the other site's control plane reads them. Each module owns its tables and creates them with
`migrate`; WAL mode so the CLI can read while the daemon writes.

Schema versions: each module (component) hands `migrate` its list of migration scripts; script i
takes that component from version i to i+1. The applied version is kept per component in the
`schema_versions` table, so an upgrade applies only what is new, and a database written by a newer
release is refused with a clear error instead of being misread. Scripts must be idempotent for
version 0 -> 1 (`CREATE TABLE IF NOT EXISTS`): databases made before versioning start there."""
from __future__ import annotations

import sqlite3
from pathlib import Path


def connect(path: str | Path) -> sqlite3.Connection:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=10, isolation_level=None, check_same_thread=False)
    path.chmod(0o600)  # owner only; SQLite gives its -wal/-shm files the same mode
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA busy_timeout=10000")
    return conn


class SchemaError(RuntimeError):
    """The database was written by a newer release (or is not ours)."""


def migrate(conn: sqlite3.Connection, component: str, migrations: list[str]) -> int:
    """Bring `component`'s tables to len(migrations); return the version now in the database."""
    conn.execute("CREATE TABLE IF NOT EXISTS schema_versions (component TEXT PRIMARY KEY, version INTEGER NOT NULL)")
    row = conn.execute("SELECT version FROM schema_versions WHERE component = ?", (component,)).fetchone()
    have = row[0] if row else 0
    want = len(migrations)
    if have > want:
        raise SchemaError(f"the {component} tables are at schema version {have}, this release knows up to {want}: "
                          "the database was written by a newer triton-hybrid. Upgrade, or point run_dir elsewhere")
    for version in range(have, want):
        # executescript commits on its own; the version row follows each script, so a crash in
        # between re-runs one idempotent script, never skips one.
        conn.executescript(migrations[version])
        conn.execute("INSERT INTO schema_versions (component, version) VALUES (?, ?) "
                     "ON CONFLICT(component) DO UPDATE SET version = excluded.version", (component, version + 1))
    return want


class Store:
    """A module's tables in the control database: one connection, migrated on open. Subclasses set
    `component` (its name in schema_versions) and `migrations`."""

    component: str
    migrations: list[str]

    def __init__(self, path: str | Path):
        self.conn = connect(path)
        migrate(self.conn, self.component, self.migrations)

    def close(self) -> None:
        self.conn.close()
