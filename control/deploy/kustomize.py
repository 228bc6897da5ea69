"""Render the Kubernetes overlays with `kubectl kustomize` and check what comes out.

Rendering is kustomize's job (kubectl >= 1.27 carries kustomize v5): nothing here resolves
kustomizations by hand. Secret env files are never committed, so before rendering, the tree is
copied to a scratch folder where each absent `secrets/X.env` is stood in for by its committed
`X.env.example` (same keys, empty values): the render sees every key a Secret will have.

Checks on the source tree (what a render cannot show): no Secret with inline `data`/`stringData`,
no secretGenerator `literals`, every secret env file has a committed `.example` and is not itself
committed. Checks on every rendered object: schema validation against the Kubernetes API
(`kubernetes-validate`, offline); each pod template has Prometheus scrape annotations; images have a
pinned tag; every ConfigMap/Secret (and key), ServiceAccount and PVC a pod references exists in the
same render; every Service selector matches a pod template; no `s3://` anywhere (Triton never reads
the mirror itself: its host agent does, docs/agent.md).

The Triton pod (a pod with a container named `triton`) has the host-agent shape: a GPU limit;
Triton in explicit model-control mode on a local directory with `--load-model=*` (at start it loads
what the agent's live configs name; every change after is the agent's, through the repository API); an init container `triton-hybrid agent --once` and a
sidecar `triton-hybrid agent` that both mount, writable, the volume holding that directory, which
Triton mounts read-only (the agent is its only writer); Triton's readiness probe is the sidecar's
`/ready` (every model live at its desired version); secrets reach its containers only as files
(Secret volumes with defaultMode 0400), never as environment variables.

A control-plane pod (a container running `triton-hybrid ... control run`): its effective config (the
registry ConfigMap it is pointed at + its env overrides, loaded by control/config.py) has leader
election on with a site and a name; no PersistentVolumeClaim (its SQLite is the pod's own; what a
leader needs is in S3); secrets only as files. Across the overlays of one tree (`check_tree`): every
control plane has a distinct leader name and its own overlay's site, and every component of every site
(control planes, agents, entry agents) uses one S3 mirror: the lease only works in one place.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import kubernetes_validate
import yaml

from control.config import ENV_CONFIG, ConfigError, Settings, load_config

AGENT_READY_PATH = "/ready"           # the agent's readiness: every model live at its desired version
SECRET_FILE_MODE = 0o400
_AGENT = re.compile(r"\btriton-hybrid\b.*\sagent\b(?P<once>.*\s--once\b)?")
KUBERNETES_VERSION = "1.30.0"  # the schema version objects are validated against (our clusters' floor)
KUBECTL_INSTALL_HINT = (
    "kubectl is not installed: it renders the overlays (`kubectl kustomize`). Install it from your "
    "distribution or the Kubernetes release page (https://kubernetes.io/docs/tasks/tools/), any version "
    ">= 1.27, then run this again.")


class KustomizeError(RuntimeError):
    """kubectl is missing, or `kubectl kustomize` refused an overlay (its message is kept)."""


@dataclass
class Result:
    name: str
    resources: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def summary(self) -> list[tuple[str, int]]:
        counts: dict[str, int] = {}
        for r in self.resources:
            counts[r["kind"]] = counts.get(r["kind"], 0) + 1
        return sorted(counts.items())

    def get(self, kind: str, name: str) -> dict | None:
        return next((r for r in self.resources if r["kind"] == kind and r["metadata"]["name"] == name), None)


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        raise KustomizeError(KUBECTL_INSTALL_HINT)
    return path


def _kustomizations(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("kustomization.yaml"))


def _git_tracked(path: Path) -> bool:
    r = subprocess.run(["git", "ls-files", "--error-unmatch", path.name], cwd=path.parent,
                       capture_output=True, text=True, timeout=20)
    return r.returncode == 0


def _secret_env_files(kdir: Path) -> list[Path]:
    k = yaml.safe_load((kdir / "kustomization.yaml").read_text()) or {}
    return [kdir / env for g in k.get("secretGenerator", []) for env in g.get("envs", [])]


def _with_example_secrets(root: Path, scratch: Path) -> Path:
    """A copy of `root` in which each absent secret env file is its `.example` (keys, empty values)."""
    copy = scratch / root.name
    shutil.copytree(root, copy, symlinks=False)
    for kdir in _kustomizations(copy):
        for env in _secret_env_files(kdir):
            example = env.with_name(env.name + ".example")
            if not env.exists() and example.exists():
                shutil.copyfile(example, env)
    return copy


def render(overlay: Path) -> list[dict]:
    """The objects `kubectl kustomize OVERLAY` produces."""
    r = subprocess.run([kubectl(), "kustomize", str(overlay)], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise KustomizeError(f"kubectl kustomize {overlay.name}: {r.stderr.strip()}")
    return [d for d in yaml.safe_load_all(r.stdout) if d]


# ---- checks on the source tree ------------------------------------------------------------------

def source_problems(root: Path) -> list[str]:
    problems = []
    for f in sorted(root.rglob("*.y*ml")):
        try:
            docs = [d for d in yaml.safe_load_all(f.read_text()) if isinstance(d, dict)]
        except yaml.YAMLError as e:
            problems.append(f"{f.relative_to(root)}: not valid YAML: {e}")
            continue
        for d in docs:
            if d.get("kind") == "Secret" and ("data" in d or "stringData" in d):
                problems.append(f"{f.relative_to(root)}: Secret {d.get('metadata', {}).get('name')} has inline "
                                "data; use a secretGenerator with an uncommitted env file")
    for kdir in _kustomizations(root):
        k = yaml.safe_load((kdir / "kustomization.yaml").read_text()) or {}
        for g in k.get("secretGenerator", []):
            if g.get("literals"):
                problems.append(f"{kdir.relative_to(root)}: secretGenerator {g.get('name')}: `literals` put "
                                "secret values in the kustomization; use an env file")
        for env in _secret_env_files(kdir):
            rel = env.relative_to(root)
            if not env.with_name(env.name + ".example").exists():
                problems.append(f"{rel}: no {env.name}.example documents its keys")
            if env.exists() and _git_tracked(env):
                problems.append(f"{rel}: a secret env file is committed to git")
    return problems


# ---- checks on rendered objects -------------------------------------------------------------------

def _pod_spec(res: dict) -> dict | None:
    if res["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return res.get("spec", {}).get("template", {}).get("spec")
    if res["kind"] == "Pod":
        return res.get("spec")
    return None


def _references(spec: dict) -> list[tuple[str, str, str | None]]:
    """(kind, name, key or None) of every ConfigMap, Secret, ServiceAccount and PVC a pod uses."""
    refs: list[tuple[str, str, str | None]] = []
    if spec.get("serviceAccountName"):
        refs.append(("ServiceAccount", spec["serviceAccountName"], None))
    for v in spec.get("volumes", []):
        if "configMap" in v:
            refs.append(("ConfigMap", v["configMap"]["name"], None))
        if "secret" in v:
            refs.append(("Secret", v["secret"]["secretName"], None))
        if "persistentVolumeClaim" in v:
            refs.append(("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"], None))
    for c in spec.get("containers", []) + spec.get("initContainers", []):
        for e in c.get("env", []):
            src = e.get("valueFrom") or {}
            for kind, fld in (("Secret", "secretKeyRef"), ("ConfigMap", "configMapKeyRef")):
                if fld in src:
                    refs.append((kind, src[fld]["name"], src[fld].get("key")))
        for ef in c.get("envFrom", []):
            for kind, fld in (("Secret", "secretRef"), ("ConfigMap", "configMapRef")):
                if fld in ef:
                    refs.append((kind, ef[fld]["name"], None))
    return refs


def schema_problems(resources: list[dict]) -> list[str]:
    problems = []
    for r in resources:
        try:
            kubernetes_validate.validate(r, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            problems.append(f"{r['kind']} {r['metadata'].get('name')}: schema: {e.message} at "
                            f"{'.'.join(str(p) for p in e.path)}")
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(f"{r['kind']} {r['metadata'].get('name')}: no schema for {r.get('apiVersion')}")
    return problems


def _command(c: dict) -> str:
    return " ".join(str(x) for x in c.get("command", []) + c.get("args", []))


def _agent_kind(c: dict) -> str | None:
    """"once" for `triton-hybrid agent --once`, "loop" for `triton-hybrid agent`, else None."""
    m = _AGENT.search(_command(c))
    return None if m is None else ("once" if m.group("once") else "loop")


def _mount_of(c: dict, path: str) -> dict | None:
    """The volumeMount of container c under which `path` lies (the longest mountPath)."""
    hits = [m for m in c.get("volumeMounts", [])
            if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")]
    return max(hits, key=lambda m: len(m["mountPath"]), default=None)


def secret_file_problems(where: str, spec: dict) -> list[str]:
    """Secrets reach a pod's containers only as files (Secret volumes with defaultMode 0400)."""
    p: list[str] = []
    for c in spec.get("containers", []) + spec.get("initContainers", []):
        for e in c.get("env", []):
            if "secretKeyRef" in (e.get("valueFrom") or {}):
                p.append(f"{where}: container {c['name']} takes env {e['name']} from a Secret; mount the Secret "
                         "as files (defaultMode 0400)")
        for ef in c.get("envFrom", []):
            if "secretRef" in ef:
                p.append(f"{where}: container {c['name']} takes envFrom Secret {ef['secretRef']['name']}; mount "
                         "it as files (defaultMode 0400)")
    for v in spec.get("volumes", []):
        if "secret" in v:
            modes = [v["secret"].get("defaultMode", 0o644)] + [i["mode"] for i in v["secret"].get("items", [])
                                                                if "mode" in i]
            if any(m != SECRET_FILE_MODE for m in modes):
                p.append(f"{where}: Secret volume {v['name']} must have defaultMode 0400 (has "
                         f"{', '.join(f'{m:o}' for m in modes)})")
    return p


