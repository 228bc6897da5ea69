"""The two acceptance drills of issue 16 (control/drills/sites.py), each run once with real processes:
moto's server (S3 + Route53) in the root namespace; per site a network namespace with its Triton host
+ host agent and its HAProxy entry + entry agent; per site a namespace with its control plane
(`triton-hybrid control run`, leader election on, actuators entries + route53); clients in the root
namespace through both entries.

- site-down: both on-prem namespaces' links go down at once under load: 0 failed at the cloud entry,
  the cloud control plane leads within the target, Route53 at the cloud entry only, every sensitive
  request at the cloud entry refused with the reason and none served by the cloud Triton; the site
  returns as standby, one move back, no flapping, never two control planes acting (both audits).
- control-partition: the leader's link goes down while the sites serve: it steps down by its own
  deadline, the other leads, no write of the old generation lands after the new leader's (every
  version of desired.json and traffic.json read back), 0 failed requests.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from control.drills import netns, sites

CFG = sites.SiteDrillConfig(rate=15.0, before_s=3.0, outage_s=4.0, settle_s=6.0, landing_s=5.0)


@pytest.fixture(scope="module")
def dirs():
    # Short run dirs: HAProxy refuses stats socket paths over 97 characters.
    runs = Path(tempfile.mkdtemp(prefix="thd-s-"))
    yield runs
    shutil.rmtree(runs, ignore_errors=True)


def run(name: str, runs: Path) -> dict:
    rep = sites.run_site_drill(name, runs / "run", CFG, reports_dir=runs / "reports", say=print)
    if rep["status"] == "skipped":
        pytest.skip(rep["skip_reason"])
    print(json.dumps({k: v for k, v in rep["figures"].items() if k != "audit"}, default=str))
    failed = [t for t in rep["targets"] if not t["ok"]]
    assert not failed, failed
    assert json.loads((Path(rep["report_dir"]) / "report.json").read_text())["status"] == "passed"
    # Everything made is gone: namespaces, the bridge, every process started under the run dir.
    made = rep["figures"]["made"]
    assert len(made) == 5 and all(n.startswith(netns.PREFIX) for n in made)
    assert not set(made) & set(netns.leftovers())
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert not [n for n in made if f" {n}:" in links]
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(runs / "run") not in ps
    return rep["figures"]


def test_pure_helpers():
    assert sites.onprem_moves([0, 99]) == (1, 0)
    assert sites.onprem_moves([0, 50, 99]) == (2, 0)
    assert sites.onprem_moves([0, 99, 0, 99]) == (2, 2)        # a flap: back, out, back
    rows = [{"event": "acquired", "ts": 1.0}, {"event": "stepped_down", "ts": 4.0},
            {"event": "following", "ts": 5.0}, {"event": "acquired", "ts": 9.0}]
    spans = sites.leading_intervals(rows, now=12.0)
    assert spans == [(1.0, 4.0), (9.0, 12.0)]
    assert sites.overlaps(spans, [(4.5, 8.5)]) == []
    assert sites.overlaps(spans, [(3.0, 5.0)]) == [((1.0, 4.0), (3.0, 5.0))]
    assert sites.outside([2.0, 6.0, 10.0], spans) == [6.0]


def test_cli_refuses_without_network_namespaces():
    """Not root: a clear error naming what is missing, before anything starts."""
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m",
                        "control.cli", "drill", "site-down"], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).parent.parent, env={**os.environ, "HOME": "/tmp"})
    assert r.returncode == 1, r.stdout + r.stderr
    assert "network namespace" in r.stderr and "need root" in r.stderr and "Run it as root" in r.stderr, r.stderr


@pytest.mark.slow
def test_site_down(dirs):
    f = run("site-down", dirs)
    assert f["cloud_entry"]["failed"] == 0 and f["cloud_entry"]["sent"] >= CFG.rate * (CFG.before_s + CFG.outage_s)
    assert f["takeover_s"] <= CFG.takeover_target_s
    assert f["dns_during_outage"] == {"onprem": 0, "cloud": 100}
    s = f["sensitive_outage"]
    assert s["sent"] > 0 and s["refused_with_reason"] == s["sent"]
    assert s["served_by_cloud_triton_whole_run"] == 0 and s["answered_200_whole_outage"] == 0
    assert f["after_failback"]["onprem_role"] == "standby" and f["after_failback"]["dns"]["onprem"] > 0
    assert f["failback"]["moves_back"] == 1 and f["failback"]["direction_changes"] == 0
    assert not f["audit"]["overlaps"] and not any(f["audit"]["applied_outside_lead"].values())


@pytest.mark.slow
def test_control_partition(dirs):
    f = run("control-partition", dirs)
    assert f["old_step_down_reason"] == "renew_deadline"
    assert f["old_stopped_acting_s"] < CFG.lease_s and f["takeover_s"] <= CFG.takeover_target_s
    assert f["gap_s"] > 0
    for name, w in f["writes"].items():
        assert w["old_after_new"] == 0 and w["old_stamped_after_new_led"] == 0, (name, w)
        assert w["generations"] == sorted(w["generations"]), (name, w)
    # The new leader raised both objects' generation before it acted (its fence).
    assert f["writes"]["desired.json"]["generations"][-1] == f["generation"]
    assert f["writes"]["traffic.json"]["generations"][-1] == f["generation"]
    assert all(e["failed"] == 0 for e in f["entries"].values()), f["entries"]
    assert not f["audit"]["overlaps"]
