"""deploy/: Kubernetes base + overlays (rendered by `kubectl kustomize`, schema-validated and checked by
control/deploy/kustomize.py), the HAProxy configs rendered by the same
generator as the local stack, Grafana provisioning and dashboards, systemd units, IAM policies."""
from __future__ import annotations

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
    across_sites_problems,
    check_tree,
    container_config,
    object_problems,
    render,
    schema_problems,
    site_facts,
    source_problems,
)
from control.deploy.render import K8S_REGISTRY, k8s_generated, render_haproxy
from control.deploy.systemd import host_unit_problems, parse_unit
from control.entry.main import entry_paths

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
            ("Deployment", "onprem-triton-hybrid-entry"),
            ("Service", "onprem-triton"), ("Service", "onprem-triton-hybrid"),
            ("ConfigMap", "onprem-haproxy-config"), ("Secret", "onprem-triton-s3-credentials")} <= names
    for x in r.resources:
        if x["kind"] != "Namespace":
            assert x["metadata"]["namespace"] == "triton-hybrid", x["metadata"]
            assert x["metadata"]["labels"]["triton-hybrid/site"] == "onprem"
    control = r.get("Deployment", "onprem-triton-hybrid-control")
    # Issue 16: HAProxy is not in the control plane's pod (a control-plane rollout drops no client traffic).
    assert [c["name"] for c in control["spec"]["template"]["spec"]["containers"]] == ["control"]


