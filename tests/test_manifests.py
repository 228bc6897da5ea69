"""deploy/: Kubernetes base + overlays (rendered by `kubectl kustomize`, schema-validated and checked by
control/deploy/kustomize.py), the HAProxy configs rendered by the same
generator as the local stack, Grafana provisioning and dashboards, systemd units, IAM policies."""
from __future__ import annotations

import configparser
import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from control.cli import cli
from control.config import PROJECT_ROOT, load_config
from control.deploy.kustomize import (
    KustomizeError,
    check_tree,
    object_problems,
    render,
    schema_problems,
    source_problems,
)
from control.deploy.render import K8S_REGISTRY, render_haproxy

DEPLOY = PROJECT_ROOT / "deploy"
K8S = DEPLOY / "k8s"


# ---- Kubernetes --------------------------------------------------------------------------------

def test_every_yaml_file_under_deploy_parses():
    files = sorted(DEPLOY.rglob("*.y*ml"))
    assert len(files) > 15
    for f in files:
        list(yaml.safe_load_all(f.read_text()))


@pytest.fixture(scope="module")
def rendered():
    return check_tree(K8S)


def test_base_and_overlays_render_validate_and_pass_the_checks(rendered):
    assert {"(source tree)", "base", "control-plane", "overlays/onprem", "overlays/cloud"} <= set(rendered)
    problems = {name: r.problems for name, r in rendered.items() if r.problems}
    assert not problems, problems
    assert all(rendered[o].resources for o in ("overlays/onprem", "overlays/cloud"))


@pytest.fixture
def _overlay(rendered):
    return lambda name: rendered[f"overlays/{name}"]


def test_onprem_overlay_has_triton_control_plane_and_haproxy(_overlay):
    r = _overlay("onprem")
    names = {(x["kind"], x["metadata"]["name"]) for x in r.resources}
    assert {("Deployment", "onprem-triton"), ("Deployment", "onprem-triton-hybrid-control"),
            ("Service", "onprem-triton"), ("Service", "onprem-triton-hybrid"),
            ("ConfigMap", "onprem-haproxy-config"), ("Secret", "onprem-triton-s3-credentials")} <= names
    for x in r.resources:
        if x["kind"] != "Namespace":
            assert x["metadata"]["namespace"] == "triton-hybrid", x["metadata"]
            assert x["metadata"]["labels"]["triton-hybrid/site"] == "onprem"
    control = r.get("Deployment", "onprem-triton-hybrid-control")
    assert [c["name"] for c in control["spec"]["template"]["spec"]["containers"]] == ["haproxy", "control"]


