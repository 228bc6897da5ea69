"""Route53 weighted records, each with a Route53 health check on its site entry, through boto3,
against moto's local endpoint server (a real HTTP server speaking the Route53 API; it stores health
checks but does not run them)."""
from __future__ import annotations

import boto3
import pytest

from control.adapters.route53 import CALLER_PREFIX, Route53Actuator, Route53Weights
from control.config import Route53Config
from control.local.isolated import isolated_settings as make_settings
from control.local.procs import free_port
from control.traffic.actuators import ActuatorError, Plan

TARGETS = {"onprem": "lb.onprem.example.com.", "cloud": "lb.cloud.example.com."}


@pytest.fixture
def aws_env(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")


@pytest.fixture
def client(moto_endpoint, aws_env):
    return boto3.client("route53", endpoint_url=moto_endpoint, region_name="us-east-1")


@pytest.fixture
def zone(client):
    z = client.create_hosted_zone(Name="search.example.com.", CallerReference=str(free_port()))
    zone_id = z["HostedZone"]["Id"].split("/")[-1]
    yield zone_id
    # moto's server lives for the module: health checks left by one test would show in the next.
    for hc in client.list_health_checks()["HealthChecks"]:
        client.delete_health_check(HealthCheckId=hc["Id"])


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def config(moto_endpoint, zone, **kw) -> Route53Config:
    return Route53Config(endpoint_url=moto_endpoint, hosted_zone_id=zone, record_name="triton.search.example.com",
                         **{"targets": TARGETS, **kw})


def actuator(moto_endpoint, zone, clock=None, **kw):
    rc = config(moto_endpoint, zone, **kw)
    return Route53Actuator(Route53Weights.from_config(rc, **({"clock": clock} if clock else {})))


def plan(on, cl):
    return Plan({"onprem": on, "cloud": cl}, {})


def records(client, zone) -> dict[str, dict]:
    rrs = client.list_resource_record_sets(HostedZoneId=zone)["ResourceRecordSets"]
    return {r["SetIdentifier"]: r for r in rrs if r["Name"] == "triton.search.example.com."}


def checks(client) -> dict[str, dict]:
    return {hc["Id"]: hc for hc in client.list_health_checks()["HealthChecks"]}


def test_weights_are_written_and_read_back(moto_endpoint, zone):
    a = actuator(moto_endpoint, zone)
    r = a.apply(plan(100, 0))
    assert r.observed.site_weights == {"onprem": 100, "cloud": 0}
    assert r.commands and r.drift
    r = a.apply(plan(70, 30))
    assert r.observed.site_weights == {"onprem": 70, "cloud": 30}
    # Idempotent: nothing to do when the records already match.
    r = a.apply(plan(70, 30))
    assert r.commands == [] and r.drift == []


def test_records_are_real_weighted_records(moto_endpoint, zone, client):
    a = actuator(moto_endpoint, zone, ttl=15)
    a.apply(plan(40, 60))
    by_site = records(client, zone)
    assert set(by_site) == {"onprem", "cloud"}
    assert by_site["onprem"]["Weight"] == 40 and by_site["cloud"]["Weight"] == 60
    assert by_site["cloud"]["ResourceRecords"] == [{"Value": "lb.cloud.example.com."}]
    assert by_site["cloud"]["TTL"] == 15 and by_site["cloud"]["Type"] == "CNAME"


def test_each_site_entry_gets_one_health_check_and_its_record_carries_it(moto_endpoint, zone, client):
    """Defaults: a check on each entry's name (the CNAME target), HAProxy's HTTP port, Triton's
    readiness through the entry; the record of that site points at it."""
    a = actuator(moto_endpoint, zone)
    a.apply(plan(60, 40))
    hcs = checks(client)
    assert len(hcs) == 2
    by_site = records(client, zone)
    for site, target in TARGETS.items():
        hc = hcs[by_site[site]["HealthCheckId"]]
        cfg = hc["HealthCheckConfig"]
        assert cfg["FullyQualifiedDomainName"] == target.rstrip(".") and not cfg.get("IPAddress")
        assert (cfg["Type"], cfg["Port"], cfg["ResourcePath"]) == ("HTTP", 8000, "/v2/health/ready")
        assert (cfg["RequestInterval"], cfg["FailureThreshold"]) == (30, 3)
        assert hc["CallerReference"].startswith(CALLER_PREFIX + site)
    assert by_site["onprem"]["HealthCheckId"] != by_site["cloud"]["HealthCheckId"]
    assert [row["health_check_id"] for row in a.observe().servers] == [by_site["cloud"]["HealthCheckId"],
                                                                        by_site["onprem"]["HealthCheckId"]]


def test_health_check_settings_per_site(moto_endpoint, zone, client):
    a = actuator(moto_endpoint, zone, health_checks={
        "cloud": {"address": "203.0.113.10", "port": 443, "type": "HTTPS", "path": "/healthz",
                  "request_interval_s": 10, "failure_threshold": 2}})
    a.apply(plan(50, 50))
    by_site, hcs = records(client, zone), checks(client)
    cloud = hcs[by_site["cloud"]["HealthCheckId"]]["HealthCheckConfig"]
    assert cloud["IPAddress"] == "203.0.113.10" and not cloud.get("FullyQualifiedDomainName")
    assert (cloud["Type"], cloud["Port"], cloud["ResourcePath"]) == ("HTTPS", 443, "/healthz")
    assert (cloud["RequestInterval"], cloud["FailureThreshold"]) == (10, 2)
    onprem = hcs[by_site["onprem"]["HealthCheckId"]]["HealthCheckConfig"]
    assert onprem["FullyQualifiedDomainName"] == "lb.onprem.example.com" and onprem["Port"] == 8000


def test_weight_zero_keeps_the_record_and_its_health_check(moto_endpoint, zone, client):
    a = actuator(moto_endpoint, zone)
    a.apply(plan(50, 50))
    cloud_check = records(client, zone)["cloud"]["HealthCheckId"]
    a.apply(plan(100, 0))
    by_site = records(client, zone)
    assert by_site["cloud"]["Weight"] == 0 and by_site["cloud"]["HealthCheckId"] == cloud_check
    assert cloud_check in checks(client)


def test_restarts_make_no_second_health_check(moto_endpoint, zone, client):
    """A new process finds the checks it made: through the records, or by the CallerReference
    when it stopped between making a check and writing the record."""
    actuator(moto_endpoint, zone).apply(plan(80, 20))
    first = set(checks(client))
    again = actuator(moto_endpoint, zone).apply(plan(80, 20))
    assert again.commands == [] and again.drift == []
    assert set(checks(client)) == first
    # Stopped after making the checks of another zone's record set, before any record was written.
    z2 = client.create_hosted_zone(Name="search.example.com.", CallerReference=str(free_port()))["HostedZone"]["Id"]
    z2 = z2.split("/")[-1]
    w = actuator(moto_endpoint, z2).records
    w.ensure_checks({"onprem", "cloud"}, {})
    made = set(checks(client)) - first
    assert len(made) == 2 and records(client, z2) == {}
    actuator(moto_endpoint, z2).apply(plan(80, 20))
    assert set(checks(client)) == first | made
    assert {r["HealthCheckId"] for r in records(client, z2).values()} == made


def test_changed_settings_update_the_check_or_replace_it(moto_endpoint, zone, client):
    actuator(moto_endpoint, zone).apply(plan(70, 30))
    ids = {s: r["HealthCheckId"] for s, r in records(client, zone).items()}
    # Port, path and threshold: Route53 updates a check in place.
    a = actuator(moto_endpoint, zone, health_checks={"cloud": {"port": 8080, "path": "/healthz", "failure_threshold": 5}})
    r = a.apply(plan(70, 30))
    assert r.commands == []
    assert {s: rec["HealthCheckId"] for s, rec in records(client, zone).items()} == ids
    cfg = checks(client)[ids["cloud"]]["HealthCheckConfig"]
    assert (cfg["Port"], cfg["ResourcePath"], cfg["FailureThreshold"]) == (8080, "/healthz", 5)
    # The updated check keeps guarding its entry when its record is stripped of it by hand.
    rec = records(client, zone)["cloud"]
    client.change_resource_record_sets(HostedZoneId=zone, ChangeBatch={"Changes": [{"Action": "UPSERT",
        "ResourceRecordSet": {k: v for k, v in rec.items() if k != "HealthCheckId"}}]})
    assert a.apply(plan(70, 30)).drift
    assert records(client, zone)["cloud"]["HealthCheckId"] == ids["cloud"] and len(checks(client)) == 2
    # The type: a new check; the record moves to it and the replaced one is deleted.
    a = actuator(moto_endpoint, zone, health_checks={"cloud": {"type": "HTTPS", "port": 443}})
    r = a.apply(plan(70, 30))
    new = records(client, zone)["cloud"]["HealthCheckId"]
    assert new != ids["cloud"] and r.commands and r.drift
    assert set(checks(client)) == {ids["onprem"], new}
    assert checks(client)[new]["HealthCheckConfig"]["Type"] == "HTTPS"


def test_hand_edit_is_seen_as_drift_and_reconciled(moto_endpoint, zone):
    a = actuator(moto_endpoint, zone)
    a.apply(plan(80, 20))
    a.records.write({"onprem": 10, "cloud": 90}, comment="hand edit")
    assert a.observe().site_weights == {"onprem": 10, "cloud": 90}
    r = a.apply(plan(80, 20))
    assert r.drift and r.observed.site_weights == {"onprem": 80, "cloud": 20}


def test_health_check_drift_is_reconciled(moto_endpoint, zone, client):
    """A record stripped of its check is repaired at the next apply; a check edited or deleted by
    hand, when the checks are next verified (control.route53.health_check_verify_s)."""
    clock = Clock()
    a = actuator(moto_endpoint, zone, clock=clock, health_check_verify_s=60)
    a.apply(plan(80, 20))
    rec = records(client, zone)["onprem"]
    onprem_check = rec["HealthCheckId"]
    client.change_resource_record_sets(HostedZoneId=zone, ChangeBatch={"Changes": [{"Action": "UPSERT",
        "ResourceRecordSet": {k: v for k, v in rec.items() if k != "HealthCheckId"}}]})
    assert "HealthCheckId" not in records(client, zone)["onprem"]
    r = a.apply(plan(80, 20))
    assert r.drift and records(client, zone)["onprem"]["HealthCheckId"] == onprem_check
    # By hand: the on-prem check's port changed, the cloud check deleted.
    cloud_check = records(client, zone)["cloud"]["HealthCheckId"]
    client.update_health_check(HealthCheckId=onprem_check, Port=9999)
    client.delete_health_check(HealthCheckId=cloud_check)
    clock.t += 61
    a.apply(plan(80, 20))
    assert checks(client)[onprem_check]["HealthCheckConfig"]["Port"] == 8000
    new_cloud = records(client, zone)["cloud"]["HealthCheckId"]
    assert new_cloud != cloud_check and new_cloud in checks(client)
    assert len(checks(client)) == 2


def test_missing_target_or_zone_is_a_clear_error(moto_endpoint, zone, client):
    rc = Route53Config(endpoint_url=moto_endpoint, hosted_zone_id=zone, targets={"onprem": "lb.onprem.example.com."})
    a = Route53Actuator(Route53Weights.from_config(rc))
    with pytest.raises(ActuatorError, match="control.route53.targets has no target for site 'cloud'"):
        a.apply(plan(50, 50))
    assert records(client, zone) == {} and checks(client) == {}   # nothing written before the error
    with pytest.raises(ActuatorError, match="hosted_zone_id"):
        Route53Weights.from_config(Route53Config(endpoint_url=moto_endpoint))
    bad = actuator(moto_endpoint, "ZNOSUCHZONE")
    with pytest.raises(ActuatorError, match="control.route53.hosted_zone_id 'ZNOSUCHZONE': Route53 has no such"):
        bad.apply(plan(50, 50))
    other = Route53Actuator(Route53Weights.from_config(config(moto_endpoint, zone).model_copy(
        update={"record_name": "triton.other.org."})))
    with pytest.raises(ActuatorError, match="record_name 'triton.other.org.' is not inside hosted zone"):
        other.apply(plan(50, 50))
    with pytest.raises(ValueError, match="health_checks has sites without a target"):
        config(moto_endpoint, zone, health_checks={"edge": {}})


def test_bad_health_check_settings_name_the_field():
    """What Route53 would refuse is refused when the config is read (moto's server accepts any
    health check settings, so the refusal itself is not reproduced here)."""
    long_name = ".".join(["a" * 60] * 5)   # 304 characters: over Route53's 255 for a check's address
    with pytest.raises(ValueError, match=r"health_checks\.cloud\.address"):
        Route53Config(health_checks={"cloud": {"address": long_name}})
    with pytest.raises(ValueError, match=r"health_checks\.cloud\.request_interval_s"):
        Route53Config(health_checks={"cloud": {"request_interval_s": 20}})
    with pytest.raises(ValueError, match=r"health_checks\.onprem\.path"):
        Route53Config(health_checks={"onprem": {"path": "healthz"}})


def test_daemon_with_route53_actuator_changes_records(moto_endpoint, zone, tmp_path):
    """The control loop end to end on DNS: an operator override goes through decide + apply into
    the weighted records of the local endpoint server, and is audited."""
    from control.daemon.controller import Controller  # noqa: PLC0415 - deferred: pulls in boto3, botocore, tritonclient
    from tests.test_operator_state import operator_override, s3_at  # noqa: PLC0415 - deferred like the above
    settings = make_settings(tmp_path / "run", control={"actuators": ["route53"], "route53": {
        "endpoint_url": moto_endpoint, "hosted_zone_id": zone, "record_name": "triton.search.example.com.",
        "targets": TARGETS}}, s3=s3_at(moto_endpoint))  # moto serves the operator state too
    c = Controller(settings)
    try:
        assert c.actuator.name == "route53"
        operator_override(c, {"onprem": 35, "cloud": 65})
        d = c.tick()
        assert d.reason == "override"
        assert c.actuator.observe().site_weights == {"onprem": 35, "cloud": 65}
        row = c.audit.last()
        assert row.applied and row.actuator == "route53" and row.commands
    finally:
        c.close()
