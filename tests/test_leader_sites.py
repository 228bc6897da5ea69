"""Two control planes as real processes (`triton-hybrid control run`, one config each: own run dir,
ports, database, leader name and site), one real S3 endpoint (moto's server, its own process) with
bucket versioning on, so every desired-state write that ever landed can be read back. The weight
actuator is dry-run (what it would apply is in each daemon's decision audit: `applied`).

- exactly one leads; SIGKILL the leader: the standby leads within the configured bound (the
  measured seconds are printed); the killed one, restarted, comes back as standby and stays so;
- the leader cut off from S3 (a TCP proxy in front of S3 for that daemon only, holding every byte
  back for longer than the takeover takes, like a link that drops packets): it stops acting by
  itself, the other takes over, and no desired-state write of the old generation lands after the
  new leader's first one;
- both audits together: the two daemons' leading intervals never overlap, and each daemon applied
  weights only inside its own intervals.
"""
from __future__ import annotations

import signal
import time

import pytest
import requests

from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from control.adapters import s3 as s3x
from control.cli import cli
from control.daemon.client import AdminClient, DaemonError
from control.drills.faults import DelayProxy
from control.drills.models import ADD_ONE, write_add_model
from control.drills.sites import applied_times, leading_intervals, transitions
from control.local.isolated import isolated_settings
from control.local.procs import free_port
from control.local.s3_endpoint import start_s3_server
from control.local.stack import start_control_daemon
from control.mirror.desired import DesiredState, control_key
from control.mirror.publish import publish_version
from control.waiting import wait_until

LEADER = dict(enabled=True, lease_s=5.0, renew_s=1.0, skew_margin_s=1.0, s3_timeout_s=1.0, takeover_target_s=10.0)
BOUND = LEADER["lease_s"] + LEADER["skew_margin_s"] + LEADER["renew_s"]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """(settings of the S3 endpoint, client, repo dir): moto's server with a versioned bucket."""
    base = tmp_path_factory.mktemp("leader-s3")
    settings = isolated_settings(base / "s3run")
    proc = start_s3_server(settings)
    try:
        client = s3x.make_client(settings.s3)
        s3x.ensure_bucket(client, settings.s3)
        client.put_bucket_versioning(Bucket=settings.s3.bucket, VersioningConfiguration={"Status": "Enabled"})
        repo = base / "repo"
        write_add_model(repo, version=1)
        publish_version(settings, repo, ADD_ONE, 1, client=client)
        yield settings, client, repo
    finally:
        proc.stop()


def site_settings(tmp_path, s3settings, name: str, site: str, s3_port: int | None = None):
    return isolated_settings(
        tmp_path / name,
        s3={"port": s3_port or s3settings.s3.port, "start_local_server": False},
        control={"actuators": ["dry-run"], "leader": {**LEADER, "name": name, "site": site},
                 "rollout": {"interval_s": 1.0, "analysis_window_s": 2.0, "progress_deadline_s": 5.0}})


def leader_view(settings) -> dict:
    return AdminClient(settings, timeout=3).call("GET", "/v1/leader")


def leads(settings) -> bool:
    return leader_view(settings)["is_leader"]


def follows(settings, leader: str) -> bool:
    v = leader_view(settings)
    return not v["is_leader"] and v["leader"] == leader


def metric(settings, name: str, **labels) -> float:
    text = requests.get(f"http://{settings.control.api_host}:{settings.control.metrics_port}/metrics", timeout=3).text
    return sum(smp.value for fam in text_string_to_metric_families(text) for smp in fam.samples
               if smp.name == name and all(smp.labels.get(k) == v for k, v in labels.items()))


def status_line(settings) -> str:
    r = CliRunner().invoke(cli, ["--config", settings.source, "status"], terminal_width=250)
    assert r.exit_code == 0, r.output
    return next(line for line in r.output.splitlines() if line.startswith("control plane leader"))


