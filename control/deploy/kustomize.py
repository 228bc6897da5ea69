"""The project's own resolver and checker for the kustomize subset deploy/k8s uses (kustomize
itself is not installed on these machines). `triton-hybrid deploy check-k8s` runs it.

Resolved (in kustomize's order): `resources` (files, multi-document, or directories holding a
kustomization), `configMapGenerator` / `secretGenerator` (files, envs, literals; with
`generatorOptions.disableNameSuffixHash: true` only, so names stay predictable), `patches`
(strategic merge by kind + name: maps merge, lists of named maps merge by `name`, other lists are
replaced) and `patchesStrategicMerge`, then `namespace`, `namePrefix` (also applied to the
references to renamed ConfigMaps, Secrets, ServiceAccounts and PVCs), `commonLabels` (labels, and
Deployment/Service selectors and pod template labels). Anything else in a kustomization is an
error, not silently ignored.

Checks on every resolved tree: every YAML file parses; each resource has apiVersion, kind and
metadata.name and is unique; no Secret carries inline `data`/`stringData`, and secretGenerator
reads only env/files that git does not track (with a committed `.example` beside them; when the
real file is absent, as in CI, the example's keys are used with empty values); every Deployment
container named `triton` has a readiness probe on `/v2/health/ready` and a GPU limit; every pod
has Prometheus scrape annotations; every referenced ConfigMap, Secret (and key),
ServiceAccount and PVC exists in the same tree; every Service selector matches a pod template;
no image uses `:latest` or no tag.
"""
from __future__ import annotations

import copy
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import yaml

KUSTOMIZATION_NAMES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_KEYS = {"apiVersion", "kind", "resources", "namespace", "namePrefix", "commonLabels", "patches",
                  "patchesStrategicMerge", "configMapGenerator", "secretGenerator", "generatorOptions"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass",
                  "CustomResourceDefinition"}
READY_PATH = "/v2/health/ready"


class KustomizeError(ValueError):
    """A kustomization uses something this resolver does not support, or is broken."""


@dataclass
class Result:
    name: str
    resources: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> list[tuple[str, int]]:
        counts: dict[str, int] = {}
        for r in self.resources:
            counts[r["kind"]] = counts.get(r["kind"], 0) + 1
        return sorted(counts.items())

    def get(self, kind: str, name: str) -> dict | None:
        return next((r for r in self.resources if r["kind"] == kind and r["metadata"]["name"] == name), None)


def _kustomization_file(directory: Path) -> Path:
    for n in KUSTOMIZATION_NAMES:
        if (directory / n).is_file():
            return directory / n
    raise KustomizeError(f"{directory}: no kustomization.yaml")


def _load_docs(path: Path) -> list[dict]:
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except yaml.YAMLError as e:
        raise KustomizeError(f"{path}: not valid YAML: {e}") from None
    for d in docs:
        if not isinstance(d, dict) or not d.get("kind") or not d.get("apiVersion") or \
                not (d.get("metadata") or {}).get("name"):
            raise KustomizeError(f"{path}: a document without apiVersion, kind or metadata.name")
    return docs


# ---- strategic merge ---------------------------------------------------------------------------

def strategic_merge(base, patch):
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            elif k in out:
                out[k] = strategic_merge(out[k], v)
            else:
                out[k] = copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(patch, list) and _named(base) and _named(patch):
        out = [copy.deepcopy(x) for x in base]
        for item in patch:
            idx = next((i for i, x in enumerate(out) if x["name"] == item["name"]), None)
            if idx is None:
                out.append(copy.deepcopy(item))
            else:
                out[idx] = strategic_merge(out[idx], item)
        return out
    return copy.deepcopy(patch)


def _named(items: list) -> bool:
    return bool(items) and all(isinstance(x, dict) and "name" in x for x in items)


# ---- generators --------------------------------------------------------------------------------

