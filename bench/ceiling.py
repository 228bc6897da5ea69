"""The ceiling of any cheaper model variant on the serving path: ONNX graphs with the FP32 graphs'
exact inputs and outputs (names, types, shapes) whose outputs are zeros made from the inputs'
shapes, so they cost next to nothing. Served in the FP32 repository's place, their end-to-end
throughput over FP32's is the most that any student or quantized model could gain through the same
steps: what is left is the serving path's own cost (client, Triton, the Python steps)."""
from __future__ import annotations

import shutil
from pathlib import Path

import onnx
from onnx import TensorProto, helper

# Python-backend model dir of the CPU target -> the graph each step serves (model.onnx)
STEP_GRAPHS = ("query_intent", "ranker")


def null_graph(src: Path | str, dst: Path | str) -> Path:
    """Write a graph with src's signature whose every output is zeros of the declared shape: fixed
    dims as constants, named (dynamic) dims taken at run time from the input that declares them."""
    model = onnx.load(str(src), load_external_data=False)
    g = model.graph
    where = {}   # dim name -> (input name, axis)
    for x in g.input:
        for axis, d in enumerate(x.type.tensor_type.shape.dim):
            if d.dim_param and d.dim_param not in where:
                where[d.dim_param] = (x.name, axis)
    nodes = []
    for out in g.output:
        parts = []
        for axis, d in enumerate(out.type.tensor_type.shape.dim):
            name = f"{out.name}_dim{axis}"
            if d.dim_param:
                if d.dim_param not in where:
                    raise ValueError(f"{src}: output {out.name} dim {d.dim_param!r} is on no input")
                inp, in_axis = where[d.dim_param]
                nodes.append(helper.make_node("Shape", [inp], [name], start=in_axis, end=in_axis + 1))
            else:
                nodes.append(helper.make_node("Constant", [], [name], value=helper.make_tensor(
                    name, TensorProto.INT64, [1], [d.dim_value])))
            parts.append(name)
        nodes.append(helper.make_node("Concat", parts, [f"{out.name}_shape"], axis=0))
        nodes.append(helper.make_node("ConstantOfShape", [f"{out.name}_shape"], [out.name], value=helper.make_tensor(
            "zero", out.type.tensor_type.elem_type, [1], [0])))
    graph = helper.make_graph(nodes, f"{g.name}_null", list(g.input), list(g.output))
    null = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    onnx.checker.check_model(null)
    onnx.save(null, str(dst))
    return Path(dst)


def ceiling_repository(fp32_repo: Path, out: Path) -> Path:
    """A copy of a built CPU repository whose steps serve null graphs instead of the FP32 ones."""
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(fp32_repo, out, ignore=shutil.ignore_patterns("__pycache__"))
    for step in STEP_GRAPHS:
        graphs = list((out / step).glob("*/model.onnx"))
        if not graphs:
            raise FileNotFoundError(f"{out / step}: no <version>/model.onnx to replace")
        for graph in graphs:
            null_graph(graph, graph)
    return out