def triton_pod_problems(where: str, spec: dict) -> list[str]:
    """The host-agent shape of a pod with a container named `triton` (module docstring)."""
    p: list[str] = []
    triton = next(c for c in spec.get("containers", []) if c["name"] == "triton")
    if "nvidia.com/gpu" not in (triton.get("resources") or {}).get("limits", {}):
        p.append(f"{where}: triton has no nvidia.com/gpu limit")
    cmd = _command(triton)
    if "--model-control-mode=explicit" not in cmd:
        p.append(f"{where}: triton must run with --model-control-mode=explicit (its agent loads the models)")
    if "--load-model=*" not in cmd.replace("'", "").replace('"', ""):
        p.append(f"{where}: triton must start with --load-model=* (the versions its agent's live configs name; "
                 "every later change is the agent's)")
    repo = re.search(r"--model-repository=(\S+)", cmd)
    repo_path = repo.group(1).strip("'\"") if repo else ""
    if not repo_path.startswith("/"):
        p.append(f"{where}: triton's --model-repository must be a directory of the pod that its agent writes "
                 f"(has {repo_path or 'none'!r})")
    init = [c for c in spec.get("initContainers", []) if _agent_kind(c) == "once"]
    sidecar = [c for c in spec.get("containers", []) if _agent_kind(c) == "loop"]
    if not init:
        p.append(f"{where}: no init container runs `triton-hybrid agent --once` (the stable versions on disk "
                 "before Triton starts)")
    if not sidecar:
        p.append(f"{where}: no sidecar container runs `triton-hybrid agent` (it loads and follows the desired state)")
    if repo_path.startswith("/"):
        mount = _mount_of(triton, repo_path)
        if mount is None:
            p.append(f"{where}: triton's repository {repo_path} is on no volume the agent can share")
        else:
            if not mount.get("readOnly"):
                p.append(f"{where}: triton mounts {mount['name']} writable; mount it readOnly: the agent is "
                         "the repository's only writer")
            for c in init + sidecar:
                theirs = [m for m in c.get("volumeMounts", []) if m["name"] == mount["name"]]
                if not theirs or any(m.get("readOnly") for m in theirs):
                    p.append(f"{where}: agent container {c['name']} does not mount {mount['name']} (triton's "
                             "repository) writable")
    probe = (triton.get("readinessProbe") or {}).get("httpGet") or {}
    agent_ports = {cp.get("containerPort") for c in sidecar for cp in c.get("ports", [])}
    if probe.get("path") != AGENT_READY_PATH or probe.get("port") not in agent_ports:
        p.append(f"{where}: triton's readinessProbe must GET {AGENT_READY_PATH} on the agent sidecar's port "
                 f"(a port number among {sorted(x for x in agent_ports if x) or 'none'}; has "
                 f"{probe.get('path')!r} on {probe.get('port')!r})")
    return p + secret_file_problems(where, spec)


