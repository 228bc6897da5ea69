"""Scale actuators for the cloud beyond this host: an AWS Auto Scaling group's desired capacity
through boto3 against moto's local endpoint server (a real HTTP server), and the replicas of a
Kubernetes Deployment (manifest patch on a copy; `kubectl scale` through a recording stand-in)."""
from __future__ import annotations

import stat

import boto3
import pytest
import yaml

from control.capacity.actuators import AsgScaler, K8sScaler, ScaleError
from control.capacity.scaler import ScaleDecision, ScalerState
from control.daemon.controller import Controller
from control.local.isolated import isolated_settings as make_settings
from control.local.procs import free_port

DECISION = ScaleDecision("out", "scale_out_load", "test", 1, 2, None, ScalerState(), {})




@pytest.fixture
def group(moto_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    ec2 = boto3.client("ec2", endpoint_url=moto_endpoint, region_name="us-east-1")
    asg = boto3.client("autoscaling", endpoint_url=moto_endpoint, region_name="us-east-1")
    name = f"triton-cloud-{free_port()}"
    ami = ec2.describe_images()["Images"][0]["ImageId"]
    ec2.create_launch_template(LaunchTemplateName=name, LaunchTemplateData={"ImageId": ami, "InstanceType": "g5.xlarge"})
    asg.create_auto_scaling_group(AutoScalingGroupName=name, LaunchTemplate={"LaunchTemplateName": name},
                                  MinSize=1, MaxSize=3, DesiredCapacity=1, AvailabilityZones=["us-east-1a"])
    return name


def test_asg_sets_desired_capacity_on_the_endpoint(moto_endpoint, group):
    s = AsgScaler(group, endpoint_url=moto_endpoint, cost_per_hour=1.5)
    assert s.desired() == 1 and len(s.instances()) == 1
    r = s.scale_out(DECISION)
    assert r == {"group": group, "desired_before": 1, "desired": 2}
    # Read back by a client of its own: the endpoint really holds the new desired capacity.
    other = boto3.client("autoscaling", endpoint_url=moto_endpoint, region_name="us-east-1")
    g = other.describe_auto_scaling_groups(AutoScalingGroupNames=[group])["AutoScalingGroups"][0]
    assert g["DesiredCapacity"] == 2
    insts = s.instances()
    assert len(insts) == 2 and all(i.cost_per_hour == 1.5 and i.removable for i in insts)
    s.scale_out(DECISION)
    with pytest.raises(ScaleError, match="outside the group's 1..3"):
        s.scale_out(DECISION)
    assert s.scale_in(DECISION)["desired"] == 2


def test_asg_missing_group_is_a_clear_error(moto_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    with pytest.raises(ScaleError, match="no Auto Scaling group named 'nope'"):
        AsgScaler("nope", endpoint_url=moto_endpoint).desired()


def test_daemon_scale_job_drives_the_asg(moto_endpoint, group, tmp_path):
    """The controller's scale job with the ASG actuator: below min_instances -> desired capacity
    raised on the endpoint, audited with its reason."""
    settings = make_settings(tmp_path / "run", control={"actuators": ["dry-run"], "scaler": {
        "enabled": True, "actuator": "asg", "asg_name": group, "asg_endpoint_url": moto_endpoint, "min_instances": 2,
        "max_instances": 3}})
    c = Controller(settings)
    try:
        c.scaler = AsgScaler.from_settings(settings)
        d = c.scale_tick()
        assert d.action == "out" and d.reason == "below_min"
        assert c.scaler.desired() == 2
        row = c.audit.scale_history(0, 10)[-1]
        assert row["actuator"] == "asg" and row["count_before"] == 1 and row["count_after"] == 2
        assert row["result"]["desired"] == 2
        # one listing of the group per tick (each is a cloud API call), one more after an action
        calls, listing = [], c.scaler.instances
        c.scaler.instances = lambda: calls.append(1) or listing()
        d = c.scale_tick()
        assert d.reason != "below_min"
        assert len(calls) == (1 if d.action == "hold" else 2)
        c.scaler.instances = listing
        # ASG instances are billed at the template's cost while the group reports them.
        totals = c.account_cost()
        assert len(totals["cloud"]["up_instances"]) >= 2
    finally:
        c.close()


MANIFEST = """apiVersion: v1
kind: Service
metadata: {name: triton-cloud}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: triton-cloud, namespace: triton-cloud}
spec:
  replicas: 2
  template: {spec: {containers: [{name: triton, image: nvcr.io/nvidia/tritonserver:24.10-py3}]}}
"""


def test_k8s_manifest_patch_changes_replicas_only(tmp_path):
    path = tmp_path / "deployment.yaml"
    path.write_text(MANIFEST)
    k = K8sScaler("manifest", "triton-cloud", manifest=path, cost_per_hour=3.0)
    assert k.replicas() == 2 and len(k.instances()) == 2
    assert k.scale_out(DECISION) == {"deployment": "triton-cloud", "mode": "manifest", "replicas_before": 2, "replicas": 3}
    docs = list(yaml.safe_load_all(path.read_text()))
    assert docs[0]["kind"] == "Service" and docs[1]["spec"]["replicas"] == 3
    assert docs[1]["spec"]["template"]["spec"]["containers"][0]["image"].startswith("nvcr.io")
    k.scale_in(DECISION)
    assert K8sScaler("manifest", "triton-cloud", manifest=path).replicas() == 2
    with pytest.raises(ScaleError, match="no Deployment 'other'"):
        K8sScaler("manifest", "other", manifest=path).replicas()


def test_k8s_kubectl_mode_runs_kubectl_scale(tmp_path):
    log = tmp_path / "argv.log"
    fake = tmp_path / "kubectl"
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {log}\ncase \"$1\" in get) echo 2;; esac\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    k = K8sScaler("kubectl", "triton-cloud", "triton-cloud", kubectl=str(fake))
    r = k.scale_out(DECISION)
    assert r["replicas"] == 3
    lines = log.read_text().splitlines()
    assert lines[-1] == "scale deployment/triton-cloud --replicas=3 -n triton-cloud"
    assert lines[0].startswith("get deployment/triton-cloud -o jsonpath={.spec.replicas}")