@pytest.mark.parametrize("site", ["onprem", "cloud"])
def test_each_site_has_its_own_entry_deployment(_overlay, site, tmp_path):
    """A site entry: HAProxy + the entry agent, >= 2 replicas rolled one at a time, the runtime socket
    on an emptyDir the two share, the client Service on it, its site's servers first in haproxy.cfg,
    and the agent's config (entry.yaml + the site's env) naming that socket and site."""
    r = _overlay(site)
    dep = r.get("Deployment", f"{site}-triton-hybrid-entry")
    assert dep["spec"]["replicas"] >= 2
    assert dep["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    c = _containers(dep)
    assert set(c) == {"haproxy", "entry"}
    assert c["haproxy"]["lifecycle"]["preStop"]["exec"]["command"][-1].count("kill -USR1 1") == 1
    labels = dep["spec"]["template"]["metadata"]["labels"]
    svc = r.get("Service", f"{site}-triton-hybrid")
    assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    cfg_text = r.get("ConfigMap", f"{site}-haproxy-config")["data"]["haproxy.cfg"]
    assert cfg_text == (K8S / "overlays" / site / "haproxy.cfg").read_text()
    first = re.search(r"backend be_triton_http\n(?:    [^\n]*\n)*?    server (\S+)", cfg_text).group(1)
    assert first == f"{site}-1"
    sock = re.search(r"^\s*stats socket (\S+)", cfg_text, re.M).group(1)
    files = r.get("ConfigMap", f"{site}-triton-hybrid-entry-config")["data"]
    (tmp_path / "entry.yaml").write_text(files["entry.yaml"])
    env = dict(r.get("ConfigMap", f"{site}-triton-hybrid-entry-site")["data"])
    cfg = load_config(tmp_path / "entry.yaml", environ=env)
    assert cfg.entry.site == site and str(entry_paths(cfg)[0]) == sock
    assert {m["mountPath"] for m in c["entry"]["volumeMounts"] if m["name"] == "runtime"} == \
        {m["mountPath"] for m in c["haproxy"]["volumeMounts"] if m["name"] == "runtime"} == {str(Path(sock).parent)}


def _containers(deployment: dict) -> dict[str, dict]:
    spec = deployment["spec"]["template"]["spec"]
    return {c["name"]: c for c in spec.get("initContainers", []) + spec["containers"]}


def test_overlay_patches_merge_by_name_and_references_follow_the_prefix(_overlay):
    r = _overlay("onprem")
    triton = r.get("Deployment", "onprem-triton")
    spec = triton["spec"]["template"]["spec"]
    c = _containers(triton)
    assert spec["serviceAccountName"] == "onprem-triton"
    assert spec["nodeSelector"] == {"triton-hybrid/gpu-node": "onprem"}
    assert triton["spec"]["replicas"] == 2
    secrets = {v["name"]: v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
    assert set(secrets.values()) == {"onprem-triton-s3-credentials", "onprem-triton-admin-key",
                                     "onprem-triton-agent-token"}
    site = r.get("ConfigMap", "onprem-triton-agent-site")["data"]
    assert site == {"TRITON_HYBRID__AGENT__SITE": "onprem"}   # the mirror is the same for both sites
    for name in ("agent-init", "agent"):
        assert {"configMapRef": {"name": "onprem-triton-agent-site"}} in c[name]["envFrom"]
    # the patch did not drop what it does not mention
    assert c["triton"]["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["triton"]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert triton["spec"]["selector"]["matchLabels"]["triton-hybrid/site"] == "onprem"


def test_cloud_overlay(_overlay):
    r = _overlay("cloud")
    site = r.get("ConfigMap", "cloud-triton-agent-site")["data"]
    assert site == {"TRITON_HYBRID__AGENT__SITE": "cloud"}
    triton = r.get("Deployment", "cloud-triton")
    spec = triton["spec"]["template"]["spec"]
    agent = _containers(triton)["agent"]
    s3 = container_config(spec, agent, {c["metadata"]["name"]: c for c in r.resources if c["kind"] == "ConfigMap"}).s3
    assert (s3.bucket, s3.region, s3.sse) == ("acme-search-triton-models", "eu-west-1", "aws:kms")
    svc = r.get("Service", "cloud-triton")
    assert svc["spec"]["type"] == "LoadBalancer"
    assert svc["metadata"]["annotations"]["service.beta.kubernetes.io/aws-load-balancer-scheme"] == "internal"
    assert r.get("Deployment", "cloud-triton-hybrid-control")  # issue 16: a control plane per site
    entry_site = r.get("ConfigMap", "cloud-triton-hybrid-entry-site")["data"]
    assert entry_site == {"TRITON_HYBRID__ENTRY__SITE": "cloud"}


def _configmaps(r) -> dict[str, dict]:
    return {c["metadata"]["name"]: c for c in r.resources if c["kind"] == "ConfigMap"}


@pytest.mark.parametrize("site", ["onprem", "cloud"])
def test_each_site_runs_its_own_control_plane_with_leader_election(_overlay, site):
    """Issue 16: a control plane per site, alone in its pod, leader election on under its site and a
    name of its own (as the pod will load its config: the registry ConfigMap + the site's env), the
    weights to the entries and Route53 (one health-checked record per site entry), no volume that
    outlives the pod, secrets only as files (0400)."""
    r = _overlay(site)
    dep = r.get("Deployment", f"{site}-triton-hybrid-control")
    assert dep, f"no control plane in overlays/{site}"
    spec = dep["spec"]["template"]["spec"]
    c = _containers(dep)
    assert list(c) == ["control"]
    cfg = container_config(spec, c["control"], _configmaps(r))
    leader = cfg.control.leader
    assert leader.enabled and leader.site == site and leader.name == f"control-{site}"
    assert cfg.control.actuators == ["entries", "route53"]
    assert set(cfg.control.route53.targets) == set(cfg.control.route53.health_checks) == {"onprem", "cloud"}
    assert cfg.control.route53.hosted_zone_id
    # A rollout of the control plane starts the new pod (a standby) before the old one releases the lease.
    assert dep["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes["state"]
    assert not [v for v in spec["volumes"] if "persistentVolumeClaim" in v]
    assert not [x for x in r.resources if x["kind"] == "PersistentVolumeClaim"]
    secrets = [v for v in spec["volumes"] if "secret" in v]
    assert [v["secret"]["defaultMode"] for v in secrets] == [0o400]
    assert "secretRef" not in json.dumps(dep) and "secretKeyRef" not in json.dumps(dep)
    mounts = {m["name"]: m for m in c["control"]["volumeMounts"]}
    assert mounts[secrets[0]["name"]]["readOnly"] is True
    assert cfg.run_dir == mounts["state"]["mountPath"]   # its SQLite lives on the pod's own volume


def test_the_sites_have_distinct_leaders_and_one_mirror(rendered):
    """Two control planes, one per overlay, with distinct names in their own sites; every triton-hybrid
    container of both sites (control planes, host agents, entry agents) points at the same S3 mirror:
    a lease works only in one place both sites reach."""
    facts = {o: site_facts(rendered[f"overlays/{o}"].resources) for o in ("onprem", "cloud")}
    leaders = [(site, name) for f in facts.values() for _, site, name in f["leaders"]]
    assert sorted(leaders) == [("cloud", "control-cloud"), ("onprem", "control-onprem")]
    mirrors = {m for f in facts.values() for m in f["mirrors"].values()}
    assert mirrors == {("https://s3.eu-west-1.amazonaws.com", "acme-search-triton-models", "repository")}
    assert all(len(f["mirrors"]) >= 4 for f in facts.values())  # agent-init, agent, entry, control
    assert not rendered["(across overlays)"].problems


def _env_script(r, container: dict, configmap: str, name: str, tmp_path: Path):
    """A container's env script (from its rendered ConfigMap, secrets dir moved under tmp_path) and a
    stand-in `triton-hybrid` that prints its args and environment: (run, container args). run()
    runs the container's command through it with a real shell. A missing secret file must stop it
    before `triton-hybrid` runs."""
    script = r.get("ConfigMap", configmap)["data"][name]
    (tmp_path / name).write_text(script.replace("/run/secrets/triton-hybrid", str(tmp_path / "secrets")))
    assert container["command"][:2] == ["/bin/sh", f"/etc/triton-hybrid/{name}"]
    _fake(tmp_path / "bin", "triton-hybrid", 'echo "args=$*"; env | grep "^TRITON_HYBRID__" | sort')
    env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin"}
    cmd = ["/bin/sh", str(tmp_path / name), *container["command"][2:]]

    def run():
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=20)
    failed = run()
    assert failed.returncode != 0 and "args=" not in failed.stdout
    return run, " ".join(container["command"][3:])


def test_control_container_reads_its_secrets_from_the_secret_files(_overlay, tmp_path):
    """control-env.sh (from the rendered ConfigMap) run by a real shell with a stand-in `triton-hybrid`
    that prints its environment: the S3 keys (also Route53's) and the admin token come from the files;
    a missing file stops the container."""
    r = _overlay("cloud")
    c = _containers(r.get("Deployment", "cloud-triton-hybrid-control"))["control"]
    run, args = _env_script(r, c, "cloud-triton-hybrid-config", "control-env.sh", tmp_path)
    d = tmp_path / "secrets" / "control"
    d.mkdir(parents=True)
    for k, v in (("ADMIN_TOKEN", "adm"), ("AWS_ACCESS_KEY_ID", "AKID"), ("AWS_SECRET_ACCESS_KEY", "s3cret")):
        (d / k).write_text(v + "\n")
    out = run()
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "args=" + args
    assert set(lines[1:]) == {"TRITON_HYBRID__CONTROL__ADMIN_TOKEN=adm", "TRITON_HYBRID__S3__ACCESS_KEY_ID=AKID",
                              "TRITON_HYBRID__S3__SECRET_ACCESS_KEY=s3cret",
                              "TRITON_HYBRID__CONTROL__ROUTE53__ACCESS_KEY_ID=AKID",
                              "TRITON_HYBRID__CONTROL__ROUTE53__SECRET_ACCESS_KEY=s3cret"}


@pytest.mark.parametrize("site", ["onprem", "cloud"])
def test_triton_pod_runs_its_agent_as_init_container_and_sidecar_on_one_repository(_overlay, site, tmp_path):
    """The agent prepares the stable versions before Triton starts (init, `agent --once`), then loads and
    follows the desired state (sidecar); both write the volume Triton serves; Triton is Ready only when
    the agent says every model is live; the agent's config names exactly that directory and port."""
    r = _overlay(site)
    triton = r.get("Deployment", f"{site}-triton")
    spec = triton["spec"]["template"]["spec"]
    c = _containers(triton)
    assert [x["name"] for x in spec["initContainers"]] == ["agent-init"]
    assert [x["name"] for x in spec["containers"]] == ["triton", "agent"]
    assert " ".join(c["agent-init"]["command"] + c["agent-init"].get("args", [])).endswith("triton-hybrid agent --once")
    assert " ".join(c["agent"]["command"] + c["agent"].get("args", [])).endswith("triton-hybrid agent")
    tcmd = " ".join(c["triton"]["command"] + c["triton"]["args"])
    assert "--model-control-mode=explicit --load-model=*" in tcmd
    repo = re.search(r"--model-repository=(\S+)", tcmd).group(1)
    volume = {v["name"]: v for v in spec["volumes"]}["models"]
    assert "emptyDir" in volume
    for name in ("triton", "agent-init", "agent"):
        assert [m["mountPath"] for m in c[name]["volumeMounts"] if m["name"] == "models"] == ["/models"]
    # The agent's own config, as the pod gets it: the rendered ConfigMap + the site ConfigMap's overrides.
    files = r.get("ConfigMap", f"{site}-triton-agent-config")["data"]
    (tmp_path / "agent.yaml").write_text(files["agent.yaml"])
    env = dict(r.get("ConfigMap", f"{site}-triton-agent-site")["data"])
    mounts = {m["name"]: m["mountPath"] for m in c["agent"]["volumeMounts"]}
    env_of = {e["name"]: e.get("value") for e in c["agent"]["env"]}
    assert env_of["TRITON_HYBRID_CONFIG"] == f"{mounts['agent-config']}/agent.yaml"
    cfg = load_config(tmp_path / "agent.yaml", environ=env)
    assert cfg.agent.site == site and not cfg.s3.start_local_server
    assert cfg.agent.repository_dir == repo
    assert Path(cfg.agent.state_path).parent == Path(repo).parent  # same volume: renames are atomic
    assert cfg.agent.triton_url == "http://127.0.0.1:8000"  # the pod's own loopback
    assert cfg.agent.api_host == "0.0.0.0"  # the kubelet probes the pod's address
    probe = c["triton"]["readinessProbe"]["httpGet"]
    assert probe == {"path": "/ready", "port": cfg.agent.api_port}
    assert {p["containerPort"] for p in c["agent"]["ports"]} == {cfg.agent.api_port}
    assert c["agent"]["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": cfg.agent.api_port}
    # Each pod registers under its own name and the addresses the control plane reaches it on.
    assert {"name": "TRITON_HYBRID__AGENT__INSTANCE",
            "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in c["agent"]["env"]
    assert env_of["TRITON_HYBRID__AGENT__ADVERTISE_HTTP_URL"] == "http://$(POD_IP):8000"


@pytest.mark.parametrize("site", ["onprem", "cloud"])
def test_triton_pod_secrets_are_files_only_where_they_are_needed(_overlay, site):
    """Secrets reach the pod only as files (Secret volumes, 0400): Triton gets its admin key, the agent
    its token, admin key and S3 keys; Triton never gets S3 keys nor the agent token."""
    r = _overlay(site)
    triton = r.get("Deployment", f"{site}-triton")
    spec = triton["spec"]["template"]["spec"]
    secret_volumes = {v["name"]: v["secret"] for v in spec["volumes"] if "secret" in v}
    assert {v["defaultMode"] for v in secret_volumes.values()} == {0o400}
    c = _containers(triton)
    mounted = {n: {m["name"] for m in x.get("volumeMounts", []) if m["name"] in secret_volumes} for n, x in c.items()}
    assert mounted == {"triton": {"admin-key"}, "agent-init": {"admin-key", "s3-credentials"},
                       "agent": {"admin-key", "s3-credentials", "agent-token"}}
    text = json.dumps(triton)
    assert "secretKeyRef" not in text and "secretRef" not in text


def _secret_files(root: Path, token: bool) -> Path:
    for vol, key, value in (("admin-key", "TRITON_ADMIN_KEY", "adm1n"),
                            ("s3-credentials", "AWS_ACCESS_KEY_ID", "AKID"),
                            ("s3-credentials", "AWS_SECRET_ACCESS_KEY", "s3cret"),
                            ("agent-token", "AGENT_TOKEN", "t0ken")):
        if vol != "agent-token" or token:
            (root / vol).mkdir(parents=True, exist_ok=True)
            (root / vol / key).write_text(value + "\n")
    return root


def _fake(bindir: Path, name: str, body: str) -> None:
    bindir.mkdir(exist_ok=True)
    (bindir / name).write_text(f"#!/bin/sh\n{body}\n")
    (bindir / name).chmod(0o755)


def test_triton_container_reads_its_admin_key_from_the_secret_file(_overlay, tmp_path):
    """Triton's command, run by a real shell (Kubernetes' `$$` escapes undone, the secret directory moved
    to tmp, a stand-in `tritonserver` that prints its arguments): both restricted-API flags get the key
    from the file; without the file the container stops before starting Triton."""
    c = _containers(_overlay("onprem").get("Deployment", "onprem-triton"))["triton"]
    assert c["command"][:1] == ["/opt/nvidia/nvidia_entrypoint.sh"] and c["command"][1:3] == ["/bin/sh", "-c"]
    script = c["args"][0].replace("$$", "$").replace("/run/secrets/triton-hybrid", str(tmp_path / "secrets"))
    _fake(tmp_path / "bin", "tritonserver", 'printf "%s\\n" "$@"')
    env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin"}
    r = subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True, env=env, timeout=20)
    assert r.returncode != 0 and "TRITON_ADMIN_KEY" in r.stderr and not r.stdout  # no key file: no Triton
    _secret_files(tmp_path / "secrets", token=False)
    r = subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True, env=env, timeout=20)
    args = r.stdout.splitlines()
    assert r.returncode == 0, r.stderr
    assert "--http-restricted-api=model-repository:admin-key=adm1n" in args
    assert "--grpc-restricted-protocol=model-repository:admin-key=adm1n" in args
    assert "--model-repository=/models/repository" in args and "--model-control-mode=explicit" in args


@pytest.mark.parametrize("container", ["agent-init", "agent"])
def test_agent_containers_get_their_secrets_from_the_secret_files(_overlay, tmp_path, container):
    """agent-env.sh (from the rendered ConfigMap) run by a real shell with a stand-in `triton-hybrid`
    that prints the agent's environment: the S3 keys and the admin key from their files, the token
    only where its volume is mounted (the sidecar); a missing file stops the container."""
    r = _overlay("onprem")
    c = _containers(r.get("Deployment", "onprem-triton"))[container]
    run, args = _env_script(r, c, "onprem-triton-agent-config", "agent-env.sh", tmp_path)
    mounted = {m["name"] for m in c["volumeMounts"]}
    _secret_files(tmp_path / "secrets", token="agent-token" in mounted)
    out = run()
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "args=" + args
    want = {"TRITON_HYBRID__S3__ACCESS_KEY_ID=AKID", "TRITON_HYBRID__S3__SECRET_ACCESS_KEY=s3cret",
            "TRITON_HYBRID__AGENT__ADMIN_KEY=adm1n"}
    if container == "agent":
        want.add("TRITON_HYBRID__AGENT__TOKEN=t0ken")
    assert set(lines[1:]) == want


def test_no_s3_model_repository_anywhere_under_deploy():
    """One way to serve models: Triton serves the directory its agent writes. No manifest, unit or
    registry points Triton at the mirror (`s3://`); only docs/examples of the mirror's keys may."""
    hits = [str(f.relative_to(PROJECT_ROOT)) for f in DEPLOY.rglob("*") if f.is_file()
            and f.suffix in (".yaml", ".yml", ".service", ".env", ".example", ".cfg")
            and ("s3://" in f.read_text() or "MODEL_REPOSITORY" in f.read_text())]
    assert not hits, hits


def test_triton_networkpolicy_admits_only_the_control_plane_and_the_other_site(_overlay):
    """Triton's port 8000 serves inference and (admin-key protected) the repository API: one port, so
    it cannot be loopback-only; a NetworkPolicy admits only HAProxy/the control plane (and, at the
    cloud site, the on-prem range through the internal load balancer)."""
    for site in ("onprem", "cloud"):
        r = _overlay(site)
        pol = r.get("NetworkPolicy", f"{site}-triton")
        assert pol, f"no NetworkPolicy for {site}-triton"
        pod_labels = r.get("Deployment", f"{site}-triton")["spec"]["template"]["metadata"]["labels"]
        assert all(pod_labels.get(k) == v for k, v in pol["spec"]["podSelector"]["matchLabels"].items())
        assert pol["spec"]["policyTypes"] == ["Ingress"]
        sources = [f for rule in pol["spec"]["ingress"] for f in rule.get("from", [])]
        assert sources and all(f for f in sources)  # no empty peer (= everyone)
        assert all(rule.get("from") for rule in pol["spec"]["ingress"])  # no rule open to all sources
    onprem = _overlay("onprem").get("NetworkPolicy", "onprem-triton")
    control = _overlay("onprem").get("Deployment", "onprem-triton-hybrid-control")
    clabels = control["spec"]["template"]["metadata"]["labels"]
    assert any(all(clabels.get(k) == v for k, v in f.get("podSelector", {}).get("matchLabels", {"x": "y"}).items())
               for rule in onprem["spec"]["ingress"] for f in rule["from"])
    # Each site's entry reaches its own site's Triton (inference and health checks).
    for site in ("onprem", "cloud"):
        pol = _overlay(site).get("NetworkPolicy", f"{site}-triton")
        entry = _overlay(site).get("Deployment", f"{site}-triton-hybrid-entry")
        elabels = entry["spec"]["template"]["metadata"]["labels"]
        assert any({"port": 8000, "protocol": "TCP"} in rule.get("ports", []) and all(
            elabels.get(k) == v for k, v in f.get("podSelector", {}).get("matchLabels", {"x": "y"}).items())
            for rule in pol["spec"]["ingress"] for f in rule["from"]), site


def test_no_inline_secret_anywhere_and_secret_env_files_are_ignored_by_git():
    for f in K8S.rglob("*.y*ml"):
        for doc in yaml.safe_load_all(f.read_text()):
            if doc and doc.get("kind") == "Secret":
                assert "data" not in doc and "stringData" not in doc, f
    for example in K8S.rglob("secrets/*.env.example"):
        real = example.with_name(example.name.removesuffix(".example"))
        r = subprocess.run(["git", "check-ignore", "-q", str(real)], cwd=PROJECT_ROOT)
        assert r.returncode == 0, f"{real} would not be ignored by git"


def test_each_sites_triton_is_named_by_an_address_the_other_site_resolves(_overlay):
    """Both sites' entries and control planes list both sites' Tritons: a Triton is named by its
    site's load-balancer address (reached over the site-to-site link), never by a cluster-local
    name that the other site's cluster cannot resolve; its Service is that load balancer."""
    registry = load_config(K8S / "control-plane" / "triton-hybrid.yaml", environ={})
    for site in ("onprem", "cloud"):
        svc = _overlay(site).get("Service", f"{site}-triton")
        assert svc["spec"]["type"] == "LoadBalancer"
        mine = [i for i in registry.instances if i.site == site]
        assert mine and all(not i.host.endswith(".cluster.local") for i in mine)
        ports = {p["name"]: p["port"] for p in svc["spec"]["ports"]}
        assert (mine[0].http_port, mine[0].grpc_port, mine[0].metrics_port) == (ports["http"], ports["grpc"], ports["metrics"])


# The checker itself: each rule catches what it is for ----------------------------------------

def _tree(tmp_path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp_path


# A Triton pod of the host-agent shape that passes every check; tests break one thing at a time.
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
      initContainers:
        - name: agent-init
          image: registry.example/agent:1.0
          command: [triton-hybrid, agent, --once]
          volumeMounts: [{{name: models, mountPath: /models}}]
      containers:
        - name: triton
          image: nvcr.io/nvidia/tritonserver:24.10-py3
          args: [tritonserver, --model-repository=/models/repository, --model-control-mode=explicit, --load-model=*]
          readinessProbe: {{httpGet: {{path: {path}, port: 8400}}}}
          resources: {{limits: {{nvidia.com/gpu: 1}}}}
          volumeMounts: [{{name: models, mountPath: /models, readOnly: true}}]
        - name: agent
          image: registry.example/agent:1.0
          command: [triton-hybrid, agent]
          ports: [{{name: agent, containerPort: 8400}}]
          volumeMounts: [{{name: models, mountPath: /models}}]
      volumes:
        - {{name: models, emptyDir: {{}}}}
"""
KUSTOMIZATION = "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [d.yaml{extra}]\n"


def _problems(root: Path) -> list[str]:
    return [p for r in check_tree(root).values() for p in r.problems]


def test_checker_flags_an_inline_secret(tmp_path):
    root = _tree(tmp_path, {"kustomization.yaml": KUSTOMIZATION.format(extra=", s.yaml"),
                            "d.yaml": DEPLOY_TMPL.format(path="/ready"),
                            "s.yaml": "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\nstringData: {k: hunter2}\n"})
    assert any("inline data" in p for p in source_problems(root))


def test_checker_flags_a_wrong_readiness_path(tmp_path):
    """Triton's readiness is its agent's /ready (every model live at its desired version), not Triton's
    own: a Triton that is up with the wrong version, or none, must not join the Service."""
    root = _tree(tmp_path, {"kustomization.yaml": KUSTOMIZATION.format(extra=""),
                            "d.yaml": DEPLOY_TMPL.format(path="/v2/health/ready")})
    assert any("readinessProbe must GET /ready on the agent sidecar's port" in p
               for p in object_problems(render(root)))


def _rendered_template(tmp_path, old: str, new: str, count: int = 1) -> list[str]:
    dep = DEPLOY_TMPL.format(path="/ready")
    assert old in dep, old
    root = _tree(tmp_path, {"kustomization.yaml": KUSTOMIZATION.format(extra=""),
                            "d.yaml": dep.replace(old, new, count)})
    return object_problems(render(root))


def test_the_checkers_template_passes(tmp_path):
    assert _rendered_template(tmp_path, "/ready", "/ready") == []


@pytest.mark.parametrize("old,new,expected", [
    ("command: [triton-hybrid, agent, --once]", "command: [sleep, '1']",
     "no init container runs `triton-hybrid agent --once`"),
    ("command: [triton-hybrid, agent]", "command: [triton-hybrid, agent, --once]",
     "no sidecar container runs `triton-hybrid agent`"),
    ("--model-repository=/models/repository", "--model-repository=s3://bucket/repository", "names an s3:// location"),
    ("--model-repository=/models/repository", "--model-repository=s3://bucket/repository",
     "must be a directory of the pod that its agent writes"),
    ("--model-control-mode=explicit", "--model-control-mode=poll", "--model-control-mode=explicit"),
    ("--model-control-mode=explicit, --load-model=*]", "--model-control-mode=explicit]", "must start with --load-model=*"),
    ("mountPath: /models, readOnly: true", "mountPath: /other", "is on no volume the agent can share"),
    ("mountPath: /models, readOnly: true", "mountPath: /models", "mount it readOnly"),
    ("          volumeMounts: [{name: models, mountPath: /models}]\n      containers:",
     "      containers:", "agent container agent-init does not mount models"),
    ("readinessProbe: {httpGet: {path: /ready, port: 8400}}", "readinessProbe: {httpGet: {path: /ready, port: 8000}}",
     "readinessProbe must GET /ready on the agent sidecar's port"),
    ("resources: {limits: {nvidia.com/gpu: 1}}", "resources: {}", "no nvidia.com/gpu limit"),
])
def test_checker_flags_a_triton_pod_without_the_agent_shape(tmp_path, old, new, expected):
    problems = _rendered_template(tmp_path, old, new)
    assert any(expected in p for p in problems), problems


# A site entry pod that passes every check; tests break one thing at a time.
ENTRY_TMPL = """apiVersion: apps/v1
kind: Deployment
metadata: {name: entry}
spec:
  replicas: 2
  strategy: {type: RollingUpdate, rollingUpdate: {maxUnavailable: 0, maxSurge: 1}}
  selector: {matchLabels: {app: e}}
  template:
    metadata:
      labels: {app: e}
      annotations: {prometheus.io/scrape: "true", prometheus.io/port: "8410"}
    spec:
      containers:
        - name: haproxy
          image: haproxy:2.6.12
          readinessProbe: {httpGet: {path: /metrics, port: 8404}}
          lifecycle: {preStop: {exec: {command: [/bin/sh, -c, "sleep 10; kill -USR1 1"]}}}
          volumeMounts: [{name: cfg, mountPath: /etc/haproxy}, {name: runtime, mountPath: /run/hp}]
        - name: entry
          image: registry.example/control:1.0
          command: [triton-hybrid, entry]
          volumeMounts: [{name: runtime, mountPath: /run/hp}]
      volumes:
        - {name: cfg, configMap: {name: cfg}}
        - {name: runtime, emptyDir: {}}
"""
ENTRY_CFG = "global\n    stats socket /run/hp/haproxy.sock mode 600 level admin\n"


def _rendered_entry(tmp_path, old: str = "", new: str = "", cfg: str = ENTRY_CFG) -> list[str]:
    dep = ENTRY_TMPL
    assert old in dep, old
    kust = KUSTOMIZATION.format(extra="") + "configMapGenerator: [{name: cfg, files: [haproxy.cfg]}]\n" \
        "generatorOptions: {disableNameSuffixHash: true}\n"
    root = _tree(tmp_path, {"kustomization.yaml": kust, "d.yaml": dep.replace(old, new, 1), "haproxy.cfg": cfg})
    return object_problems(render(root))


def test_the_entry_checkers_template_passes(tmp_path):
    assert _rendered_entry(tmp_path) == []


@pytest.mark.parametrize("old,new,cfg,expected", [
    ("replicas: 2", "replicas: 1", ENTRY_CFG, "at least 2 replicas"),
    ("maxUnavailable: 0", "maxUnavailable: 1", ENTRY_CFG, "maxUnavailable 0"),
    ("{type: RollingUpdate, rollingUpdate: {maxUnavailable: 0, maxSurge: 1}}", "{type: Recreate}", ENTRY_CFG,
     "strategy RollingUpdate"),
    ("command: [triton-hybrid, entry]", "command: [triton-hybrid, control, run]", ENTRY_CFG,
     "HAProxy shares a pod with the control plane"),
    ("command: [triton-hybrid, entry]", "command: [sleep, '1']", ENTRY_CFG, "no sidecar runs `triton-hybrid entry`"),
    ("          lifecycle: {preStop: {exec: {command: [/bin/sh, -c, \"sleep 10; kill -USR1 1\"]}}}\n", "", ENTRY_CFG,
     "haproxy has no preStop hook"),
    ("          readinessProbe: {httpGet: {path: /metrics, port: 8404}}\n", "", ENTRY_CFG,
     "haproxy has no readinessProbe"),
    ("", "", "global\n    stats socket ipv4@0.0.0.0:9999 level admin\n", "is not a unix socket path"),
    ("", "", ENTRY_CFG + "listen st\n    stats admin if TRUE\n", "`stats admin`"),
    ("", "", "global\n    stats socket /var/run/haproxy.sock mode 600 level admin\n", "is not on an emptyDir"),
    ("          volumeMounts: [{name: runtime, mountPath: /run/hp}]\n", "", ENTRY_CFG,
     "entry sidecar entry does not mount runtime"),
])
def test_checker_flags_a_site_entry_without_its_shape(tmp_path, old, new, cfg, expected):
    problems = _rendered_entry(tmp_path, old, new, cfg)
    assert any(expected in p for p in problems), problems


# A per-site control-plane pod that passes every check; tests break one thing at a time.
CONTROL_TMPL = """apiVersion: apps/v1
kind: Deployment
metadata: {name: control}
spec:
  selector: {matchLabels: {app: c}}
  template:
    metadata:
      labels: {app: c}
      annotations: {prometheus.io/scrape: "true", prometheus.io/port: "8301"}
    spec:
      containers:
        - name: control
          image: registry.example/control:1.0
          command: [triton-hybrid, --config, /etc/th/th.yaml, control, run]
          envFrom: [{configMapRef: {name: site}}]
          volumeMounts: [{name: cfg, mountPath: /etc/th}, {name: state, mountPath: /var/lib/th}]
      volumes:
        - {name: cfg, configMap: {name: cfg}}
        - {name: state, emptyDir: {}}
"""
CONTROL_REGISTRY = "run_dir: /var/lib/th\ncontrol: {leader: {enabled: true, site: onprem}}\n"


def _rendered_control(tmp_path, old: str = "", new: str = "", site_env: str = "TRITON_HYBRID__CONTROL__LEADER__NAME=a"):
    """`site_env`: the site ConfigMap's literals, comma-separated."""
    assert old in CONTROL_TMPL, old
    kust = KUSTOMIZATION.format(extra=", pvc.yaml") + "generatorOptions: {disableNameSuffixHash: true}\n" \
        f"configMapGenerator: [{{name: cfg, files: [th.yaml]}}, {{name: site, literals: [{site_env}]}}]\n"
    pvc = "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {name: st}\n" \
          "spec: {accessModes: [ReadWriteOnce], resources: {requests: {storage: 1Gi}}}\n"
    root = _tree(tmp_path, {"kustomization.yaml": kust, "d.yaml": CONTROL_TMPL.replace(old, new, 1),
                            "th.yaml": CONTROL_REGISTRY, "pvc.yaml": pvc})
    return render(root)


def test_the_control_checkers_template_passes(tmp_path):
    resources = _rendered_control(tmp_path)
    assert object_problems(resources) == []
    assert site_facts(resources)["leaders"] == [("Deployment control (control)", "onprem", "a")]


@pytest.mark.parametrize("old,new,site_env,expected", [
    ("{name: state, emptyDir: {}}", "{name: state, persistentVolumeClaim: {claimName: st}}",
     "TRITON_HYBRID__CONTROL__LEADER__NAME=a", "mounts PersistentVolumeClaim st"),
    ("", "", "TRITON_HYBRID__CONTROL__LEADER__ENABLED=false", "control.leader.enabled is off"),
    ("", "", "TRITON_HYBRID__CONTROL__LEADER__SITE=onprem", "control.leader.name is empty"),
    ("envFrom: [{configMapRef: {name: site}}]", "envFrom: [{configMapRef: {name: site}}, {secretRef: {name: cfg}}]",
     "TRITON_HYBRID__CONTROL__LEADER__NAME=a", "takes envFrom Secret cfg"),
    ("--config, /etc/th/th.yaml, ", "--config, /elsewhere/th.yaml, ", "TRITON_HYBRID__CONTROL__LEADER__NAME=a",
     "is not a key of a ConfigMap mounted there"),
])
def test_checker_flags_a_control_plane_without_its_shape(tmp_path, old, new, site_env, expected):
    problems = object_problems(_rendered_control(tmp_path, old, new, site_env))
    assert any(expected in p for p in problems), problems


def test_checker_flags_sites_sharing_a_leader_name_or_a_mirror_or_lacking_a_control_plane(tmp_path):
    a = _rendered_control(tmp_path / "a")
    b = _rendered_control(tmp_path / "b", site_env="TRITON_HYBRID__CONTROL__LEADER__SITE=cloud")
    cloud_b = _rendered_control(tmp_path / "c", site_env="TRITON_HYBRID__CONTROL__LEADER__SITE=cloud, "
                                "TRITON_HYBRID__CONTROL__LEADER__NAME=b, TRITON_HYBRID__S3__BUCKET=other")
    assert across_sites_problems({"overlays/onprem": a}) == []
    problems = across_sites_problems({"overlays/onprem": a, "overlays/cloud": a})
    assert any("has control.leader.site 'onprem'; set this overlay's site" in p for p in problems), problems
    assert any("leader name 'a'" in p and "a name of its own" in p for p in problems), problems
    assert any("control.leader.name is empty" in p for p in object_problems(b))
    problems = across_sites_problems({"overlays/onprem": a, "overlays/cloud": cloud_b})
    assert len(problems) == 1 and "more than one S3 mirror" in problems[0], problems
    no_control = [x for x in a if x["kind"] != "Deployment"]
    assert any("overlays/cloud: no control plane" in p
               for p in across_sites_problems({"overlays/onprem": a, "overlays/cloud": no_control}))


def test_checker_flags_secrets_in_env_and_secret_files_others_can_read(tmp_path):
    dep = DEPLOY_TMPL.format(path="/ready").replace(
        "          ports: [{name: agent, containerPort: 8400}]",
        "          ports: [{name: agent, containerPort: 8400}]\n"
        "          env: [{name: T, valueFrom: {secretKeyRef: {name: s, key: T}}}]\n"
        "          envFrom: [{secretRef: {name: s}}]").replace(
        "        - {name: models, emptyDir: {}}",
        "        - {name: models, emptyDir: {}}\n        - {name: s, secret: {secretName: s, defaultMode: 0444}}")
    root = _tree(tmp_path, {"kustomization.yaml": KUSTOMIZATION.format(extra=", s.yaml"), "d.yaml": dep,
                            "s.yaml": "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\n"})
    problems = object_problems(render(root))
    assert any("takes env T from a Secret" in p for p in problems), problems
    assert any("takes envFrom Secret s" in p for p in problems), problems
    assert any("Secret volume s must have defaultMode 0400 (has 444)" in p for p in problems), problems


def test_checker_flags_missing_references_and_secret_literals(tmp_path):
    dep = DEPLOY_TMPL.format(path="/ready").replace(
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
                            "d.yaml": DEPLOY_TMPL.format(path="/ready"),
                            "s3.env": "AWS_SECRET_ACCESS_KEY=hunter2\n", "s3.env.example": "AWS_SECRET_ACCESS_KEY=\n"})
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(["git", "add", "s3.env"], cwd=root, check=True)
    assert any("committed to git" in p for p in source_problems(root))


def test_an_absent_secret_env_file_renders_from_its_example(tmp_path):
    """As in CI: the real env file is absent, the render still has the Secret with every key."""
    dep = DEPLOY_TMPL.format(path="/ready").replace(
        "        - {name: models, emptyDir: {}}",
        "        - {name: models, emptyDir: {}}\n        - {name: s3, secret: {secretName: s3, defaultMode: 0400}}")
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
                            "d.yaml": DEPLOY_TMPL.format(path="/ready").replace("spec:\n  selector",
                                                                                         "spec:\n  replicas: two\n  selector")})
    problems = schema_problems(render(root))
    assert any("replicas" in p and "integer" in p for p in problems), problems