_ENTRY = re.compile(r"\btriton-hybrid\b.*\sentry\b")
_CONTROL = re.compile(r"\btriton-hybrid\b.*\scontrol\s+run\b")
_STATS_SOCKET = re.compile(r"^\s*stats socket (\S+)(.*)$", re.M)
MIN_ENTRY_REPLICAS = 2


def entry_pod_problems(where: str, res: dict, configmaps: dict[str, dict]) -> list[str]:
    """The site-entry shape of a pod with a container named `haproxy` (module docstring)."""
    p: list[str] = []
    spec = _pod_spec(res)
    containers = spec.get("containers", [])
    haproxy = next(c for c in containers if c["name"] == "haproxy")
    if any(_CONTROL.search(_command(c)) for c in containers + spec.get("initContainers", [])):
        p.append(f"{where}: HAProxy shares a pod with the control plane; the site entry is a Deployment of its own "
                 "(a control-plane rollout must not drop client traffic)")
    if res["kind"] == "Deployment":
        if (res["spec"].get("replicas") or 1) < MIN_ENTRY_REPLICAS:
            p.append(f"{where}: a site entry needs at least {MIN_ENTRY_REPLICAS} replicas")
        strat = res["spec"].get("strategy") or {}
        ru = strat.get("rollingUpdate") or {}
        if strat.get("type", "RollingUpdate") != "RollingUpdate" or str(ru.get("maxUnavailable", "25%")) != "0" \
                or str(ru.get("maxSurge", "25%")) in ("0", "0%"):
            p.append(f"{where}: a site entry rolls one replica at a time with none missing: strategy RollingUpdate, "
                     "maxUnavailable 0, maxSurge 1")
    if not haproxy.get("readinessProbe"):
        p.append(f"{where}: haproxy has no readinessProbe")
    if not ((haproxy.get("lifecycle") or {}).get("preStop")):
        p.append(f"{where}: haproxy has no preStop hook (requests in flight must finish before it stops: wait for "
                 "the endpoints to drop the pod, then soft-stop with SIGUSR1)")
    sidecars = [c for c in containers if _ENTRY.search(_command(c))]
    if not sidecars:
        p.append(f"{where}: no sidecar runs `triton-hybrid entry` (it applies the decided weights to this HAProxy)")
    # The runtime socket: a unix socket on an emptyDir both containers mount, never a network address.
    empty = {v["name"] for v in spec.get("volumes", []) if "emptyDir" in v}
    cfg_text = ""
    for m in haproxy.get("volumeMounts", []):
        vol = next((v for v in spec.get("volumes", []) if v["name"] == m["name"]), {})
        if "configMap" in vol:
            cfg_text = (configmaps.get(vol["configMap"]["name"]) or {}).get("data", {}).get("haproxy.cfg", cfg_text)
    sockets = _STATS_SOCKET.findall(cfg_text)
    if not sockets:
        p.append(f"{where}: haproxy's config (haproxy.cfg in its ConfigMap) declares no runtime socket")
    if "stats admin" in cfg_text:
        p.append(f"{where}: haproxy.cfg has `stats admin`: the stats page must not change servers")
    for path, _rest in sockets:
        if not path.startswith("/"):
            p.append(f"{where}: haproxy's runtime socket {path} is not a unix socket path; it must never be on the "
                     "network")
            continue
        mount = _mount_of(haproxy, path)
        if mount is None or mount["name"] not in empty:
            p.append(f"{where}: haproxy's runtime socket {path} is not on an emptyDir of the pod")
            continue
        for c in sidecars:
            if _mount_of(c, path) is None or _mount_of(c, path)["name"] != mount["name"]:
                p.append(f"{where}: entry sidecar {c['name']} does not mount {mount['name']} (HAProxy's runtime "
                         "socket) at the same path")
    return p + secret_file_problems(where, spec)


