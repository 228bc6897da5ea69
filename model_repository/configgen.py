"""Spec -> Triton `ModelConfig` protobufs -> config.pbtxt (protobuf text_format, no templates),
and the checks on the result: parse it back, and compare model I/O with the ONNX graphs."""
from __future__ import annotations

from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from model_repository.spec import ModelSpec, RepositorySpec, Tensor

ONNX_TO_TRITON = {1: "TYPE_FP32", 6: "TYPE_INT32", 7: "TYPE_INT64", 8: "TYPE_STRING", 10: "TYPE_FP16", 11: "TYPE_FP64"}


class ConfigError(ValueError):
    pass


def _tensor(msg, t: Tensor, *, is_input: bool) -> None:
    msg.name = t.name
    msg.data_type = mc.DataType.Value(t.dtype)
    msg.dims.extend(t.dims)
    if is_input and t.optional:
        msg.optional = True


def model_config(model: ModelSpec, spec: RepositorySpec, target: str) -> mc.ModelConfig:
    rt = model.runtime(target)
    cfg = mc.ModelConfig(name=model.name, max_batch_size=model.max_batch_size)
    cfg.version_policy.latest.num_versions = model.version_policy_latest
    for t in model.inputs:
        _tensor(cfg.input.add(), t, is_input=True)
    for t in model.outputs:
        _tensor(cfg.output.add(), t, is_input=False)

    if rt.kind == "ensemble":
        cfg.platform = "ensemble"
        for step in model.steps:
            s = cfg.ensemble_scheduling.step.add(model_name=step.model, model_version=-1)
            s.input_map.update(step.input_map)
            s.output_map.update(step.output_map)
        return cfg

    if rt.kind == "python":
        cfg.backend = "python"
    elif rt.kind == "onnxruntime":
        cfg.backend = "onnxruntime"
        cfg.default_model_filename = "model.onnx"
        if rt.tensorrt_accelerator:
            acc = cfg.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
            acc.parameters["precision_mode"] = rt.tensorrt_precision
            acc.parameters["max_workspace_size_bytes"] = str(1 << 30)
    elif rt.kind == "tensorrt_plan":
        cfg.platform = "tensorrt_plan"
        cfg.default_model_filename = "model.plan"
    else:  # pragma: no cover - Literal guards it
        raise ConfigError(f"{model.name}: unknown runtime {rt.kind}")

    cfg.instance_group.add(kind=mc.ModelInstanceGroup.Kind.Value(rt.instances.kind), count=rt.instances.count)
    if spec.dynamic_batching and model.dynamic_batching is not None and model.max_batch_size > 0:
        db = cfg.dynamic_batching
        db.SetInParent()   # an empty dynamic_batching {} is "on, never wait"
        db.preferred_batch_size.extend(p for p in model.dynamic_batching.preferred_batch_sizes
                                       if p <= model.max_batch_size)
        db.max_queue_delay_microseconds = model.dynamic_batching.max_queue_delay_us
    if rt.kind == "python":  # read by our model.py files; the native backends get none
        for key, value in model.parameters.items():
            cfg.parameters[key].string_value = value
        if model.onnx_role:
            cfg.parameters["onnx_file"].string_value = "model.onnx"
            cfg.parameters["batch_rows"].string_value = "true" if spec.variant(target).batch_invariant else "false"
    return cfg


def to_pbtxt(cfg: mc.ModelConfig) -> str:
    return text_format.MessageToString(cfg)


def parse_pbtxt(text: str) -> mc.ModelConfig:
    return text_format.Parse(text, mc.ModelConfig())


def write_config(cfg: mc.ModelConfig, model_dir: Path) -> Path:
    """Write config.pbtxt and parse it back: what Triton reads must be what we meant."""
    text = to_pbtxt(cfg)
    if parse_pbtxt(text) != cfg:
        raise ConfigError(f"{cfg.name}: config.pbtxt does not parse back to the same ModelConfig")
    path = Path(model_dir) / "config.pbtxt"
    path.write_text(text)
    return path


# --- checks against the ONNX graphs ------------------------------------------------------------

