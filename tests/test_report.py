"""`triton-hybrid report`: a PNG of weights and per-site traffic over time.

- from the decision audit: a control database with the audit's own schema (control/traffic/audit.py DDL)
  holding a scripted scenario (steady on-prem -> scale out to the cloud on utilization -> on-prem
  down, failover -> failback); the command writes a real PNG and its summary counts the
  decisions, weight changes, failover span and per-site traffic;
- from Prometheus: the range-query path against a tiny fake Prometheus HTTP API (the live path
  against a real Prometheus runs in tests/test_prometheus_live.py);
- errors: no database, no rows, a bad --since, are clean CLI errors.
"""
from __future__ import annotations

import json
import threading
import time
from http.server import HTTPServer
from urllib.parse import parse_qs, urlparse

import pytest
from click.testing import CliRunner
from http_fakes import QuietHandler

from control import db
from control.cli import cli
from control.durations import parse_duration
from control.traffic import audit
from control.traffic import chart as report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_scenario(db_path, now: float, ticks: int = 600) -> None:
    """One decision per second over 10 minutes, in the audit table's real schema."""
    conn = db.connect(db_path)
    db.migrate(conn, "audit", audit.MIGRATIONS)
    w = {"onprem": 100, "cloud": 0}
    for n in range(ticks):
        ts = now - ticks + n
        old = dict(w)
        failover = None
        if n < 120:
            reason, util_on = "steady", 0.4
        elif n < 300:
            util_on = 0.9
            reason = "scale_out_util" if n % 20 == 0 and w["cloud"] < 60 else "hold_sustain"
            if reason == "scale_out_util":
                w = {"onprem": w["onprem"] - 20, "cloud": w["cloud"] + 20}
        elif n < 420:
            util_on, failover = None, "onprem"
            reason = "failover_onprem_down" if n == 300 else "failback_wait"
            w = {"onprem": 0, "cloud": 100}
        else:
            util_on = 0.6
            reason = "failback" if n == 420 else "steady"
            if n == 420:
                w = {"onprem": 60, "cloud": 40}
        total = 200.0
        rps_on = total * w["onprem"] / 100
        inputs = {"instances": {
            "onprem-1": {"state": "unhealthy" if failover else "healthy", "util": util_on, "kind": "cpu",
                         "queue_ms": None if failover else (25.0 if util_on and util_on > 0.8 else 2.0), "rps": rps_on},
            "cloud-1": {"state": "healthy", "util": 0.3, "kind": "cpu", "queue_ms": 1.5, "rps": total - rps_on},
        }}
        conn.execute(
            "INSERT INTO control_decisions (ts, reason, message, old_weights, new_weights, instance_weights, changed,"
            " inputs, state, actuator, applied) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (ts, reason, reason, json.dumps(old), json.dumps(w), json.dumps({"onprem-1": w["onprem"], "cloud-1": w["cloud"]}),
             int(old != w), json.dumps(inputs), json.dumps({"failover_site": failover}), "haproxy", 1))
    conn.close()


def test_report_from_audit_writes_png(tmp_path):
    db_path = tmp_path / "control.db"
    write_scenario(db_path, time.time())
    out = tmp_path / "report.png"
    r = CliRunner().invoke(cli, ["report", "--since", "1h", "--out", str(out), "--db", str(db_path), "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)  # stdout alone: a warning on stderr is not part of the JSON
    assert out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size > 20_000
    assert summary["decisions"] == 600
    assert summary["weight_changes"] == 5  # three scale-outs, the failover, the failback
    assert summary["reasons"]["scale_out_util"] == 3
    assert summary["failover_spans"] == 1
    assert summary["final_weights"] == {"onprem": 60.0, "cloud": 40.0}
    assert summary["mean_rps"]["onprem"] + summary["mean_rps"]["cloud"] == pytest.approx(200.0)
    assert [c["reason"] for c in summary["changes"]] == ["scale_out_util"] * 3 + ["failover_onprem_down", "failback"]


def test_report_window_limits_rows(tmp_path):
    db_path = tmp_path / "control.db"
    now = time.time()
    write_scenario(db_path, now)
    data = report.from_audit(db_path, 100, {"onprem-1": "onprem", "cloud-1": "cloud"}, now=now)
    assert 99 <= len(data.weights["onprem"]) <= 101
    assert not data.changes  # the last 100 s are steady


def test_report_errors_are_clean(tmp_path):
    runner = CliRunner()
    r = runner.invoke(cli, ["report", "--db", str(tmp_path / "nope.db"), "--out", str(tmp_path / "x.png")])
    assert r.exit_code != 0 and "no control database" in r.output
    db_path = tmp_path / "empty.db"
    write_scenario(db_path, time.time() - 7200, ticks=10)
    r = runner.invoke(cli, ["report", "--since", "30m", "--db", str(db_path), "--out", str(tmp_path / "x.png")])
    assert r.exit_code != 0 and "no decisions or samples" in r.output
    r = runner.invoke(cli, ["report", "--since", "soon", "--db", str(db_path)])
    assert r.exit_code != 0 and "not a duration" in r.output


def test_parse_duration():
    assert parse_duration("90s") == 90
    assert parse_duration("1h30m") == 5400
    assert parse_duration("2d") == 172800
    with pytest.raises(ValueError):
        parse_duration("1 hour")


class _FakePrometheus(QuietHandler):
    """Answers /api/v1/query_range like Prometheus does, for the report's five queries."""

    def do_GET(self):  # noqa: N802
        q = parse_qs(urlparse(self.path).query)
        expr, start, end, step = q["query"][0], float(q["start"][0]), float(q["end"][0]), float(q["step"][0])
        times = [start + k * step for k in range(int((end - start) / step) + 1)]
        half = times[len(times) // 2]

        def series(labels, fn):
            return {"metric": labels, "values": [[t, str(fn(t))] for t in times]}

        if "site_weight" in expr:
            result = [series({"site": "onprem"}, lambda t: 100 if t < half else 70),
                      series({"site": "cloud"}, lambda t: 0 if t < half else 30)]
        elif "nv_inference_request_success" in expr:
            result = [series({"site": "onprem"}, lambda t: 50.0), series({"site": "cloud"}, lambda t: 0 if t < half else 20.0)]
        elif "queue_ms" in expr:
            result = [series({"instance": "onprem-1"}, lambda t: 3.0)]
        elif "failover_active" in expr:
            result = [series({"site": "onprem"}, lambda t: 0), series({"site": "cloud"}, lambda t: 0)]
        else:
            result = [series({}, lambda t: 0)]
        self.reply(json.dumps({"status": "success", "data": {"resultType": "matrix", "result": result}}).encode(),
                   "application/json")


def test_report_from_prometheus_api(tmp_path):
    server = HTTPServer(("127.0.0.1", 0), _FakePrometheus)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out = tmp_path / "prom.png"
        url = f"http://127.0.0.1:{server.server_port}"
        r = CliRunner().invoke(cli, ["report", "--since", "10m", "--out", str(out), "--prometheus", url, "--json"])
        assert r.exit_code == 0, r.output
        summary = json.loads(r.stdout)  # stdout alone: a warning on stderr is not part of the JSON
        assert out.read_bytes()[:8] == PNG_MAGIC
        assert summary["final_weights"] == {"onprem": 70.0, "cloud": 30.0}
        assert summary["weight_changes"] == 1
    finally:
        server.shutdown()
