"""Assemble the Triton model repository `<out>/<model>/<version>/...` from one export.

Each model gets the next integer version in `out_dir` (previous versions stay; the version policy
serves the latest). Every config.pbtxt comes from the spec through `configgen`, is parsed back,
and the ensemble wiring and the ONNX-served models' I/O are checked before anything is written.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

from export.artifacts import load_metadata
from export.errors import ExportError
from model_repository import configgen
from model_repository.spec import (
    ENSEMBLE,
    PLACEHOLDER,
    TARGETS,
    VARIANTS,
    RepositorySpec,
    Signature,
    request_limits,
    search_ranking_spec,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ENSEMBLES_DIR = PROJECT_ROOT / "ensembles"
# Copied next to every Python-backend model.py (each model.py puts its own directory on sys.path):
# the shared plumbing and stage code of the steps, the ranking semantics and the tokenizer that
# export.reference runs too.
SHARED_CODE = {
    ENSEMBLES_DIR / "common.py": "common.py",
    ENSEMBLES_DIR / "stages.py": "stages.py",
    PROJECT_ROOT / "export" / "ranking.py": "ranking.py",
    PROJECT_ROOT / "export" / "tokenizer.py": "tokenizer.py",
}
DEFAULT_EXPORTS = PROJECT_ROOT / "artifacts" / "exports"
SMOKE_FILE = "smoke.json"


class BuildError(RuntimeError):
    pass


@dataclass
class BuildResult:
    target: str
    out_dir: Path
    export_dir: Path
    versions: dict[str, int] = field(default_factory=dict)   # model -> version written
    variant: str = "fp32"

    @property
    def models(self) -> list[str]:
        return list(self.versions)

    def __str__(self) -> str:
        rows = ", ".join(f"{m} v{v}" for m, v in self.versions.items())
        return f"{self.target} repository {self.out_dir} from {self.export_dir} (variant {self.variant}): {rows}"


def default_out_dir(target: str) -> Path:
    return PROJECT_ROOT / "model_repository" / "generated" / target


def latest_export_dir(root: Path = DEFAULT_EXPORTS) -> Path:
    try:
        from export.artifacts import latest_export  # noqa: PLC0415 - export owns the layout
        from export.errors import ExportError  # noqa: PLC0415
    except ImportError:
        pass
    else:
        try:
            return Path(latest_export(root))
        except ExportError as e:
            raise BuildError(str(e)) from None
    numbered = sorted((p for p in Path(root).glob("*") if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    if not numbered:
        raise BuildError(f"no export under {root}; run `triton-hybrid export` first")
    return numbered[-1]


def verify_export(export_dir: Path) -> None:
    """The export's files match the sha256/size its metadata.json records (export/artifacts.py)."""
    try:
        load_metadata(export_dir, verify=True)
    except ExportError as e:
        raise BuildError(f"the export {export_dir} failed verification: {e}") from None


def export_signature(export_dir: Path) -> Signature:
    for name in ("query_intent.onnx", "ranker.onnx"):
        if not (Path(export_dir) / name).is_file():
            raise BuildError(f"{export_dir} is not an export (no {name})")
    qi = configgen.onnx_signature(Path(export_dir) / "query_intent.onnx")
    rk = configgen.onnx_signature(Path(export_dir) / "ranker.onnx")
    try:
        return Signature(num_intents=int(qi["outputs"]["intent_logits"][1][1]),
                         embedding_dim=int(qi["outputs"]["query_embedding"][1][1]),
                         feature_dim=int(rk["inputs"]["item_features"][1][2]),
                         seq_len=qi["inputs"]["input_ids"][1][1] or -1)
    except (KeyError, IndexError, TypeError) as e:
        raise BuildError(f"the export's ONNX graphs do not have the expected I/O ({e!r}): {qi} {rk}") from None


