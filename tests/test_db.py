"""The control plane's SQLite: schema versions per component, migrations applied once, a database
from a newer release refused."""
from __future__ import annotations

import pytest

from control import db
from control.rollout.audit import RolloutAudit
from control.traffic import audit as audit_mod
from control.traffic.audit import Audit

V1 = "CREATE TABLE IF NOT EXISTS t (a INTEGER);"
V2 = "ALTER TABLE t ADD COLUMN b TEXT;"


def test_migrations_apply_once_in_order(tmp_path):
    conn = db.connect(tmp_path / "c.db")
    assert db.migrate(conn, "demo", [V1]) == 1
    conn.execute("INSERT INTO t (a) VALUES (1)")
    assert db.migrate(conn, "demo", [V1, V2]) == 2  # only V2 runs: ALTER would fail a second time
    assert db.migrate(conn, "demo", [V1, V2]) == 2
    assert [tuple(r) for r in conn.execute("SELECT a, b FROM t")] == [(1, None)]
    assert conn.execute("SELECT version FROM schema_versions WHERE component='demo'").fetchone()[0] == 2


def test_a_database_from_a_newer_release_is_refused(tmp_path):
    conn = db.connect(tmp_path / "c.db")
    db.migrate(conn, "demo", [V1, V2])
    with pytest.raises(db.SchemaError, match="schema version 2, this release knows up to 1.*newer triton-hybrid"):
        db.migrate(conn, "demo", [V1])


def test_a_database_made_before_versioning_is_adopted(tmp_path):
    """Tables made by an earlier release (no schema_versions) keep their rows."""
    path = tmp_path / "control.db"
    conn = db.connect(path)
    conn.executescript(audit_mod.DDL)
    conn.close()
    a = Audit(path)
    try:
        versions = dict(a.conn.execute("SELECT component, version FROM schema_versions").fetchall())
        assert versions["audit"] == len(audit_mod.MIGRATIONS)
    finally:
        a.close()


def test_components_version_independently(tmp_path):
    path = tmp_path / "control.db"
    a, r = Audit(path), RolloutAudit(path)
    try:
        versions = dict(a.conn.execute("SELECT component, version FROM schema_versions").fetchall())
        assert versions == {"audit": len(audit_mod.MIGRATIONS), "rollout": len(RolloutAudit.migrations)}
    finally:
        a.close()
        r.close()