def _config_path(c: dict) -> str | None:
    """The config file a triton-hybrid container reads: `--config PATH` or TRITON_HYBRID_CONFIG."""
    argv = [str(x) for x in c.get("command", []) + c.get("args", [])]
    if "--config" in argv[:-1]:
        return argv[argv.index("--config") + 1]
    return next((e.get("value") for e in c.get("env", []) if e["name"] == ENV_CONFIG), None)


def container_config(spec: dict, c: dict, configmaps: dict[str, dict]) -> Settings:
    """The settings a triton-hybrid container of a rendered pod starts with: its config file (a key of
    the ConfigMap volume mounted there) and the env overrides the pod gives it (ConfigMaps by envFrom,
    literal env values; values from fields or Secrets are left out: they are per pod or secret).
    Raises ConfigError when the pod does not say where its config is, or the config is invalid."""
    path = _config_path(c)
    mount = _mount_of(c, path) if path else None
    vol = next((v for v in spec.get("volumes", []) if mount and v["name"] == mount["name"]), {})
    cm = (configmaps.get((vol.get("configMap") or {}).get("name", "")) or {}).get("data", {})
    key = Path(path).name if path else ""
    if key not in cm:
        raise ConfigError(f"container {c['name']}: its config {path or '(none)'} is not a key of a ConfigMap "
                          "mounted there")
    env: dict[str, str] = {}
    for ef in c.get("envFrom", []):
        if "configMapRef" in ef:
            env.update((configmaps.get(ef["configMapRef"]["name"]) or {}).get("data", {}))
    env.update({e["name"]: str(e["value"]) for e in c.get("env", []) if "value" in e})
    with tempfile.TemporaryDirectory(prefix="pod-config-") as d:
        f = Path(d) / key
        f.write_text(cm[key])
        return load_config(f, environ=env)