def spec_for_export(export_dir: Path, **overrides) -> RepositorySpec:
    return search_ranking_spec(export_signature(export_dir), **overrides)


def next_version(model_dir: Path) -> int:
    versions = [int(p.name) for p in Path(model_dir).glob("*") if p.is_dir() and p.name.isdigit()]
    return max(versions, default=0) + 1


def generate_configs(spec: RepositorySpec, target: str, export_dir: Path) -> dict:
    """All model configs of a target, checked; raises BuildError listing every problem.
    Every graph the target serves (the variant's file) is checked against the config of a native
    backend for it (the gpu layout's model of that role): the cpu Python steps feed their graphs
    the same names, dtypes and dims."""
    if target not in TARGETS:
        raise BuildError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    models = spec.models_for(target)
    configs = {m.name: configgen.model_config(m, spec, target) for m in models}
    problems = configgen.check_ensemble(configs, ENSEMBLE)
    native = {m.onnx_role: m for m in spec.models_for("gpu") if m.onnx_role}
    for m in models:
        if not m.onnx_role:
            continue
        path = Path(export_dir) / spec.onnx_file(m, target)
        if not path.is_file():
            problems.append(f"{m.name}: variant {spec.variants.get(target)!r} needs {path.name}, which the export "
                            "does not have (its gates rejected it, or it is an older export)")
            continue
        cfg = configs[m.name] if m.runtime(target).kind != "python" else \
            configgen.model_config(native[m.onnx_role], spec, "gpu")
        problems += configgen.check_against_onnx(cfg, configgen.onnx_signature(path))
    if problems:
        raise BuildError("the generated configs are inconsistent:\n  " + "\n  ".join(problems))
    return configs


def _use_plan(model, target: str, export_dir: Path, spec: RepositorySpec) -> bool:
    """A plan is built from the FP32 graph: used only where the target serves that graph."""
    return (target == "gpu" and bool(model.plan_export_file) and bool(model.onnx_role)
            and spec.onnx_file(model, target) == VARIANTS["fp32"].file(model.onnx_role)
            and (Path(export_dir) / model.plan_export_file).exists())


def _files_for(model, target: str, export_dir: Path, spec: RepositorySpec) -> dict[Path, str]:
    """{source file: name in the version dir} for one model."""
    rt = model.runtime(target)
    files: dict[Path, str] = {Path(export_dir) / src: dst for src, dst in model.data_files.items()}
    if rt.kind == "python":
        files[ENSEMBLES_DIR / rt.python_impl / "model.py"] = "model.py"
        files.update(SHARED_CODE)
    if model.onnx_role and rt.kind in ("python", "onnxruntime"):
        files[Path(export_dir) / spec.onnx_file(model, target)] = "model.onnx"
    if rt.kind == "tensorrt_plan":
        files[Path(export_dir) / model.plan_export_file] = "model.plan"
    return files