def check_never_two_leaders(a, b, a_ends=(), b_ends=()) -> None:
    now = time.time()
    ia = leading_intervals(transitions(a), now, list(a_ends))
    ib = leading_intervals(transitions(b), now, list(b_ends))
    for s1, e1 in ia:
        for s2, e2 in ib:
            assert e1 <= s2 or e2 <= s1, f"both led: {a.control.leader.name} {s1:.2f}..{e1:.2f}, " \
                                         f"{b.control.leader.name} {s2:.2f}..{e2:.2f}"
    for settings, spans in ((a, ia), (b, ib)):
        for ts in applied_times(settings):
            assert any(s <= ts <= e for s, e in spans), \
                f"{settings.control.leader.name} applied weights at {ts:.2f} outside its leading intervals {spans}"


def desired_versions(client, s3settings) -> list[DesiredState]:
    """Every desired.json write that landed, oldest first."""
    key = control_key(s3settings.s3, "desired.json")
    vs = client.list_object_versions(Bucket=s3settings.s3.bucket, Prefix=key).get("Versions", [])
    out = []
    for v in sorted((v for v in vs if v["Key"] == key), key=lambda v: v["LastModified"]):
        body = client.get_object(Bucket=s3settings.s3.bucket, Key=key, VersionId=v["VersionId"])["Body"].read()
        out.append(DesiredState.model_validate_json(body))
    return sorted(out, key=lambda d: d.revision)


def test_one_leads_killed_leader_is_replaced_in_time_and_rejoins_as_standby(tmp_path, s3):
    s3settings, client, _ = s3
    a = site_settings(tmp_path, s3settings, "ctl-a", "onprem")
    b = site_settings(tmp_path, s3settings, "ctl-b", "cloud")
    procs = []
    try:
        procs.append(pa := start_control_daemon(a))
        wait_until(lambda: leads(a), 15, "ctl-a to lead")
        gen_a = leader_view(a)["generation"]
        procs.append(pb := start_control_daemon(b))
        wait_until(lambda: follows(b, "ctl-a@onprem"), 15, "ctl-b to follow ctl-a")
        # Exactly one leads, round after round.
        for _ in range(10):
            va, vb = leader_view(a), leader_view(b)
            assert va["is_leader"] and not vb["is_leader"], (va, vb)
            time.sleep(0.3)
        assert (metric(a, "triton_hybrid_leader"), metric(b, "triton_hybrid_leader")) == (1, 0)
        assert metric(a, "triton_hybrid_leader_generation") == gen_a
        assert metric(a, "triton_hybrid_leader_transitions_total", event="acquired") == 1
        assert metric(b, "triton_hybrid_leader_transitions_total", event="following") == 1
        assert "leader: ctl-a@onprem since" in status_line(b) and status_line(b).endswith("(ctl-b@cloud): standby")
        # A standby refuses changes and names the leader.
        with pytest.raises(DaemonError, match="409.*standby.*ctl-a@onprem"):
            AdminClient(b).call("POST", "/v1/drain", {"target": "cloud"})

        killed_at = time.time()
        pa.signal(signal.SIGKILL)
        wait_until(lambda: leads(b), BOUND + 10, "ctl-b to take over", interval=0.05)
        took = time.time() - killed_at
        print(f"\nTAKEOVER after SIGKILL of the leader: {took:.2f}s (bound {BOUND:g}s, "
              f"target {LEADER['takeover_target_s']:g}s)")
        assert took <= LEADER["takeover_target_s"], took
        vb = leader_view(b)
        assert vb["generation"] == gen_a + 1 and vb["lease"]["holder"] == "ctl-b"
        assert status_line(b).endswith("(ctl-b@cloud): leader") and f"generation {gen_a + 1}" in status_line(b)
        assert metric(b, "triton_hybrid_leader") == 1 and metric(b, "triton_hybrid_leader_generation") == gen_a + 1
        # The fence: the desired state carries the new generation before the new leader acts.
        assert desired_versions(client, s3settings)[-1].generation == gen_a + 1

        pa.stop()
        procs.append(start_control_daemon(a))  # the old leader comes back: standby, and stays so
        wait_until(lambda: follows(a, "ctl-b@cloud"), 15, "restarted ctl-a to follow ctl-b")
        for _ in range(int(2 * LEADER["lease_s"] / 0.5)):
            assert leads(b) and not leads(a)
            time.sleep(0.5)
        assert transitions(a)[-1]["event"] == "following"
        assert "leader: ctl-b@cloud since" in status_line(a) and status_line(a).endswith("(ctl-a@onprem): standby")
        check_never_two_leaders(a, b, a_ends=[killed_at])
    finally:
        for p in reversed(procs):
            p.stop()