def test_kubectl_kustomize_errors_are_reported(tmp_path):
    root = _tree(tmp_path, {"kustomization.yaml": KUSTOMIZATION.format(extra=", missing.yaml"),
                            "d.yaml": DEPLOY_TMPL.format(path="/ready")})
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
    for path, text in k8s_generated(K8S_REGISTRY).items():
        assert path.read_text() == text, f"{path} is stale: run `triton-hybrid deploy render-haproxy --k8s`"


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
                   "latency", "queue", "failures", "Live model version", "Version lag", "Decisions by reason"):
        assert needed.lower() in titles.lower(), needed


def test_grafana_provisioning():
    ds = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert ds["datasources"][0]["uid"] == "prometheus" and ds["datasources"][0]["type"] == "prometheus"
    prov = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "triton-hybrid.yml").read_text())
    assert prov["providers"][0]["type"] == "file"


# ---- systemd -----------------------------------------------------------------------------------

SYSTEMD = DEPLOY / "systemd"
AGENT_EXAMPLE = SYSTEMD / "agent.example.yaml"


@pytest.mark.parametrize("unit", sorted(p.name for p in SYSTEMD.glob("*.service")))
def test_systemd_unit(unit):
    text = (SYSTEMD / unit).read_text()
    u = parse_unit(text)
    assert {"Unit", "Service", "Install"} <= set(u)
    assert u["Service"].get("ExecStart") and u["Service"]["Restart"] == ["on-failure"]
    assert u["Service"].get("User") and u["Service"]["User"] != ["root"]
    assert u["Install"]["WantedBy"] == ["multi-user.target"]
    # Secrets only through systemd credentials: every *KEY/*TOKEN/*SECRET* assignment reads one
    # (its content, or the agent's *_FILE pointing into the credentials directory).
    inline = re.findall(r"\w*(?:KEY|TOKEN|SECRET)\w*=(?!\"\$\$\(cat \$\$\{CREDENTIALS_DIRECTORY\}|"
                        r"\"\$\$\{CREDENTIALS_DIRECTORY\}/)\S+", text)
    assert not inline, inline


