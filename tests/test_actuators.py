"""Several routing layers at once (`control.actuators: [haproxy, route53]`): the daemon's traffic job
applies each decided plan to a real HAProxy (its runtime API) and to the Route53 weighted records
on moto's server; one that fails does not stop the other."""
from __future__ import annotations


import boto3
import pytest

from control.adapters.haproxy_runtime import HAProxyRuntime
from control.config import ControlConfig, load_config
from control.daemon.controller import Controller
from control.local.haproxy import start_haproxy
from control.local.isolated import isolated_settings as make_settings
from control.local.procs import free_port
from tests.test_operator_state import operator_override, s3_at
from control.traffic.actuators import (
    ActuatorError,
    CompositeActuator,
    DryRunActuator,
    HAProxyActuator,
    Plan,
    make_actuator,
)

TARGETS = {"onprem": "lb.onprem.example.com.", "cloud": "lb.cloud.example.com."}
RECORD = "triton.search.example.com."


@pytest.fixture
def client(moto_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    return boto3.client("route53", endpoint_url=moto_endpoint, region_name="us-east-1")


@pytest.fixture
def zone(client):
    z = client.create_hosted_zone(Name="search.example.com.", CallerReference=str(free_port()))
    yield z["HostedZone"]["Id"].split("/")[-1]
    for hc in client.list_health_checks()["HealthChecks"]:
        client.delete_health_check(HealthCheckId=hc["Id"])


def two_layer_settings(run_dir, endpoint, zone, s3_endpoint: str | None = None):
    """`s3_endpoint`: where the operator state lives (default: `endpoint`, moto serves both)."""
    return make_settings(run_dir, control={"actuators": ["haproxy", "route53"], "route53": {
        "endpoint_url": endpoint, "hosted_zone_id": zone, "record_name": RECORD, "targets": TARGETS}},
        s3=s3_at(s3_endpoint or endpoint))


@pytest.fixture
def haproxy_settings(tmp_path, moto_endpoint, zone):
    """A real HAProxy (its Tritons need not run: weights are set on DOWN servers alike)."""
    settings = two_layer_settings(tmp_path / "run", moto_endpoint, zone)
    proc = start_haproxy(settings)
    yield settings
    proc.stop()


def records(client, zone) -> dict[str, dict]:
    rrs = client.list_resource_record_sets(HostedZoneId=zone)["ResourceRecordSets"]
    return {r["SetIdentifier"]: r for r in rrs if r["Name"] == RECORD}


def haproxy_weights(settings) -> dict[str, int]:
    return {s.server: s.weight for s in HAProxyRuntime.for_settings(settings).servers("be_triton_http")}


def apply_errors(c: Controller, actuator: str) -> float | None:
    return c.metrics.registry.get_sample_value("triton_hybrid_apply_errors_total", {"actuator": actuator})


# ---- config ------------------------------------------------------------------------------------
def test_actuators_config(tmp_path):
    assert ControlConfig().actuators == ["haproxy"]
    assert ControlConfig(actuators=["haproxy", "route53"]).actuators == ["haproxy", "route53"]
    for bad, msg in [([], "at least one"), (["haproxy", "haproxy"], "each actuator once"),
                     (["dry-run", "route53"], "dry-run stands alone"), (["route53", "haproxy"], "list haproxy first"),
                     (["nginx"], "haproxy")]:
        with pytest.raises(ValueError, match=msg):
            ControlConfig(actuators=bad)
    # The single-valued field of earlier releases is refused, saying what to write instead.
    with pytest.raises(ValueError, match=r"write `actuators: \[route53\]`"):
        ControlConfig.model_validate({"actuator": "route53"})
    # An environment override names the list as YAML or comma-separated.
    settings = make_settings(tmp_path / "run")
    for raw in ("[haproxy, route53]", "haproxy,route53"):
        s = load_config(settings.source, environ={"TRITON_HYBRID__CONTROL__ACTUATORS": raw})
        assert s.control.actuators == ["haproxy", "route53"]


def test_make_actuator_builds_one_or_a_composite(tmp_path, moto_endpoint, zone):
    one = make_actuator(make_settings(tmp_path / "a"))
    assert isinstance(one, HAProxyActuator) and one.name == "haproxy"
    both = make_actuator(two_layer_settings(tmp_path / "b", moto_endpoint, zone))
    assert isinstance(both, CompositeActuator) and both.names == ["haproxy", "route53"]
    assert both.name == "haproxy+route53"


# ---- the daemon's traffic job on both layers ---------------------------------------------------
def test_site_weights_move_haproxy_and_dns_together(haproxy_settings, client, zone):
    """Decide once, apply to both: HAProxy's instance weights and each site's DNS record (with its
    health check); the audit and /v1/status show both layers; drift on either is reconciled."""
    settings = haproxy_settings
    c = Controller(settings)
    try:
        assert c.actuator.name == "haproxy+route53"
        operator_override(c, {"onprem": 30, "cloud": 70})
        c.tick()
        row = c.audit.last()
        assert row.applied and row.error is None and row.actuator == "haproxy+route53"
        assert any(cmd.startswith("haproxy: set weight") for cmd in row.commands)
        assert any(cmd.startswith("route53: UPSERT") for cmd in row.commands)
        w = haproxy_weights(settings)
        assert w["onprem-1"] > 0 and w["cloud-1"] > 0
        assert round(100 * w["onprem-1"] / (w["onprem-1"] + w["cloud-1"])) == 30
        recs = records(client, zone)
        assert {s: r["Weight"] for s, r in recs.items()} == {"onprem": 30, "cloud": 70}
        assert all(r.get("HealthCheckId") for r in recs.values())
        observed = c.traffic.status()["observed"]
        assert observed["layers"] == {"haproxy": {"onprem": 30, "cloud": 70}, "route53": {"onprem": 30, "cloud": 70}}
        assert observed["site_weights"] == {"onprem": 30, "cloud": 70}   # HAProxy's, the drift source

        # Drift on the DNS layer (a hand edit): the next tick puts it back, HAProxy untouched.
        rec = recs["cloud"]
        client.change_resource_record_sets(HostedZoneId=zone, ChangeBatch={"Changes": [{"Action": "UPSERT",
            "ResourceRecordSet": {**rec, "Weight": 5}}]})
        c.tick()
        row = c.audit.last()
        assert row.drift and all(d.startswith("route53: ") for d in row.drift)
        assert records(client, zone)["cloud"]["Weight"] == 70
        assert haproxy_weights(settings) == w
    finally:
        c.close()

    # Restart: a new process finds both layers as they are and changes nothing, no new check.
    check_ids = {r["HealthCheckId"] for r in records(client, zone).values()}
    c = Controller(settings)
    try:
        assert c.traffic.resumed_from == "haproxy+route53 (observed)"
        c.tick()
        row = c.audit.last()
        assert row.applied and row.commands == [] and row.drift == []
        assert {hc["Id"] for hc in client.list_health_checks()["HealthChecks"]} == check_ids
    finally:
        c.close()


def test_a_failing_route53_does_not_stop_the_haproxy_apply(tmp_path, zone, client, moto_endpoint):
    """Route53 unreachable (nothing listens on its endpoint): HAProxy still gets the weights; the
    audit row says which layer failed and apply_errors counts it under its own name."""
    settings = two_layer_settings(tmp_path / "run", f"http://127.0.0.1:{free_port()}", zone, moto_endpoint)
    proc = start_haproxy(settings)
    c = Controller(settings)
    try:
        assert c.traffic.observe_error is None   # HAProxy observed: Route53's read error is a layer's error
        operator_override(c, {"onprem": 20, "cloud": 80})
        c.tick()
        row = c.audit.last()
        assert row.applied and row.error and row.error.startswith("route53: ")
        assert "Could not connect" in row.error
        w = haproxy_weights(settings)
        assert round(100 * w["onprem-1"] / (w["onprem-1"] + w["cloud-1"])) == 20
        assert apply_errors(c, "route53") == 1 and apply_errors(c, "haproxy") == 0
        observed = c.traffic.status()["observed"]
        assert "route53" in observed["errors"] and observed["layers"] == {"haproxy": {"onprem": 20, "cloud": 80}}
    finally:
        c.close()
        proc.stop()


def test_when_every_layer_fails_nothing_is_applied(tmp_path, zone, moto_endpoint):
    """No HAProxy running and Route53 unreachable: the tick is not applied, each layer's error counted."""
    settings = two_layer_settings(tmp_path / "run", f"http://127.0.0.1:{free_port()}", zone, moto_endpoint)
    c = Controller(settings)
    try:
        operator_override(c, {"onprem": 40, "cloud": 60})
        c.tick()
        row = c.audit.last()
        assert not row.applied and "haproxy: " in row.error and "route53: " in row.error
        assert apply_errors(c, "route53") == 1 and apply_errors(c, "haproxy") == 1
    finally:
        c.close()


def test_composite_reports_per_layer_results(tmp_path):
    """The same plan to each part, in order; a failing part's error comes back by name."""
    settings = make_settings(tmp_path / "run")

    class Refusing(DryRunActuator):
        name = "refusing"

        def apply(self, plan):
            raise ActuatorError("refused")

    dry = DryRunActuator(settings.instances)
    comp = CompositeActuator([dry, Refusing(settings.instances)])
    res = comp.apply(Plan({"onprem": 60, "cloud": 40}, {"onprem-1": 60, "cloud-1": 40}))
    assert res.errors == {"refusing": "refused"}
    assert dry.observe().instance_weights == {"onprem-1": 60, "cloud-1": 40}
    assert res.observed.layers == {"dry-run": {"onprem": 60, "cloud": 40}}
    with pytest.raises(ActuatorError) as e:
        CompositeActuator([Refusing(settings.instances)]).apply(Plan({"onprem": 60, "cloud": 40}, {}))
    assert e.value.by_actuator == {"refusing": "refused"}