def test_overlay_patches_merge_by_name_and_references_follow_the_prefix(_overlay):
    r = _overlay("onprem")
    triton = r.get("Deployment", "onprem-triton")
    spec = triton["spec"]["template"]["spec"]
    c = spec["containers"][0]
    env = {e["name"]: e for e in c["env"]}
    assert env["MODEL_REPOSITORY"]["value"].startswith("s3://http://minio.")
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "onprem-triton-s3-credentials"
    assert env["TRITON_ADMIN_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "onprem-triton-admin-key"
    assert spec["serviceAccountName"] == "onprem-triton"
    assert spec["nodeSelector"] == {"triton-hybrid/gpu-node": "onprem"}
    assert triton["spec"]["replicas"] == 2
    # the patch did not drop what it does not mention
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert triton["spec"]["selector"]["matchLabels"]["triton-hybrid/site"] == "onprem"


def test_cloud_overlay(_overlay):
    r = _overlay("cloud")
    triton = r.get("Deployment", "cloud-triton")
    env = {e["name"]: e.get("value") for e in triton["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MODEL_REPOSITORY"] == "s3://acme-search-triton-models/repository"
    assert env["AWS_DEFAULT_REGION"] == "eu-west-1"
    svc = r.get("Service", "cloud-triton")
    assert svc["spec"]["type"] == "LoadBalancer"
    assert svc["metadata"]["annotations"]["service.beta.kubernetes.io/aws-load-balancer-scheme"] == "internal"
    assert not r.get("Deployment", "cloud-triton-hybrid-control")  # the control plane runs on-prem


def test_no_inline_secret_anywhere_and_secret_env_files_are_ignored_by_git():
    for f in K8S.rglob("*.y*ml"):
        for doc in yaml.safe_load_all(f.read_text()):
            if doc and doc.get("kind") == "Secret":
                assert "data" not in doc and "stringData" not in doc, f
    for example in K8S.rglob("secrets/*.env.example"):
        real = example.with_name(example.name.removesuffix(".example"))
        r = subprocess.run(["git", "check-ignore", "-q", str(real)], cwd=PROJECT_ROOT)
        assert r.returncode == 0, f"{real} would not be ignored by git"


def test_haproxy_server_of_the_onprem_site_is_the_onprem_triton_service(_overlay):
    r = _overlay("onprem")
    svc = r.get("Service", "onprem-triton")
    registry = load_config(K8S / "control-plane" / "triton-hybrid.yaml", environ={})
    onprem = [i for i in registry.instances if i.site == "onprem"]
    assert [i.host for i in onprem] == [f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local"]
    ports = {p["name"]: p["port"] for p in svc["spec"]["ports"]}
    assert (onprem[0].http_port, onprem[0].grpc_port, onprem[0].metrics_port) == (ports["http"], ports["grpc"], ports["metrics"])


# The checker itself: each rule catches what it is for ----------------------------------------

def _tree(tmp_path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp_path


DEPLOY_TMPL = """apiVersion: apps/v1
kind: Deployment
metadata: {{name: triton}}
spec:
  selector: {{matchLabels: {{app: t}}}}
  template:
    metadata:
      labels: {{app: t}}
      annotations: {{prometheus.io/scrape: "true", prometheus.io/port: "8002"}}
    spec:
      containers:
        - name: triton
          image: nvcr.io/nvidia/tritonserver:24.10-py3
          readinessProbe: {{httpGet: {{path: {path}, port: 8000}}}}
          resources: {{limits: {{nvidia.com/gpu: 1}}}}
"""
KUSTOMIZATION = "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [d.yaml{extra}]\n"


def _problems(root: Path) -> list[str]:
    return [p for r in check_tree(root).values() for p in r.problems]


def test_checker_flags_an_inline_secret(tmp_path):
    root = _tree(tmp_path, {"kustomization.yaml": KUSTOMIZATION.format(extra=", s.yaml"),
                            "d.yaml": DEPLOY_TMPL.format(path="/v2/health/ready"),
                            "s.yaml": "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\nstringData: {k: hunter2}\n"})
    assert any("inline data" in p for p in source_problems(root))


def test_checker_flags_a_wrong_readiness_path(tmp_path):
    root = _tree(tmp_path, {"kustomization.yaml": KUSTOMIZATION.format(extra=""),
                            "d.yaml": DEPLOY_TMPL.format(path="/v2/health/live")})
    assert any("/v2/health/ready" in p for p in object_problems(render(root)))


def test_checker_flags_missing_references_and_secret_literals(tmp_path):
    dep = DEPLOY_TMPL.format(path="/v2/health/ready").replace(
        "          resources:", "          env:\n            - {name: X, valueFrom: {secretKeyRef: {name: nope, key: K}}}\n"
                                "          resources:")
    root = _tree(tmp_path, {"kustomization.yaml": KUSTOMIZATION.format(extra="") +
                            "secretGenerator:\n  - {name: lit, literals: [K=v]}\n",
                            "d.yaml": dep})
    problems = _problems(root)
    assert any("references Secret nope" in p for p in problems)
    assert any("literals" in p for p in problems)


def test_checker_flags_a_committed_secret_env_file(tmp_path):
    root = _tree(tmp_path, {"kustomization.yaml": KUSTOMIZATION.format(extra="") +
                            "secretGenerator:\n  - {name: s3, envs: [s3.env]}\n",
                            "d.yaml": DEPLOY_TMPL.format(path="/v2/health/ready"),
                            "s3.env": "AWS_SECRET_ACCESS_KEY=hunter2\n", "s3.env.example": "AWS_SECRET_ACCESS_KEY=\n"})
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(["git", "add", "s3.env"], cwd=root, check=True)
    assert any("committed to git" in p for p in source_problems(root))


def test_an_absent_secret_env_file_renders_from_its_example(tmp_path):
    """As in CI: the real env file is absent, the render still has the Secret with every key."""
    dep = DEPLOY_TMPL.format(path="/v2/health/ready").replace(
        "          resources:", "          env:\n            - {name: X, valueFrom: {secretKeyRef: {name: s3, key: AWS_SECRET_ACCESS_KEY}}}\n"
                                "          resources:")
    root = _tree(tmp_path, {"kustomization.yaml": KUSTOMIZATION.format(extra="") +
                            "generatorOptions: {disableNameSuffixHash: true}\n"
                            "secretGenerator:\n  - {name: s3, envs: [s3.env]}\n",
                            "d.yaml": dep, "s3.env.example": "AWS_SECRET_ACCESS_KEY=\n"})
    result = check_tree(root)["."]
    assert not result.problems, result.problems
    assert "AWS_SECRET_ACCESS_KEY" in result.get("Secret", "s3")["data"]
    assert not (root / "s3.env").exists()  # rendered from a scratch copy, the tree is untouched


def test_schema_validation_catches_a_wrong_type(tmp_path):
    root = _tree(tmp_path, {"kustomization.yaml": KUSTOMIZATION.format(extra=""),
                            "d.yaml": DEPLOY_TMPL.format(path="/v2/health/ready").replace("spec:\n  selector",
                                                                                         "spec:\n  replicas: two\n  selector")})
    problems = schema_problems(render(root))
    assert any("replicas" in p and "integer" in p for p in problems), problems


def test_kubectl_kustomize_errors_are_reported(tmp_path):
    root = _tree(tmp_path, {"kustomization.yaml": KUSTOMIZATION.format(extra=", missing.yaml"),
                            "d.yaml": DEPLOY_TMPL.format(path="/v2/health/ready")})
    with pytest.raises(KustomizeError, match="missing.yaml"):
        render(root)


def test_without_kubectl_the_check_says_how_to_install_it(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(KustomizeError, match="kubectl is not installed.*Install it"):
        check_tree(K8S)
    r = CliRunner().invoke(cli, ["deploy", "check-k8s"])
    assert r.exit_code == 1 and "kubectl is not installed" in r.output


def test_check_k8s_command():
    r = CliRunner().invoke(cli, ["deploy", "check-k8s"])
    assert r.exit_code == 0, r.output
    assert "ok   overlays/onprem" in r.output and "ok   overlays/cloud" in r.output


# ---- HAProxy: the same generator as the local stack --------------------------------------------

def test_committed_haproxy_configs_are_the_generators_output():
    assert (DEPLOY / "haproxy" / "haproxy.cfg").read_text() == render_haproxy(), \
        "deploy/haproxy/haproxy.cfg is stale: run `triton-hybrid deploy render-haproxy --k8s`"
    assert (K8S / "control-plane" / "haproxy.cfg").read_text() == render_haproxy(K8S_REGISTRY), \
        "deploy/k8s/control-plane/haproxy.cfg is stale: run `triton-hybrid deploy render-haproxy --k8s`"


def test_deploy_haproxy_config_is_valid_and_has_every_instance():
    haproxy = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin")
    if not haproxy:
        pytest.skip("haproxy not installed")
    path = DEPLOY / "haproxy" / "haproxy.cfg"
    r = subprocess.run([haproxy, "-c", "-f", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    text = path.read_text()
    for inst in load_config(DEPLOY / "sites.yaml", environ={}).instances:
        assert f"server {inst.name} {inst.host}:{inst.http_port} weight {inst.weight} check" in text


def test_render_haproxy_command(tmp_path):
    out = tmp_path / "h.cfg"
    r = CliRunner().invoke(cli, ["deploy", "render-haproxy", "--config", str(DEPLOY / "sites.yaml"), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert out.read_text() == (DEPLOY / "haproxy" / "haproxy.cfg").read_text()


# ---- Grafana -----------------------------------------------------------------------------------

def test_dashboards_are_the_builders_output_and_well_formed():

    spec = importlib.util.spec_from_file_location("build_dashboards", DEPLOY / "grafana" / "build_dashboards.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rendered = mod.render_all()
    assert set(rendered) == {p.name for p in (DEPLOY / "grafana" / "dashboards").glob("*.json")}
    for name, text in rendered.items():
        assert (DEPLOY / "grafana" / "dashboards" / name).read_text() == text, f"{name} is stale"
        d = json.loads(text)
        ids = [p["id"] for p in d["panels"]]
        assert len(ids) == len(set(ids)) and d["uid"]
        for p in d["panels"]:
            if p["type"] != "row":
                assert p["datasource"]["uid"] == "prometheus" and p["targets"], p["title"]
                assert all("$__" not in t["expr"] for t in p["targets"])
    titles = " ".join(p["title"] for text in rendered.values() for p in json.loads(text)["panels"])
    for needed in ("Traffic by site", "Site weights", "GPU utilization", "CPU utilization", "GPU memory",
                   "latency", "queue", "failures", "Live model version", "Sync lag", "Decisions by reason"):
        assert needed.lower() in titles.lower(), needed


def test_grafana_provisioning():
    ds = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert ds["datasources"][0]["uid"] == "prometheus" and ds["datasources"][0]["type"] == "prometheus"
    prov = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "triton-hybrid.yml").read_text())
    assert prov["providers"][0]["type"] == "file"


# ---- systemd -----------------------------------------------------------------------------------

@pytest.mark.parametrize("unit", sorted(p.name for p in (DEPLOY / "systemd").glob("*.service")))
def test_systemd_unit(unit):
    text = (DEPLOY / "systemd" / unit).read_text()
    cp = configparser.ConfigParser(strict=False, interpolation=None, allow_no_value=True)
    cp.optionxform = str
    # systemd allows repeated keys (ExecReload twice); configparser does not: drop repeats.
    seen, lines = set(), []
    section = ""
    for line in text.splitlines():
        if line.startswith("["):
            section = line
        key = line.split("=", 1)[0] if "=" in line and not line.startswith((" ", "#")) else None
        if key and (section, key) in seen:
            continue
        if key:
            seen.add((section, key))
        lines.append(line)
    cp.read_string("\n".join(lines))
    assert {"Unit", "Service", "Install"} <= set(cp.sections())
    assert cp["Service"].get("ExecStart") and cp["Service"].get("Restart") == "on-failure"
    assert cp["Service"].get("User") and cp["Service"].get("User") != "root"
    assert cp["Install"].get("WantedBy") == "multi-user.target"
    # Secrets only through systemd credentials: every *KEY/*TOKEN/*SECRET* assignment reads one.
    inline = re.findall(r"\w*(?:KEY|TOKEN|SECRET)\w*=(?!\"\$\$\(cat \$\$\{CREDENTIALS_DIRECTORY\})\S+", text)
    assert not inline, inline


def test_systemd_analyze_verify_syntax(tmp_path):
    """systemd's own parser, when present: only syntax errors count (the binaries, users and
    credential files of a real host do not exist here)."""
    sa = shutil.which("systemd-analyze")
    if not sa:
        pytest.skip("systemd-analyze not installed")
    units = sorted(str(p) for p in (DEPLOY / "systemd").glob("*.service"))
    r = subprocess.run([sa, "verify", "--man=no", *units], capture_output=True, text=True, timeout=60)
    bad = [ln for ln in (r.stdout + r.stderr).splitlines()
           if ("Unknown key" in ln or "Unknown section" in ln or "Invalid" in ln or "bad unit file setting" in ln)]
    assert not bad, bad


# ---- IAM ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["control-plane-policy.json", "triton-readonly-policy.json"])
def test_iam_policies_are_least_privilege(name):
    doc = json.loads((DEPLOY / "iam" / name).read_text())
    assert doc["Version"] == "2012-10-17"
    for st in doc["Statement"]:
        actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
        resources = st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]
        assert all("*" not in a for a in actions), st["Sid"]
        assert all(r != "*" and not r.endswith(":::*") for r in resources), st["Sid"]
        if st["Effect"] == "Allow" and any(a.startswith("s3:") and a != "s3:ListBucket" for a in actions):
            assert all(r.endswith("/repository/*") for r in resources), st["Sid"]
        if "s3:ListBucket" in actions:
            assert "s3:prefix" in json.dumps(st.get("Condition", {})), st["Sid"]


def test_triton_policy_is_read_only():
    doc = json.loads((DEPLOY / "iam" / "triton-readonly-policy.json").read_text())
    actions = {a for st in doc["Statement"] for a in st["Action"]}
    assert actions == {"s3:ListBucket", "s3:GetObject", "kms:Decrypt"}


def test_sites_registry_loads():
    s = load_config(DEPLOY / "sites.yaml", environ={})
    assert {i.site for i in s.instances} == {"onprem", "cloud"}
    assert not s.s3.start_local_server


def test_render_prometheus_command(tmp_path):
    out = tmp_path / "p.yml"
    r = CliRunner().invoke(cli, ["deploy", "render-prometheus", "--config", str(DEPLOY / "sites.yaml"), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert out.read_text() == (DEPLOY / "prometheus" / "prometheus.sites.yml").read_text()