def build_repository(export_dir: str | Path, out_dir: str | Path, target: str = "cpu", version: int | None = None,
                     spec: RepositorySpec | None = None, dynamic_batching: bool = True,
                     variant: str | None = None) -> BuildResult:
    """`variant` (fp32 | int8 | student) overrides the spec's variant for this target."""
    export_dir, out_dir = Path(export_dir).resolve(), Path(out_dir)
    if not (export_dir / "query_intent.onnx").exists():
        raise BuildError(f"{export_dir} is not an export (no query_intent.onnx)")
    verify_export(export_dir)
    spec = (spec or spec_for_export(export_dir)).with_dynamic_batching(dynamic_batching)
    if variant is not None:
        try:
            spec = spec.with_variant(variant, target)
        except ValueError as e:
            raise BuildError(str(e)) from None
    if target == "gpu":
        # Plans in the export replace the ONNX runtime by a TensorRT engine for that model.
        models = []
        for m in spec.models:
            if target in m.runtimes and _use_plan(m, target, export_dir, spec):
                rts = dict(m.runtimes)
                rts["gpu"] = replace(rts["gpu"], kind="tensorrt_plan", tensorrt_accelerator=False)
                # The I/O is still checked against the ONNX graph the plan was built from.
                m = replace(m, runtimes=rts)
            models.append(m)
        spec = replace(spec, models=tuple(models))
    configs = generate_configs(spec, target, export_dir)

    plan = {}
    for m in spec.models_for(target):
        files = _files_for(m, target, export_dir, spec)
        missing = [str(p) for p in files if not p.exists()]
        if missing:
            raise BuildError(f"{m.name}: missing source files: {', '.join(missing)}")
        plan[m.name] = files

    smoke = smoke_payload(export_dir, spec, target)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = BuildResult(target, out_dir.resolve(), export_dir, variant=spec.variants.get(target, "fp32"))
    for m in spec.models_for(target):
        model_dir = out_dir / m.name
        v = version if version is not None else next_version(model_dir)
        vdir = model_dir / str(v)
        if vdir.exists():
            raise BuildError(f"{vdir} exists; versions are never overwritten (omit --version for the next one)")
        model_dir.mkdir(parents=True, exist_ok=True)
        # Write into a temp dir next to it and rename: a half-written version never shows up.
        tmp = Path(tempfile.mkdtemp(prefix=f".{v}.tmp-", dir=model_dir))
        tmp.chmod(0o755)  # mkdtemp makes it 0700; Triton or a sync job may run as another user
        for src, dst in plan[m.name].items():
            shutil.copy2(src, tmp / dst)
        if m.runtime(target).kind == "ensemble":
            (tmp / PLACEHOLDER).write_text(
                f"Version {v} of the ensemble {m.name} (built from {export_dir.name}, variant "
                f"{result.variant}: {spec.variant(target).description}). An ensemble has no model\n"
                "file, but Triton needs the version directory and S3 keeps no empty directories: this file keeps it.\n")
            (tmp / SMOKE_FILE).write_text(json.dumps(smoke, indent=1))
        tmp.rename(vdir)
        configgen.write_config(configs[m.name], model_dir)
        result.versions[m.name] = v
    return result


def smoke_payload(export_dir: Path, spec: RepositorySpec, target: str = "cpu") -> dict:
    """A small valid request from the export's held-out set and the reference answer to it (the
    reference runs the target's variant with the spec's semantics)."""
    held = json.loads((Path(export_dir) / "heldout_queries.json").read_text())
    limit = spec.limits.max_query_bytes
    fits = [h for h in held if h["candidate_ids"] and 0 < len(h["query"].strip()) and len(h["query"].encode()) <= limit]
    item = dict(fits[0] if fits else held[0])
    if not fits:   # only when no held-out query fits the limit
        item["query"] = item["query"].encode()[:limit].decode("utf-8", "ignore")
    top_k = min(5, spec.top_k_default, spec.limits.max_top_k)
    candidates = [int(c) for c in item["candidate_ids"]][: min(20, spec.limits.max_candidates)]
    payload = {"query": item["query"], "candidate_ids": candidates, "top_k": top_k,
               "variant": spec.variants.get(target, "fp32")}
    try:
        from export.reference import ReferencePipeline  # noqa: PLC0415
        variant = spec.variant(target)
        ref = ReferencePipeline(export_dir, query_model=variant.query_intent, ranker_model=variant.ranker,
                                strict=spec.strict_unknown_ids).ranking(item["query"], candidates, top_k)
        payload["expected"] = {"top_ids": [int(i) for i in ref.ids], "top_scores": [float(s) for s in ref.scores],
                               "intent": str(ref.intent), "intent_score": float(ref.intent_score),
                               "unknown_count": ref.unknown}
    except ImportError:
        pass
    return payload


__all__ = ["BuildError", "BuildResult", "build_repository", "generate_configs", "request_limits", "smoke_payload",
           "spec_for_export"]