def test_leader_cut_off_from_s3_stops_acting_and_no_old_write_lands(tmp_path, s3):
    s3settings, client, repo = s3
    proxy_port = free_port()
    proxy = DelayProxy("127.0.0.1", proxy_port, s3settings.s3.host, s3settings.s3.port).start()
    a = site_settings(tmp_path, s3settings, "ctl-a", "onprem", s3_port=proxy_port)
    b = site_settings(tmp_path, s3settings, "ctl-b", "cloud")
    procs = []
    try:
        procs.append(start_control_daemon(a))
        wait_until(lambda: leads(a), 15, "ctl-a to lead")
        gen_a = leader_view(a)["generation"]
        procs.append(start_control_daemon(b))
        wait_until(lambda: follows(b, "ctl-a@onprem"), 15, "ctl-b to follow ctl-a")
        wait_until(lambda: desired_versions(client, s3settings)[-1].generation == gen_a, 10, "ctl-a's fence")

        # The cut: every byte between ctl-a and S3 is held back longer than the whole takeover takes,
        # so whatever ctl-a sends from now on reaches S3 only after ctl-b leads.
        proxy.set_delay(2 * (BOUND + 5) * 1000)
        cut_at = time.time()
        wait_until(lambda: not leads(a), LEADER["lease_s"] + 2, "ctl-a to stop acting by itself", interval=0.05)
        stopped = time.time() - cut_at
        wait_until(lambda: leads(b), BOUND + 10, "ctl-b to take over", interval=0.05)
        took = time.time() - cut_at
        print(f"\nPARTITION: old leader stopped acting {stopped:.2f}s after the cut; "
              f"standby led after {took:.2f}s (bound {BOUND:g}s)")
        assert took <= LEADER["takeover_target_s"], took
        gen_b = leader_view(b)["generation"]
        assert gen_b == gen_a + 1

        # The new leader works from S3: a version published now is rolled out by it.
        write_add_model(repo, version=2, add=2.0)
        publish_version(s3settings, repo, ADD_ONE, 2, client=client)
        wait_until(lambda: sum(d.generation == gen_b for d in desired_versions(client, s3settings)) >= 2, 20,
                   "ctl-b to write the desired state (its fence, then the rollout of v2)")

        # The link heals (new connections are fast again); what ctl-a sent during the cut still lands
        # late, by `landed_by`: only then is S3's history complete.
        proxy.set_delay(0)
        landed_by = cut_at + BOUND + 5 + 1
        wait_until(lambda: follows(a, "ctl-b@cloud"), 30, "ctl-a to follow ctl-b after the partition")
        assert leads(b)
        wait_until(lambda: time.time() >= landed_by, BOUND + 10, "ctl-a's delayed requests to land")

        # No write of the old generation after the new leader's first one; generations never go back.
        writes = desired_versions(client, s3settings)
        gens = [d.generation for d in writes]
        assert gens == sorted(gens), gens
        first_b = next(i for i, d in enumerate(writes) if d.generation == gen_b)
        assert all(d.generation == gen_b for d in writes[first_b:]), [(d.revision, d.generation) for d in writes]
        # From both audits: ctl-a stepped down by its own deadline before ctl-b acquired.
        down = next(r for r in transitions(a) if r["event"] == "stepped_down")
        up = next(r for r in transitions(b) if r["event"] == "acquired")
        assert down["reason"] == "renew_deadline" and down["ts"] < up["ts"], (down, up)
        print(f"PARTITION: gap between the old leader's last moment and the new one's first: "
              f"{up['ts'] - down['ts']:.2f}s (margin {LEADER['skew_margin_s']:g}s)")
        check_never_two_leaders(a, b)
    finally:
        for p in reversed(procs):
            p.stop()
        proxy.stop()