def test_triton_and_agent_units_of_a_gpu_host():
    """Triton serves the directory its agent writes (the agent config's repository_dir), read-only to
    it, nothing loaded at start; the agent runs after Triton, may write only the repository and its
    state dir, and reads its token and admin key as systemd credentials."""
    cfg = load_config(AGENT_EXAMPLE, environ={}).agent
    assert cfg.instance and cfg.triton_url.startswith("http://127.0.0.1:")
    assert host_unit_problems(SYSTEMD, cfg.repository_dir, str(cfg.state_path)) == []
    triton = (SYSTEMD / "triton-hybrid-triton.service").read_text()
    assert "pulled" not in triton and "control plane loads" not in triton


@pytest.mark.parametrize("unit,old,new,expected", [
    ("triton-hybrid-triton.service", "--model-control-mode=explicit --load-model=*", "--model-control-mode=explicit",
     "must start with --load-model=*"),
    ("triton-hybrid-triton.service", "--model-repository=/var/lib/triton-hybrid/repository",
     "--model-repository=/srv/models", "--model-repository must be the agent's repository_dir"),
    ("triton-hybrid-triton.service", "NoNewPrivileges=true", "ReadWritePaths=/var/lib/triton-hybrid",
     "must be read-only to it"),
    ("triton-hybrid-agent.service", "triton-hybrid agent'", "triton-hybrid agent --once'",
     "ExecStart must run `triton-hybrid agent`"),
    ("triton-hybrid-agent.service", "Wants=network-online.target triton-hybrid-triton.service",
     "Wants=network-online.target",
     "Wants= must name triton-hybrid-triton.service"),
    ("triton-hybrid-agent.service", "ReadWritePaths=/var/lib/triton-hybrid/repository",
     "ReadWritePaths=/var/lib/triton-hybrid", "ReadWritePaths= must be exactly"),
    ("triton-hybrid-agent.service", "PrivateTmp=true", "PrivateTmp=false", "needs PrivateTmp=true"),
    ("triton-hybrid-agent.service", "LoadCredential=agent-token:", "LoadCredential=other-token:",
     "agent-token must be a LoadCredential="),
])
def test_host_unit_checker_flags_each_rule(tmp_path, unit, old, new, expected):
    for f in SYSTEMD.glob("*.service"):
        (tmp_path / f.name).write_text(f.read_text())
    text = (tmp_path / unit).read_text()
    assert old in text, old
    (tmp_path / unit).write_text(text.replace(old, new, 1))
    cfg = load_config(AGENT_EXAMPLE, environ={}).agent
    problems = host_unit_problems(tmp_path, cfg.repository_dir, str(cfg.state_path))
    assert any(expected in p for p in problems), problems


