"""TensorRT FP16 plans, built only where a CUDA GPU and the `tensorrt` package are present.
Elsewhere `unavailable_reason()` says why and the pipeline records the step as skipped.

The plans are parity-checked against onnxruntime FP32 with a looser bound (FP16)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np


def unavailable_reason() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return "the tensorrt Python package is not installed"
    try:
        import torch  # noqa: PLC0415 - deferred: pulls in torch
        if not torch.cuda.is_available():
            return "no CUDA GPU visible to torch"
    except Exception as e:  # noqa: BLE001
        return f"CUDA check failed: {e}"
    return None


def build_fp16_plan(onnx_path: Path, plan_path: Path, shapes: dict[str, tuple[tuple, tuple, tuple]],
                    workspace_mb: int = 1024) -> None:
    """shapes: input name -> (min, opt, max) shapes of the optimization profile."""
    import tensorrt as trt  # noqa: PLC0415 - optional: may be absent here

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH") and int(trt.__version__.split(".")[0]) < 10:
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path.name}: {errs}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for name, (mn, opt, mx) in shapes.items():
        profile.set_shape(name, mn, opt, mx)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build a plan for {onnx_path.name}")
    Path(plan_path).write_bytes(bytes(plan))


def run_plan(plan_path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a plan once on the GPU (buffers are torch CUDA tensors); returns outputs as float32 numpy."""
    import tensorrt as trt  # noqa: PLC0415 - optional: may be absent here
    import torch  # noqa: PLC0415 - deferred: pulls in torch

    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(Path(plan_path).read_bytes())
    ctx = engine.create_execution_context()
    keep, outputs = [], {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            t = torch.from_numpy(np.ascontiguousarray(feeds[name])).cuda()
            want = engine.get_tensor_dtype(name)
            if want == trt.DataType.INT32:
                t = t.to(torch.int32)
            elif want == trt.DataType.HALF:
                t = t.half()
            ctx.set_input_shape(name, tuple(t.shape))
            ctx.set_tensor_address(name, t.data_ptr())
            keep.append(t)
    torch_dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
                    trt.DataType.INT32: torch.int32}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
            shape = tuple(ctx.get_tensor_shape(name))
            t = torch.empty(shape, dtype=torch_dtypes[engine.get_tensor_dtype(name)], device="cuda")
            ctx.set_tensor_address(name, t.data_ptr())
            outputs[name] = t
    stream = torch.cuda.Stream()
    ctx.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    return {k: v.float().cpu().numpy() for k, v in outputs.items()}


def build_and_check(onnx_path: Path, plan_path: Path, shapes: dict, feeds: dict[str, np.ndarray],
                    reference: dict[str, np.ndarray], max_abs_diff: float) -> dict:
    """Build the FP16 plan, compare to the FP32 reference outputs. Returns a step record; the plan
    file is removed again when the check fails."""
    reason = unavailable_reason()
    if reason:
        return {"status": "skipped", "reason": reason}
    try:
        build_fp16_plan(onnx_path, plan_path, shapes)
        got = run_plan(plan_path, feeds)
        diffs = {k: float(np.max(np.abs(got[k] - reference[k]))) for k in reference}
    except Exception as e:  # noqa: BLE001 - a failed optional build is recorded, not fatal
        Path(plan_path).unlink(missing_ok=True)
        return {"status": "failed", "reason": f"{type(e).__name__}: {e}"}
    worst = max(diffs.values())
    if worst > max_abs_diff:
        Path(plan_path).unlink(missing_ok=True)
        return {"status": "rejected", "max_abs_diff": diffs,
                "reason": f"FP16 parity {worst:.3g} > {max_abs_diff:g}"}
    return {"status": "kept", "file": Path(plan_path).name, "max_abs_diff": diffs, "bound": max_abs_diff}
