"""Route53 weighted records through boto3, against moto's local endpoint server (a real HTTP server)."""
from __future__ import annotations

import boto3
import pytest

from control.adapters.route53 import Route53Actuator, Route53Weights
from control.config import Route53Config
from control.local.isolated import isolated_settings as make_settings
from control.local.procs import free_port
from control.traffic.actuators import ActuatorError, Plan


@pytest.fixture
def zone(moto_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    client = boto3.client("route53", endpoint_url=moto_endpoint, region_name="us-east-1")
    z = client.create_hosted_zone(Name="search.example.com.", CallerReference=str(free_port()))
    return z["HostedZone"]["Id"].split("/")[-1]


def actuator(moto_endpoint, zone, **kw):
    rc = Route53Config(endpoint_url=moto_endpoint, hosted_zone_id=zone, record_name="triton.search.example.com",
                       targets={"onprem": "lb.onprem.example.com.", "cloud": "lb.cloud.example.com."}, **kw)
    return Route53Actuator(Route53Weights.from_config(rc))


def plan(on, cl):
    return Plan({"onprem": on, "cloud": cl}, {})


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


def test_records_are_real_weighted_records(moto_endpoint, zone):
    a = actuator(moto_endpoint, zone, ttl=15)
    a.apply(plan(40, 60))
    client = boto3.client("route53", endpoint_url=moto_endpoint, region_name="us-east-1")
    rrs = [r for r in client.list_resource_record_sets(HostedZoneId=zone)["ResourceRecordSets"]
           if r["Name"] == "triton.search.example.com."]
    by_site = {r["SetIdentifier"]: r for r in rrs}
    assert set(by_site) == {"onprem", "cloud"}
    assert by_site["onprem"]["Weight"] == 40 and by_site["cloud"]["Weight"] == 60
    assert by_site["cloud"]["ResourceRecords"] == [{"Value": "lb.cloud.example.com."}]
    assert by_site["cloud"]["TTL"] == 15 and by_site["cloud"]["Type"] == "CNAME"


def test_hand_edit_is_seen_as_drift_and_reconciled(moto_endpoint, zone):
    a = actuator(moto_endpoint, zone)
    a.apply(plan(80, 20))
    a.records.write({"onprem": 10, "cloud": 90}, comment="hand edit")
    assert a.observe().site_weights == {"onprem": 10, "cloud": 90}
    r = a.apply(plan(80, 20))
    assert r.drift and r.observed.site_weights == {"onprem": 80, "cloud": 20}


def test_missing_target_or_zone_is_a_clear_error(moto_endpoint, zone):
    rc = Route53Config(endpoint_url=moto_endpoint, hosted_zone_id=zone, targets={"onprem": "lb.onprem.example.com."})
    a = Route53Actuator(Route53Weights.from_config(rc))
    with pytest.raises(ActuatorError, match="no target for site 'cloud'"):
        a.apply(plan(50, 50))
    with pytest.raises(ActuatorError, match="hosted_zone_id"):
        Route53Weights.from_config(Route53Config(endpoint_url=moto_endpoint))
    bad = actuator(moto_endpoint, "ZNOSUCHZONE")
    with pytest.raises(ActuatorError, match="Route53"):
        bad.apply(plan(50, 50))


def test_daemon_with_route53_actuator_changes_records(moto_endpoint, zone, tmp_path):
    """The control loop end to end on DNS: an operator override goes through decide + apply into
    the weighted records of the local endpoint server, and is audited."""
    from control.daemon.controller import Controller  # noqa: PLC0415 - deferred: pulls in boto3, botocore, tritonclient
    settings = make_settings(tmp_path / "run", control={"actuator": "route53", "route53": {
        "endpoint_url": moto_endpoint, "hosted_zone_id": zone, "record_name": "triton.search.example.com.",
        "targets": {"onprem": "lb.onprem.example.com.", "cloud": "lb.cloud.example.com."}}})
    c = Controller(settings)
    try:
        assert c.actuator.name == "route53"
        c.audit.set_override({"onprem": 35, "cloud": 65}, 60, by="test")
        d = c.tick()
        assert d.reason == "override"
        assert c.actuator.observe().site_weights == {"onprem": 35, "cloud": 65}
        row = c.audit.last()
        assert row.applied and row.actuator == "route53" and row.commands
    finally:
        c.close()
