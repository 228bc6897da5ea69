"""ONNX export (TorchScript exporter, opset 17, dynamic axes), onnx.checker, I/O description and
FP32 parity against PyTorch on held-out inputs."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from .models import QueryIntentModel, Ranker
from .ort_session import session

QI_INPUTS = ["input_ids", "attention_mask"]
QI_OUTPUTS = ["intent_logits", "query_embedding"]
RANKER_INPUTS = ["query_embedding", "intent_probs", "item_features"]
RANKER_OUTPUTS = ["scores"]

_DTYPES = {onnx.TensorProto.FLOAT: "FP32", onnx.TensorProto.INT64: "INT64", onnx.TensorProto.FLOAT16: "FP16",
           onnx.TensorProto.INT32: "INT32"}


def _export(model: torch.nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str],
            dynamic: dict[str, dict[int, str]], opset: int) -> None:
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, str(path), input_names=inputs, output_names=outputs,
                          dynamic_axes=dynamic, opset_version=opset, dynamo=False, do_constant_folding=True)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def export_query_intent(model: QueryIntentModel, max_len: int, path: Path, opset: int) -> None:
    ids = torch.ones((2, max_len), dtype=torch.int64)
    mask = torch.ones((2, max_len), dtype=torch.int64)
    dyn = {n: {0: "batch"} for n in QI_INPUTS + QI_OUTPUTS}
    _export(model, (ids, mask), path, QI_INPUTS, QI_OUTPUTS, dyn, opset)


def export_ranker(model: Ranker, emb_dim: int, num_intents: int, feat_dim: int, path: Path, opset: int) -> None:
    args = (torch.zeros(2, emb_dim), torch.full((2, num_intents), 1.0 / num_intents), torch.zeros(2, 5, feat_dim))
    dyn = {"query_embedding": {0: "batch"}, "intent_probs": {0: "batch"},
           "item_features": {0: "batch", 1: "num_candidates"}, "scores": {0: "batch", 1: "num_candidates"}}
    _export(model, args, path, RANKER_INPUTS, RANKER_OUTPUTS, dyn, opset)


def io_spec(path: Path) -> dict:
    """Inputs/outputs as stored in the ONNX file: name, dtype (FP32/INT64...), shape (-1 = dynamic),
    dims (dimension names; numbers for fixed dims)."""
    m = onnx.load(str(path), load_external_data=False)

    def one(v):
        dims = [d.dim_param if d.dim_param else int(d.dim_value) for d in v.type.tensor_type.shape.dim]
        return {"name": v.name, "dtype": _DTYPES.get(v.type.tensor_type.elem_type, str(v.type.tensor_type.elem_type)),
                "shape": [-1 if isinstance(d, str) else d for d in dims], "dims": dims}

    init = {i.name for i in m.graph.initializer}
    return {"inputs": [one(v) for v in m.graph.input if v.name not in init],
            "outputs": [one(v) for v in m.graph.output],
            "opset": max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))}


@torch.no_grad()
def parity_query_intent(model: QueryIntentModel, path: Path, ids: np.ndarray, mask: np.ndarray) -> dict:
    """Max abs diff per output over all rows, fed in batches of varied size (1, 7, 64, 256, ...)."""
    sess = session(path)
    diffs = {n: 0.0 for n in QI_OUTPUTS}
    sizes, i = [1, 7, 64], 0
    while i < len(ids):
        bs = sizes.pop(0) if sizes else 256
        a, b = ids[i:i + bs], mask[i:i + bs]
        ref = [t.numpy() for t in model(torch.from_numpy(a), torch.from_numpy(b))]
        got = sess.run(QI_OUTPUTS, {"input_ids": a, "attention_mask": b})
        for n, r, g in zip(QI_OUTPUTS, ref, got):
            diffs[n] = max(diffs[n], float(np.max(np.abs(r - g))))
        i += bs
    return {"n_inputs": int(len(ids)), "max_abs_diff": diffs, "max": max(diffs.values())}


@torch.no_grad()
def parity_ranker(model: Ranker, path: Path, emb: np.ndarray, probs: np.ndarray, queries: list[dict],
                  features: np.ndarray, batched: int = 64) -> dict:
    """Each held-out query alone (batch 1, its own candidate count), plus batches of `batched`
    queries cut to a common candidate count."""
    sess = session(path)
    worst = 0.0
    for i, q in enumerate(queries):
        x = features[np.asarray(q["candidates"])][None]
        args = (emb[i:i + 1], probs[i:i + 1], x)
        ref = model(*map(torch.from_numpy, args)).numpy()
        got = sess.run(RANKER_OUTPUTS, dict(zip(["query_embedding", "intent_probs", "item_features"], args)))[0]
        worst = max(worst, float(np.max(np.abs(ref - got))))
    for i in range(0, len(queries) - batched + 1, batched):
        qs = queries[i:i + batched]
        n = min(len(q["candidates"]) for q in qs)
        x = np.stack([features[np.asarray(q["candidates"][:n])] for q in qs])
        args = (emb[i:i + batched], probs[i:i + batched], x)
        ref = model(*map(torch.from_numpy, args)).numpy()
        got = sess.run(RANKER_OUTPUTS, dict(zip(["query_embedding", "intent_probs", "item_features"], args)))[0]
        worst = max(worst, float(np.max(np.abs(ref - got))))
    return {"n_inputs": len(queries), "max_abs_diff": {"scores": worst}, "max": worst}


def ort_intent(path: Path, ids: np.ndarray, mask: np.ndarray, bs: int = 256) -> tuple[np.ndarray, np.ndarray]:
    sess = session(path)
    outs = [sess.run(QI_OUTPUTS, {"input_ids": ids[i:i + bs], "attention_mask": mask[i:i + bs]})
            for i in range(0, len(ids), bs)]
    return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])


def ort_ranker_scores(path: Path, emb: np.ndarray, probs: np.ndarray, queries: list[dict],
                      features: np.ndarray, bs: int = 128) -> list[np.ndarray]:
    from .train import pad_candidates  # noqa: PLC0415 - deferred: pulls in torch
    sess = session(path)
    out: list[np.ndarray] = []
    for i in range(0, len(queries), bs):
        qs = queries[i:i + bs]
        x, _ = pad_candidates(qs, features)
        s = sess.run(RANKER_OUTPUTS, {"query_embedding": emb[i:i + bs], "intent_probs": probs[i:i + bs],
                                      "item_features": x})[0]
        out.extend(s[j, : len(q["candidates"])] for j, q in enumerate(qs))
    return out