def _control_containers(spec: dict) -> list[dict]:
    return [c for c in spec.get("containers", []) if _CONTROL.search(_command(c))]


def control_pod_problems(where: str, spec: dict, configmaps: dict[str, dict]) -> list[str]:
    """The per-site control plane's shape (module docstring)."""
    p: list[str] = []
    for v in spec.get("volumes", []):
        if "persistentVolumeClaim" in v:
            p.append(f"{where}: the control plane mounts PersistentVolumeClaim {v['persistentVolumeClaim']['claimName']}; "
                     "its SQLite is a per-pod cache and audit (an emptyDir): a leader takes what it needs from S3, "
                     "and a volume would tie the site's control plane to one node and one pod at a time")
    for c in _control_containers(spec):
        try:
            leader = container_config(spec, c, configmaps).control.leader
        except ConfigError as e:
            p.append(f"{where}: {e}")
            continue
        if not leader.enabled:
            p.append(f"{where}: control.leader.enabled is off: with a control plane per site both would act; "
                     "enable leader election (TRITON_HYBRID__CONTROL__LEADER__ENABLED=true)")
        if not leader.name:
            p.append(f"{where}: control.leader.name is empty: name each site's control plane "
                     "(TRITON_HYBRID__CONTROL__LEADER__NAME), the lease, status and audit say which one leads")
    return p + secret_file_problems(where, spec)


def _mirror(s: Settings) -> tuple[str, str, str]:
    return (s.s3.endpoint_url, s.s3.bucket, s.s3.prefix)


def site_facts(resources: list[dict]) -> dict:
    """What an overlay's control planes and triton-hybrid containers say: leaders [(where, site, name)]
    and mirrors {where: (endpoint, bucket, prefix)}."""
    cms = {r["metadata"]["name"]: r for r in resources if r["kind"] == "ConfigMap"}
    leaders, mirrors = [], {}
    for r in resources:
        spec = _pod_spec(r)
        if spec is None:
            continue
        for c in spec.get("initContainers", []) + spec.get("containers", []):
            if not _config_path(c):
                continue
            where = f"{r['kind']} {r['metadata']['name']} ({c['name']})"
            try:
                s = container_config(spec, c, cms)
            except ConfigError:
                continue  # reported by the pod's own checks
            mirrors[where] = _mirror(s)
            if c in _control_containers(spec):
                leaders.append((where, s.control.leader.site, s.control.leader.name))
    return {"leaders": leaders, "mirrors": mirrors}