def onnx_signature(path: Path) -> dict[str, dict[str, tuple[str, tuple]]]:
    """{"inputs"|"outputs": {name: (triton dtype, dims with None for symbolic)}} of an ONNX graph."""
    import onnx  # noqa: PLC0415 - only the builder and its checks need it

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}

    def sig(values):
        out = {}
        for v in values:
            if v.name in initializers:
                continue
            tt = v.type.tensor_type
            dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
            out[v.name] = (ONNX_TO_TRITON.get(tt.elem_type, f"onnx:{tt.elem_type}"), dims)
        return out

    return {"inputs": sig(graph.input), "outputs": sig(graph.output)}


def check_against_onnx(cfg: mc.ModelConfig, signature: dict) -> list[str]:
    """Problems of a model config against the ONNX graph it serves (empty list: consistent).
    With max_batch_size > 0 the graph's first dim is the batch dim and must be dynamic; every
    other dim must match, -1 in the config only where the graph's dim is symbolic."""
    problems = []
    batched = cfg.max_batch_size > 0
    for kind, tensors in (("inputs", cfg.input), ("outputs", cfg.output)):
        graph = signature[kind]
        names = {t.name for t in tensors}
        for missing in sorted(set(graph) - names):
            problems.append(f"{cfg.name}: graph {kind[:-1]} {missing!r} is not in the config")
        for t in tensors:
            if t.name not in graph:
                problems.append(f"{cfg.name}: config {kind[:-1]} {t.name!r} is not in the graph")
                continue
            dtype, gdims = graph[t.name]
            cdtype = mc.DataType.Name(t.data_type)
            if dtype != cdtype:
                problems.append(f"{cfg.name}: {t.name} dtype {cdtype} in the config, {dtype} in the graph")
            if batched:
                if not gdims or gdims[0] is not None:
                    problems.append(f"{cfg.name}: {t.name} has no dynamic batch dim in the graph ({gdims})")
                    continue
                gdims = gdims[1:]
            cdims = tuple(t.dims)
            if len(cdims) != len(gdims):
                problems.append(f"{cfg.name}: {t.name} rank {len(cdims)} in the config, {len(gdims)} in the graph")
                continue
            for c, g in zip(cdims, gdims):
                if (g is None and c != -1) or (g is not None and c != g):
                    problems.append(f"{cfg.name}: {t.name} dims {list(cdims)} in the config, "
                                    f"{[-1 if d is None else d for d in gdims]} in the graph")
                    break
    return problems


def check_ensemble(configs: dict[str, mc.ModelConfig], ensemble_name: str) -> list[str]:
    """Every step's mapped tensors exist with the same dtype and dims on both sides."""
    problems = []
    ens = configs[ensemble_name]
    known = {t.name: t for t in ens.input}
    for step in ens.ensemble_scheduling.step:
        m = configs.get(step.model_name)
        if m is None:
            problems.append(f"step {step.model_name}: no such model")
            continue
        if m.max_batch_size < ens.max_batch_size:
            problems.append(f"step {step.model_name}: max_batch_size {m.max_batch_size} < ensemble's {ens.max_batch_size}")
        m_inputs = {t.name: t for t in m.input}
        for model_in, ens_tensor in step.input_map.items():
            if model_in not in m_inputs:
                problems.append(f"step {step.model_name}: no input {model_in!r}")
            elif ens_tensor not in known:
                problems.append(f"step {step.model_name}: input {model_in!r} from {ens_tensor!r}, produced by no earlier step")
            else:
                a, b = m_inputs[model_in], known[ens_tensor]
                if a.data_type != b.data_type or list(a.dims) != list(b.dims):
                    problems.append(f"step {step.model_name}: {model_in} {mc.DataType.Name(a.data_type)}{list(a.dims)} "
                                    f"but {ens_tensor} is {mc.DataType.Name(b.data_type)}{list(b.dims)}")
        for t in m.input:
            if not t.optional and t.name not in step.input_map:
                problems.append(f"step {step.model_name}: required input {t.name!r} is not mapped")
        m_outputs = {t.name: t for t in m.output}
        for model_out, ens_tensor in step.output_map.items():
            if model_out not in m_outputs:
                problems.append(f"step {step.model_name}: no output {model_out!r}")
            else:
                known[ens_tensor] = m_outputs[model_out]
    for t in ens.output:
        if t.name not in known:
            problems.append(f"ensemble output {t.name!r} is produced by no step")
        elif list(known[t.name].dims) != list(t.dims) or known[t.name].data_type != t.data_type:
            problems.append(f"ensemble output {t.name!r} differs from the step output that produces it")
    return problems