def test_host_unit_checker_needs_the_agent_unit(tmp_path):
    (tmp_path / "triton-hybrid-triton.service").write_text((SYSTEMD / "triton-hybrid-triton.service").read_text())
    assert host_unit_problems(tmp_path, "/r", "/r.agent") == [
        f"{tmp_path}: no triton-hybrid-agent.service (Triton and its host agent run side by side)"]


def test_parse_unit_joins_continuations_and_keeps_repeats():
    u = parse_unit("[Service]\n# c\nExecReload=a\nExecReload=b\nExecStart=/bin/sh -c 'x \\\n    y'\n")
    assert u == {"Service": {"ExecReload": ["a", "b"], "ExecStart": ["/bin/sh -c 'x y'"]}}
    with pytest.raises(ValueError, match="not a unit-file line"):
        parse_unit("[Service]\nExecStart\n")


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

# AWS grants these on "*" only (no resource-level permission exists for them).
NO_RESOURCE_LEVEL = {"route53:CreateHealthCheck", "route53:ListHealthChecks"}


@pytest.mark.parametrize("name", ["control-plane-policy.json", "triton-agent-policy.json", "entry-policy.json"])
def test_iam_policies_are_least_privilege(name):
    doc = json.loads((DEPLOY / "iam" / name).read_text())
    assert doc["Version"] == "2012-10-17"
    for st in doc["Statement"]:
        actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
        resources = st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]
        assert all("*" not in a for a in actions), st["Sid"]
        if set(actions) <= NO_RESOURCE_LEVEL:
            continue
        assert all(r != "*" and not r.endswith(":::*") for r in resources), st["Sid"]
        if st["Effect"] == "Allow" and any(a.startswith("s3:") and a != "s3:ListBucket" for a in actions):
            assert all(r.endswith("/repository/*") or "/repository/_control/" in r for r in resources), st["Sid"]
        if "s3:ListBucket" in actions:
            assert "s3:prefix" in json.dumps(st.get("Condition", {})), st["Sid"]