def across_sites_problems(sites: dict[str, list[dict]]) -> list[str]:
    """Overlay name -> its rendered objects. Distinct leader names, each control plane in its own site
    (the overlay's name ends with the site), one mirror for everything."""
    p: list[str] = []
    names: dict[str, str] = {}
    mirrors: dict[tuple, list[str]] = {}
    for overlay, resources in sites.items():
        facts = site_facts(resources)
        if not facts["leaders"]:
            p.append(f"{overlay}: no control plane; each site runs its own (the leader or the standby), or losing "
                     "the site that has one loses every decision")
        for where, site, name in facts["leaders"]:
            if not overlay.endswith(site):
                p.append(f"{overlay}: {where} has control.leader.site {site!r}; set this overlay's site")
            if name in names:
                p.append(f"{overlay}: {where} has leader name {name!r}, as {names[name]}: each site's control "
                         "plane needs a name of its own")
            names.setdefault(name, f"{overlay} {where}")
        for where, m in facts["mirrors"].items():
            mirrors.setdefault(m, []).append(f"{overlay}: {where}")
    if len(mirrors) > 1:
        p.append("the sites use more than one S3 mirror; the lease, the desired state and the weights must be in "
                 "one place both sites reach: " + "; ".join(f"{m[0] or '(local)'}/{m[1]}/{m[2]}: {', '.join(w)}"
                                                          for m, w in mirrors.items()))
    return p


def object_problems(resources: list[dict]) -> list[str]:
    p: list[str] = []
    by_kind: dict[str, dict[str, dict]] = {}
    for r in resources:
        by_kind.setdefault(r["kind"], {})[r["metadata"]["name"]] = r
        if "s3://" in json.dumps(r):
            p.append(f"{r['kind']} {r['metadata']['name']}: names an s3:// location; Triton serves the directory "
                     "its agent writes (docs/agent.md), nothing reads the mirror through an s3:// repository")
    pod_labels = []
    for r in resources:
        spec = _pod_spec(r)
        if spec is None:
            continue
        where = f"{r['kind']} {r['metadata']['name']}"
        template = r.get("spec", {}).get("template", {}).get("metadata", {})
        pod_labels.append(template.get("labels", {}))
        ann = template.get("annotations", {})
        if ann.get("prometheus.io/scrape") != "true" or not ann.get("prometheus.io/port"):
            p.append(f"{where}: pod template lacks prometheus.io/scrape and prometheus.io/port annotations")
        for kind, name, key in _references(spec):
            target = by_kind.get(kind, {}).get(name)
            if target is None:
                p.append(f"{where}: references {kind} {name}, which is not in this render")
            elif key and key not in target.get("data", {}):
                p.append(f"{where}: {kind} {name} has no key {key}")
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            image = c.get("image", "")
            if ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest"):
                p.append(f"{where}: container {c['name']} image {image!r} needs a pinned tag")
        if any(c["name"] == "triton" for c in spec.get("containers", [])):
            p += triton_pod_problems(where, spec)
        if any(c["name"] == "haproxy" for c in spec.get("containers", [])):
            p += entry_pod_problems(where, r, by_kind.get("ConfigMap", {}))
        if _control_containers(spec):
            p += control_pod_problems(where, spec, by_kind.get("ConfigMap", {}))
    for svc in by_kind.get("Service", {}).values():
        sel = svc.get("spec", {}).get("selector") or {}
        if not any(all(lbl.get(k) == v for k, v in sel.items()) for lbl in pod_labels):
            p.append(f"Service {svc['metadata']['name']}: selector {sel} matches no pod template")
    return p


def check_tree(root: Path) -> dict[str, Result]:
    """Source checks, then render and check every kustomization under root. Keys: paths relative to
    root, plus "(source tree)". Raises KustomizeError when kubectl is missing."""
    root = Path(root)
    kubectl()
    results = {"(source tree)": Result("(source tree)", problems=source_problems(root))}
    with tempfile.TemporaryDirectory(prefix="kustomize-") as scratch:
        copy = _with_example_secrets(root, Path(scratch))
        for kdir in _kustomizations(copy):
            name = str(kdir.relative_to(copy))
            try:
                resources = render(kdir)
            except KustomizeError as e:
                results[name] = Result(name, problems=[str(e)])
                continue
            results[name] = Result(name, resources, schema_problems(resources) + object_problems(resources))
    sites = {n: r.resources for n, r in results.items() if n.startswith("overlays/") and r.resources}
    if len(sites) > 1:
        results["(across overlays)"] = Result("(across overlays)", problems=across_sites_problems(sites))
    return results


def to_yaml(resources: list[dict]) -> str:
    return yaml.safe_dump_all(resources, sort_keys=False)