def _read_env(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "=" not in line:
            raise KustomizeError(f"{path}: not KEY=VALUE: {line!r}")
        k, v = line.split("=", 1)
        out[k.strip()] = v
    return out


def _git_tracked(path: Path) -> bool:
    try:
        r = subprocess.run(["git", "ls-files", "--error-unmatch", path.name], cwd=path.parent,
                           capture_output=True, text=True, timeout=20)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def _generate(kdir: Path, gen: dict, kind: str, result: Result) -> dict:
    name = gen.get("name")
    if not name:
        raise KustomizeError(f"{kdir}: a {kind} generator without a name")
    unknown = set(gen) - {"name", "files", "envs", "literals", "type", "behavior"}
    if unknown:
        raise KustomizeError(f"{kdir}: generator {name}: unsupported fields {sorted(unknown)}")
    data: dict[str, str] = {}
    secret = kind == "Secret"
    if secret and gen.get("literals"):
        result.problems.append(f"secretGenerator {name}: `literals` put secret values in the kustomization")
    for lit in gen.get("literals", []):
        k, v = lit.split("=", 1)
        data[k] = v
    for env in gen.get("envs", []):
        path = kdir / env
        if secret:
            example = path.with_name(path.name + ".example")
            if path.exists() and _git_tracked(path):
                result.problems.append(f"secretGenerator {name}: {path} is committed to git")
            if not example.exists():
                result.problems.append(f"secretGenerator {name}: no {example.name} documents the keys of {env}")
            if not path.exists():
                if example.exists():
                    result.notes.append(f"secret {name}: {env} absent (as in CI); keys from {example.name}")
                    data.update({k: "" for k in _read_env(example)})
                continue
        elif not path.exists():
            raise KustomizeError(f"{kdir}: configMapGenerator {name}: {env} not found")
        data.update(_read_env(path))
    for f in gen.get("files", []):
        key, _, rel = f.partition("=") if "=" in f else (Path(f).name, "", f)
        path = kdir / rel
        if secret and path.exists() and _git_tracked(path):
            result.problems.append(f"secretGenerator {name}: {path} is committed to git")
        if not path.exists():
            if secret:
                result.notes.append(f"secret {name}: {rel} absent (as in CI)")
                data[key] = ""
                continue
            raise KustomizeError(f"{kdir}: configMapGenerator {name}: {rel} not found")
        data[key] = path.read_text()
    res = {"apiVersion": "v1", "kind": kind, "metadata": {"name": name}}
    if secret:
        res["type"] = gen.get("type", "Opaque")
        # The resolved Secret says which keys it has; values are never carried in the output.
        res["metadata"]["annotations"] = {"triton-hybrid/generated-keys": ",".join(sorted(data))}
        res["_generated"] = True
    else:
        res["data"] = data
    return res


# ---- name references ---------------------------------------------------------------------------

def _pod_spec(res: dict) -> dict | None:
    if res["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return res.get("spec", {}).get("template", {}).get("spec")
    if res["kind"] == "Pod":
        return res.get("spec")
    return None


def references(res: dict) -> list[tuple[str, str, str | None, dict, str]]:
    """(kind, name, key, holder, field) of every name reference in a workload's pod spec."""
    spec = _pod_spec(res)
    out = []
    if not spec:
        return out
    if spec.get("serviceAccountName"):
        out.append(("ServiceAccount", spec["serviceAccountName"], None, spec, "serviceAccountName"))
    for v in spec.get("volumes", []):
        if "configMap" in v:
            out.append(("ConfigMap", v["configMap"]["name"], None, v["configMap"], "name"))
        if "secret" in v:
            out.append(("Secret", v["secret"]["secretName"], None, v["secret"], "secretName"))
        if "persistentVolumeClaim" in v:
            out.append(("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"], None,
                        v["persistentVolumeClaim"], "claimName"))
    for c in spec.get("containers", []) + spec.get("initContainers", []):
        for e in c.get("env", []):
            src = e.get("valueFrom", {})
            if "secretKeyRef" in src:
                out.append(("Secret", src["secretKeyRef"]["name"], src["secretKeyRef"].get("key"), src["secretKeyRef"], "name"))
            if "configMapKeyRef" in src:
                out.append(("ConfigMap", src["configMapKeyRef"]["name"], src["configMapKeyRef"].get("key"),
                            src["configMapKeyRef"], "name"))
        for ef in c.get("envFrom", []):
            if "secretRef" in ef:
                out.append(("Secret", ef["secretRef"]["name"], None, ef["secretRef"], "name"))
            if "configMapRef" in ef:
                out.append(("ConfigMap", ef["configMapRef"]["name"], None, ef["configMapRef"], "name"))
    return out


# ---- build -------------------------------------------------------------------------------------

def build(directory: Path, result: Result | None = None) -> Result:
    directory = Path(directory)
    result = result or Result(str(directory))
    kfile = _kustomization_file(directory)
    k = yaml.safe_load(kfile.read_text()) or {}
    unknown = set(k) - SUPPORTED_KEYS
    if unknown:
        raise KustomizeError(f"{kfile}: unsupported kustomize fields {sorted(unknown)} (control/deploy/kustomize.py)")
    resources: list[dict] = []
    for ref in k.get("resources", []):
        path = (directory / ref).resolve()
        if path.is_dir():
            sub = build(path, Result(str(path)))
            result.problems += sub.problems
            result.notes += sub.notes
            resources += sub.resources
        elif path.is_file():
            resources += _load_docs(path)
        else:
            raise KustomizeError(f"{kfile}: resource {ref} not found")
    opts = k.get("generatorOptions") or {}
    gens = [("ConfigMap", g) for g in k.get("configMapGenerator", [])] + \
           [("Secret", g) for g in k.get("secretGenerator", [])]
    if gens and not opts.get("disableNameSuffixHash"):
        raise KustomizeError(f"{kfile}: generators need generatorOptions.disableNameSuffixHash: true here")
    for kind, g in gens:
        resources.append(_generate(directory, g, kind, result))
    patch_files = [p["path"] if isinstance(p, dict) else p for p in k.get("patches", [])]
    patch_files += list(k.get("patchesStrategicMerge", []))
    for p in k.get("patches", []):
        if isinstance(p, dict) and set(p) - {"path"}:
            raise KustomizeError(f"{kfile}: only `patches: - path: FILE` (strategic merge) is supported")
    for pf in patch_files:
        for patch in _load_docs(directory / pf):
            kind, name = patch["kind"], patch["metadata"]["name"]
            idx = next((i for i, r in enumerate(resources)
                        if r["kind"] == kind and r["metadata"]["name"] == name), None)
            if idx is None:
                raise KustomizeError(f"{kfile}: patch {pf} targets {kind}/{name}, which is not in the resources")
            resources[idx] = strategic_merge(resources[idx], patch)
    if k.get("namespace"):
        for r in resources:
            if r["kind"] not in CLUSTER_SCOPED:
                r["metadata"]["namespace"] = k["namespace"]
    prefix = k.get("namePrefix", "")
    if prefix:
        renamed = {(r["kind"], r["metadata"]["name"]) for r in resources if r["kind"] not in CLUSTER_SCOPED}
        for r in resources:
            for kind, name, _, holder, fld in references(r):
                if (kind, name) in renamed:
                    holder[fld] = prefix + name
        for r in resources:
            if r["kind"] not in CLUSTER_SCOPED:
                r["metadata"]["name"] = prefix + r["metadata"]["name"]
    labels = k.get("commonLabels") or {}
    if labels:
        for r in resources:
            r["metadata"].setdefault("labels", {}).update(labels)
            if r["kind"] in ("Deployment", "StatefulSet", "DaemonSet"):
                spec = r.setdefault("spec", {})
                spec.setdefault("selector", {}).setdefault("matchLabels", {}).update(labels)
                spec.setdefault("template", {}).setdefault("metadata", {}).setdefault("labels", {}).update(labels)
            if r["kind"] == "Service":
                r.setdefault("spec", {}).setdefault("selector", {}).update(labels)
    result.resources = resources
    return result


# ---- checks ------------------------------------------------------------------------------------

def check(result: Result) -> Result:
    res = result.resources
    p = result.problems
    seen = set()
    for r in res:
        key = (r["kind"], r["metadata"].get("namespace"), r["metadata"]["name"])
        if key in seen:
            p.append(f"duplicate {r['kind']}/{r['metadata']['name']}")
        seen.add(key)
        if r["kind"] == "Secret" and not r.get("_generated") and ("data" in r or "stringData" in r):
            p.append(f"Secret {r['metadata']['name']} has inline data; use a secretGenerator with an uncommitted env file")
    by_kind: dict[str, dict[str, dict]] = {}
    for r in res:
        by_kind.setdefault(r["kind"], {})[r["metadata"]["name"]] = r
    for r in res:
        spec = _pod_spec(r)
        if spec is None:
            continue
        where = f"{r['kind']} {r['metadata']['name']}"
        ann = r.get("spec", {}).get("template", {}).get("metadata", {}).get("annotations", {})
        if ann.get("prometheus.io/scrape") != "true" or not ann.get("prometheus.io/port"):
            p.append(f"{where}: pod template lacks prometheus.io/scrape and prometheus.io/port annotations")
        for kind, name, key, _, _ in references(r):
            target = by_kind.get(kind, {}).get(name)
            if target is None:
                p.append(f"{where}: references {kind} {name}, which is not in this tree")
            elif key and kind == "Secret":
                keys = target["metadata"].get("annotations", {}).get("triton-hybrid/generated-keys", "")
                data_keys = set(keys.split(",")) | set(target.get("data", {})) | set(target.get("stringData", {}))
                if key not in data_keys:
                    p.append(f"{where}: Secret {name} has no key {key}")
            elif key and kind == "ConfigMap" and key not in target.get("data", {}):
                p.append(f"{where}: ConfigMap {name} has no key {key}")
        for c in spec.get("containers", []):
            image = c.get("image", "")
            if ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest"):
                p.append(f"{where}: container {c['name']} image {image!r} needs a pinned tag")
            if c["name"] == "triton":
                probe = (c.get("readinessProbe") or {}).get("httpGet") or {}
                if probe.get("path") != READY_PATH:
                    p.append(f"{where}: triton readinessProbe must GET {READY_PATH} (has {probe.get('path')!r})")
                if "nvidia.com/gpu" not in (c.get("resources") or {}).get("limits", {}):
                    p.append(f"{where}: triton has no nvidia.com/gpu limit")
    pod_labels = [r["spec"]["template"]["metadata"].get("labels", {}) for r in res if _pod_spec(r) is not None
                  and r["kind"] != "Pod"]
    for svc in by_kind.get("Service", {}).values():
        sel = svc.get("spec", {}).get("selector") or {}
        if not any(all(lbl.get(k) == v for k, v in sel.items()) for lbl in pod_labels):
            p.append(f"Service {svc['metadata']['name']}: selector {sel} matches no pod template")
    for r in res:
        r.pop("_generated", None)
    return result


def check_tree(root: Path) -> dict[str, Result]:
    """Parse every YAML file under root, then build and check base, every other kustomization
    that is not an overlay, and every overlay. Keys: paths relative to root."""
    root = Path(root)
    results: dict[str, Result] = {}
    parse = Result("yaml files")
    for path in sorted(root.rglob("*.y*ml")):
        try:
            list(yaml.safe_load_all(path.read_text()))
        except yaml.YAMLError as e:
            parse.problems.append(f"{path.relative_to(root)}: {e}")
    results["(every YAML file)"] = parse
    for kfile in sorted(root.rglob("kustomization.yaml")):
        name = str(kfile.parent.relative_to(root))
        try:
            results[name] = check(build(kfile.parent, Result(name)))
        except KustomizeError as e:
            results[name] = Result(name, problems=[str(e)])
    return results


def to_yaml(result: Result) -> str:
    return yaml.safe_dump_all(result.resources, sort_keys=False)