def test_agent_policy_reads_the_mirror_and_writes_only_agent_statuses():
    """A host agent reads versions and the desired state; the only object it writes is its status
    (`_control/status/<instance>.json`, its registration); never desired.json nor a version."""
    doc = json.loads((DEPLOY / "iam" / "triton-agent-policy.json").read_text())
    allow = {(a, r) for st in doc["Statement"] if st["Effect"] == "Allow" for a in st["Action"]
             for r in ([st["Resource"]] if isinstance(st["Resource"], str) else st["Resource"])}
    s3_writes = {r for a, r in allow if a.startswith("s3:") and a not in ("s3:GetObject", "s3:ListBucket")}
    assert {a for a, _ in allow} == {"s3:ListBucket", "s3:GetObject", "s3:PutObject", "kms:Decrypt",
                                     "kms:GenerateDataKey"}
    assert s3_writes == {"arn:aws:s3:::acme-search-triton-models/repository/_control/status/*"}
    assert not (DEPLOY / "iam" / "triton-readonly-policy.json").exists()


def test_entry_policy_reads_only_the_weights_and_writes_only_entry_reports():
    doc = json.loads((DEPLOY / "iam" / "entry-policy.json").read_text())
    allow = {(a, r) for st in doc["Statement"] if st["Effect"] == "Allow" for a in st["Action"]
             for r in ([st["Resource"]] if isinstance(st["Resource"], str) else st["Resource"])}
    s3 = {(a, r.split(":::")[1]) for a, r in allow if a.startswith("s3:")}
    assert s3 == {("s3:ListBucket", "acme-search-triton-models"),
                  ("s3:GetObject", "acme-search-triton-models/repository/_control/traffic.json"),
                  ("s3:PutObject", "acme-search-triton-models/repository/_control/entries/*")}


def test_sites_registry_loads():
    s = load_config(DEPLOY / "sites.yaml", environ={})
    assert {i.site for i in s.instances} == {"onprem", "cloud"}
    assert not s.s3.start_local_server


def test_render_prometheus_command(tmp_path):
    out = tmp_path / "p.yml"
    r = CliRunner().invoke(cli, ["deploy", "render-prometheus", "--config", str(DEPLOY / "sites.yaml"), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert out.read_text() == (DEPLOY / "prometheus" / "prometheus.sites.yml").read_text()
