"""The model repository builder: configs from the spec (protobuf, parsed back), ensemble wiring,
cpu and gpu configs against the export's ONNX signatures, versions, files, the CLI. No server."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
from click.testing import CliRunner

from export.artifacts import write_metadata
from model_repository import configgen
from model_repository.build import (
    BuildError,
    build_repository,
    export_signature,
    generate_configs,
    spec_for_export,
)
from model_repository.cli import repo_group
from model_repository.spec import (
    ENSEMBLE,
    PLACEHOLDER,
    VARIANTS,
    Tensor,
    request_limits,
)

CPU_MODELS = ["query_intent", "ranker", ENSEMBLE]
GPU_MODELS = ["preprocess", "query_intent", "feature_lookup", "ranker", "postprocess", ENSEMBLE]
MODELS = {"cpu": CPU_MODELS, "gpu": GPU_MODELS}
SHARED_CODE = {"model.py", "common.py", "stages.py", "ranking.py", "tokenizer.py"}


@pytest.fixture(scope="session")
def export_dir(tiny_export):
    return tiny_export


def read_config(model_dir):
    return configgen.parse_pbtxt((model_dir / "config.pbtxt").read_text())


# ids without the bare word "gpu": conftest skips tests with a "gpu" keyword on CPU hosts.
@pytest.mark.parametrize("target", ["cpu", "gpu"], ids=["cpu-target", "gpu-target"])
def test_configs_parse_back_and_match_the_onnx_graphs(export_dir, target):
    spec = spec_for_export(export_dir)
    configs = generate_configs(spec, target, export_dir)   # raises on any inconsistency
    assert set(configs) == set(MODELS[target])
    for name, cfg in configs.items():
        assert configgen.parse_pbtxt(configgen.to_pbtxt(cfg)) == cfg, name
    if target == "gpu":
        for name, onnx_file in (("query_intent", "query_intent.onnx"), ("ranker", "ranker.onnx")):
            assert configgen.check_against_onnx(configs[name], configgen.onnx_signature(export_dir / onnx_file)) == []
    assert configgen.check_ensemble(configs, ENSEMBLE) == []
    ens = configs[ENSEMBLE]
    assert [o.name for o in ens.output] == ["TOP_IDS", "TOP_SCORES", "INTENT", "INTENT_SCORE", "UNKNOWN_COUNT"]
    assert [st.model_name for st in ens.ensemble_scheduling.step] == [m for m in MODELS[target] if m != ENSEMBLE]


def test_the_cpu_target_crosses_the_python_backend_twice(export_dir):
    """Issue 17: two Python-backend steps on cpu (query side, candidate side), each running its graph
    in-process; batching that never waits."""
    configs = generate_configs(spec_for_export(export_dir), "cpu", export_dir)
    steps = [st.model_name for st in configs[ENSEMBLE].ensemble_scheduling.step]
    assert steps == ["query_intent", "ranker"]
    for name in steps:
        cfg = configs[name]
        assert cfg.backend == "python" and cfg.parameters["onnx_file"].string_value == "model.onnx"
        assert cfg.HasField("dynamic_batching") and cfg.dynamic_batching.max_queue_delay_microseconds == 0
    assert {o.name for o in configs["query_intent"].output} == {"intent_probs", "query_embedding", "INTENT",
                                                                 "INTENT_SCORE"}
    assert "QUERY" in configgen.to_pbtxt(configs["query_intent"])


def test_request_limits_come_from_the_spec_and_reach_the_models(export_dir):
    spec = spec_for_export(export_dir, max_candidates=50, max_top_k=20, max_query_bytes=64, strict_unknown_ids=True)
    assert request_limits(spec) == {"max_candidates": 50, "max_top_k": 20, "max_query_bytes": 64, "max_batch_size": 8}
    cpu = generate_configs(spec, "cpu", export_dir)
    assert cpu["ranker"].parameters["max_candidates"].string_value == "50"
    assert cpu["ranker"].parameters["max_top_k"].string_value == "20"
    assert cpu["ranker"].parameters["strict_unknown_ids"].string_value == "true"
    assert cpu["query_intent"].parameters["max_query_bytes"].string_value == "64"
    gpu = generate_configs(spec, "gpu", export_dir)
    assert gpu["feature_lookup"].parameters["max_candidates"].string_value == "50"
    assert gpu["feature_lookup"].parameters["strict_unknown_ids"].string_value == "true"
    assert gpu["postprocess"].parameters["max_top_k"].string_value == "20"
    assert gpu["preprocess"].parameters["max_query_bytes"].string_value == "64"
    assert all(c.max_batch_size == 8 for c in cpu.values())
    assert spec_for_export(export_dir).strict_unknown_ids is False        # lenient by default
    assert request_limits() == request_limits(spec_for_export(export_dir)) == request_limits(spec_for_export(export_dir).limits)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_variant_serves_its_files(export_dir, tmp_path, variant):
    files = VARIANTS[variant]
    if not all((export_dir / f).exists() for f in (files.query_intent, files.ranker)):
        with pytest.raises(BuildError, match="does not have"):
            build_repository(export_dir, tmp_path / variant, "cpu", variant=variant)
        return
    result = build_repository(export_dir, tmp_path / variant, "cpu", variant=variant)
    assert result.variant == variant
    for model, src in (("query_intent", files.query_intent), ("ranker", files.ranker)):
        assert (tmp_path / variant / model / "1" / "model.onnx").read_bytes() == (export_dir / src).read_bytes()
    smoke = json.loads((tmp_path / variant / ENSEMBLE / "1" / "smoke.json").read_text())
    assert smoke["variant"] == variant and smoke["expected"]["unknown_count"] == 0
    gpu = build_repository(export_dir, tmp_path / f"{variant}-gpu", "gpu", variant=variant)
    assert (tmp_path / f"{variant}-gpu" / "ranker" / "1" / "model.onnx").read_bytes() == (export_dir / files.ranker).read_bytes()
    assert gpu.variant == variant


def test_a_variant_missing_from_the_export_is_refused(export_dir, tmp_path):
    copy = tmp_path / "export"
    shutil.copytree(export_dir, copy)
    (copy / "query_intent_student.onnx").unlink(missing_ok=True)
    meta = json.loads((copy / "metadata.json").read_text())
    write_metadata(copy, meta)
    with pytest.raises(BuildError, match="query_intent_student.onnx"):
        build_repository(copy, tmp_path / "repo", "cpu", variant="student")
    with pytest.raises(BuildError, match="unknown variant"):
        build_repository(export_dir, tmp_path / "repo2", "cpu", variant="fp8")


def test_gpu_configs_use_the_native_backends(export_dir):
    configs = generate_configs(spec_for_export(export_dir), "gpu", export_dir)
    qi = configs["query_intent"]
    assert qi.backend == "onnxruntime" and qi.default_model_filename == "model.onnx"
    assert qi.instance_group[0].kind == qi.instance_group[0].KIND_GPU
    accel = qi.optimization.execution_accelerators.gpu_execution_accelerator
    assert [a.name for a in accel] == ["tensorrt"]
    assert configs["preprocess"].backend == "python"
    assert configs[ENSEMBLE].platform == "ensemble"


def test_a_config_that_disagrees_with_the_graph_is_caught(export_dir):
    spec = spec_for_export(export_dir)
    ranker = spec.model("ranker", "gpu")
    wrong = replace(ranker, inputs=(Tensor("query_embedding", "TYPE_FP32", (3,)),) + ranker.inputs[1:],
                    outputs=(Tensor("scores", "TYPE_INT64", (-1,)),))
    cfg = configgen.model_config(wrong, spec, "gpu")
    problems = configgen.check_against_onnx(cfg, configgen.onnx_signature(export_dir / "ranker.onnx"))
    assert any("query_embedding dims" in p for p in problems)
    assert any("scores dtype TYPE_INT64" in p for p in problems)
    bad_spec = replace(spec, models=tuple(wrong if m is ranker else m for m in spec.models))
    with pytest.raises(BuildError, match="inconsistent"):
        generate_configs(bad_spec, "gpu", export_dir)


def test_ensemble_wiring_errors_are_caught(export_dir):
    spec = spec_for_export(export_dir)
    for target, step, tensor in (("gpu", 3, "item_features"), ("cpu", 1, "query_embedding")):
        ens = spec.ensemble_for(target)
        steps = list(ens.steps)
        steps[step] = replace(steps[step], input_map={**steps[step].input_map, tensor: "no_such_tensor"})
        configs = {m.name: configgen.model_config(m, spec, target) for m in spec.models_for(target)}
        configs[ENSEMBLE] = configgen.model_config(replace(ens, steps=tuple(steps)), spec, target)
        assert any("no_such_tensor" in p for p in configgen.check_ensemble(configs, ENSEMBLE)), target


def test_build_versions_are_monotonic_and_kept(export_dir, tmp_path):
    out = tmp_path / "repo"
    first = build_repository(export_dir, out, "cpu")
    second = build_repository(export_dir, out, "cpu")
    assert set(first.versions.values()) == {1} and set(second.versions.values()) == {2}
    for model in CPU_MODELS:
        assert sorted(p.name for p in (out / model).iterdir() if p.is_dir()) == ["1", "2"]
        cfg = read_config(out / model)
        assert cfg.name == model and cfg.version_policy.latest.num_versions == 1
    assert (out / ENSEMBLE / "2" / PLACEHOLDER).is_file()   # survives a trip through S3
    smoke = json.loads((out / ENSEMBLE / "2" / "smoke.json").read_text())
    assert smoke["query"] and smoke["candidate_ids"] and "expected" in smoke
    assert {p.name for p in (out / "query_intent" / "2").iterdir()} == SHARED_CODE | {"model.onnx", "tokenizer.json",
                                                                                       "intents.json"}
    assert {p.name for p in (out / "ranker" / "2").iterdir()} == SHARED_CODE | {"model.onnx", "item_features.npz"}
    assert not (out / "preprocess").exists() and not (out / "postprocess").exists()
    with pytest.raises(BuildError, match="never overwritten"):
        build_repository(export_dir, out, "cpu", version=2)
    assert build_repository(export_dir, out, "cpu", version=7).versions["ranker"] == 7
    assert build_repository(export_dir, out, "cpu").versions["ranker"] == 8


def test_cpu_build_batching_and_limits(export_dir, tmp_path):
    build_repository(export_dir, tmp_path / "on", "cpu")
    build_repository(export_dir, tmp_path / "off", "cpu", dynamic_batching=False)
    on, off = read_config(tmp_path / "on" / "query_intent"), read_config(tmp_path / "off" / "query_intent")
    assert on.HasField("dynamic_batching") and on.dynamic_batching.max_queue_delay_microseconds == 0
    assert not off.HasField("dynamic_batching")
    gpu = generate_configs(spec_for_export(export_dir), "gpu", export_dir)["query_intent"]
    assert list(gpu.dynamic_batching.preferred_batch_size) == [4, 8] and gpu.dynamic_batching.max_queue_delay_microseconds > 0
    assert on.backend == "python" and on.parameters["onnx_file"].string_value == "model.onnx"
    assert on.instance_group[0].kind == on.instance_group[0].KIND_CPU
    rk = read_config(tmp_path / "on" / "ranker")
    assert int(rk.parameters["max_candidates"].string_value) == spec_for_export(export_dir).limits.max_candidates


def test_gpu_build_lays_out_onnx_for_the_onnxruntime_backend(export_dir, tmp_path):
    result = build_repository(export_dir, tmp_path / "gpu", "gpu")
    assert result.target == "gpu"
    assert {p.name for p in (tmp_path / "gpu" / "ranker" / "1").iterdir()} == {"model.onnx"}
    assert read_config(tmp_path / "gpu" / "ranker").backend == "onnxruntime"


def test_signature_comes_from_the_export(export_dir):
    sig = export_signature(export_dir)
    intents = json.loads((export_dir / "intents.json").read_text())
    assert sig.num_intents == len(intents)
    assert sig.embedding_dim > 0 and sig.feature_dim > 0


def test_cli_build(export_dir, tmp_path):
    out = tmp_path / "cli_repo"
    res = CliRunner().invoke(repo_group, ["build", "--target", "gpu", "--export", str(export_dir), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "search_ranking" in res.output and (out / ENSEMBLE / "config.pbtxt").exists()
    res = CliRunner().invoke(repo_group, ["build", "--export", str(export_dir), "--out", str(tmp_path / "limits"),
                                          "--max-candidates", "7", "--max-query-bytes", "12", "--top-k", "3",
                                          "--max-top-k", "5", "--strict-unknown-ids", "--variant", "int8"])
    assert res.exit_code == 0, res.output
    assert "variant int8" in res.output
    params = {m: read_config(tmp_path / "limits" / m).parameters for m in ("query_intent", "ranker")}
    assert params["ranker"]["max_candidates"].string_value == "7"
    assert params["query_intent"]["max_query_bytes"].string_value == "12"
    assert params["ranker"]["top_k_default"].string_value == "3"
    assert params["ranker"]["max_top_k"].string_value == "5"
    assert params["ranker"]["strict_unknown_ids"].string_value == "true"
    res = CliRunner().invoke(repo_group, ["build", "--export", str(tmp_path), "--out", str(out)])
    assert res.exit_code != 0 and "not an export" in res.output


def test_a_tampered_export_is_refused(export_dir, tmp_path):
    copy = tmp_path / "export"
    shutil.copytree(export_dir, copy)
    with open(copy / "intents.json", "a") as f:
        f.write(" ")
    with pytest.raises(BuildError, match="failed verification"):
        build_repository(copy, tmp_path / "repo", "cpu")
    assert not (tmp_path / "repo").exists()


def test_gpu_build_uses_tensorrt_plans_when_the_export_has_them(export_dir, tmp_path):
    copy = tmp_path / "export"
    shutil.copytree(export_dir, copy)
    (copy / "ranker_fp16.plan").write_bytes(b"not a real engine")   # only laid out, never run here
    build_repository(copy, tmp_path / "gpu", "gpu")
    ranker, qi = read_config(tmp_path / "gpu" / "ranker"), read_config(tmp_path / "gpu" / "query_intent")
    assert ranker.platform == "tensorrt_plan" and ranker.default_model_filename == "model.plan"
    assert not ranker.optimization.execution_accelerators.gpu_execution_accelerator
    assert ranker.instance_group[0].kind == ranker.instance_group[0].KIND_GPU
    assert {p.name for p in (tmp_path / "gpu" / "ranker" / "1").iterdir()} == {"model.plan"}
    assert qi.backend == "onnxruntime"                                # no plan for it: ONNX + TensorRT accelerator
