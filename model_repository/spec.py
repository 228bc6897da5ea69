"""The one typed spec of the Triton model repository: every model of the `search_ranking`
ensemble, its I/O, batching, instances and version policy, per target (`cpu`, `gpu`).

`model_repository.configgen` turns a `RepositorySpec` into `ModelConfig` protobufs; nothing else
writes config.pbtxt.

Batching and ragged candidate counts: every model has max_batch_size > 0 and the ensemble too, so
a client sends QUERY [1,1] and CANDIDATE_IDS [1,N]. Triton's dynamic batcher only puts requests
with equal input shapes into one batch (allow_ragged_batch is off), so requests with different N
are simply not batched together on the GPU target; the Python-backend models take each request's
tensors as they come (they get a list of requests per execute) and the CPU ONNX runner concatenates
only requests of equal shape. Dynamic batching can be switched off as a whole
(`RepositorySpec.dynamic_batching=False`) to compare under perf_analyzer.

top_k: an optional ensemble input `TOP_K` (INT32 [1]) and, equivalently, the request parameter
`top_k` (both reach `postprocess`; the input wins when both are given); default `top_k_default`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

Target = Literal["cpu", "gpu"]
TARGETS: tuple[str, ...] = ("cpu", "gpu")
DType = Literal["TYPE_STRING", "TYPE_INT64", "TYPE_INT32", "TYPE_FP32"]

ENSEMBLE = "search_ranking"
# Ensemble version directories hold no model file; S3 has no empty directories, so the builder
# writes this small file into them (and `smoke.json`, the request the sync engineer's smoke test sends).
PLACEHOLDER = "README"


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: DType
    dims: tuple[int, ...]          # without the batch dimension
    optional: bool = False


@dataclass(frozen=True)
class DynamicBatching:
    preferred_batch_sizes: tuple[int, ...] = (4, 8)
    max_queue_delay_us: int = 200


@dataclass(frozen=True)
class InstanceGroup:
    kind: Literal["KIND_CPU", "KIND_GPU", "KIND_AUTO"] = "KIND_CPU"
    count: int = 1


@dataclass(frozen=True)
class Runtime:
    """How one target runs a model. `python`: a Python-backend model whose model.py comes from
    ensembles/<python_impl>/; `onnxruntime`: Triton's ONNX Runtime backend (optionally with the
    TensorRT accelerator); `tensorrt_plan`: a TensorRT engine; `ensemble`."""

    kind: Literal["python", "onnxruntime", "tensorrt_plan", "ensemble"]
    python_impl: str | None = None
    instances: InstanceGroup = InstanceGroup()
    tensorrt_accelerator: bool = False
    tensorrt_precision: Literal["FP32", "FP16"] = "FP16"


@dataclass(frozen=True)
class Step:
    model: str
    input_map: dict[str, str]      # model input -> ensemble tensor
    output_map: dict[str, str]     # model output -> ensemble tensor


@dataclass(frozen=True)
class ModelSpec:
    name: str
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    runtimes: dict[str, Runtime]   # per target
    max_batch_size: int = 8
    dynamic_batching: DynamicBatching | None = DynamicBatching()
    version_policy_latest: int = 1
    # files of the export copied into the version dir: {export file name: file name in the version dir}
    data_files: dict[str, str] = field(default_factory=dict)
    onnx_export_file: str | None = None   # the ONNX graph this model runs (cpu via onnxruntime, gpu natively)
    plan_export_file: str | None = None   # a TensorRT plan in the export, used by the gpu target when present
    parameters: dict[str, str] = field(default_factory=dict)
    steps: tuple[Step, ...] = ()

    def runtime(self, target: str) -> Runtime:
        return self.runtimes[target]


@dataclass(frozen=True)
class Signature:
    """Sizes the spec takes from the export's ONNX graphs."""

    num_intents: int       # C
    embedding_dim: int     # D
    feature_dim: int       # F
    seq_len: int = -1      # L of input_ids / attention_mask; -1 where the graph leaves it dynamic


@dataclass(frozen=True)
class RepositorySpec:
    models: tuple[ModelSpec, ...]
    top_k_default: int = 10
    max_candidates: int = 1000
    max_query_chars: int = 256
    dynamic_batching: bool = True

    def model(self, name: str) -> ModelSpec:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)

    @property
    def ensemble(self) -> ModelSpec:
        return self.model(ENSEMBLE)

    def with_dynamic_batching(self, on: bool) -> "RepositorySpec":
        return replace(self, dynamic_batching=on)


def _py(impl: str) -> Runtime:
    return Runtime("python", python_impl=impl, instances=InstanceGroup("KIND_CPU", 1))


def search_ranking_spec(sig: Signature, *, top_k_default: int = 10, max_candidates: int = 1000,
                        max_query_chars: int = 256, max_batch_size: int = 8,
                        dynamic_batching: bool = True,
                        batching: DynamicBatching = DynamicBatching()) -> RepositorySpec:
    C, D, F, L = sig.num_intents, sig.embedding_dim, sig.feature_dim, sig.seq_len
    limits = {"max_query_chars": str(max_query_chars), "max_candidates": str(max_candidates),
              "top_k_default": str(top_k_default)}
    onnx_cpu = Runtime("python", python_impl="onnx_runner", instances=InstanceGroup("KIND_CPU", 1))

    def onnx_gpu() -> Runtime:
        return Runtime("onnxruntime", instances=InstanceGroup("KIND_GPU", 1), tensorrt_accelerator=True)

    preprocess = ModelSpec(
        "preprocess",
        inputs=(Tensor("QUERY", "TYPE_STRING", (1,)),),
        outputs=(Tensor("input_ids", "TYPE_INT64", (L,)), Tensor("attention_mask", "TYPE_INT64", (L,))),
        runtimes={"cpu": _py("preprocess"), "gpu": _py("preprocess")},
        max_batch_size=max_batch_size, dynamic_batching=batching,
        data_files={"tokenizer.json": "tokenizer.json"},
        parameters={"max_query_chars": limits["max_query_chars"]},
    )
    query_intent = ModelSpec(
        "query_intent",
        inputs=(Tensor("input_ids", "TYPE_INT64", (L,)), Tensor("attention_mask", "TYPE_INT64", (L,))),
        outputs=(Tensor("intent_logits", "TYPE_FP32", (C,)), Tensor("query_embedding", "TYPE_FP32", (D,))),
        runtimes={"cpu": onnx_cpu, "gpu": onnx_gpu()},
        max_batch_size=max_batch_size, dynamic_batching=batching,
        onnx_export_file="query_intent.onnx", plan_export_file="query_intent_fp16.plan",
        parameters={"intra_op_threads": "1"},
    )
    feature_lookup = ModelSpec(
        "feature_lookup",
        inputs=(Tensor("CANDIDATE_IDS", "TYPE_INT64", (-1,)), Tensor("intent_logits", "TYPE_FP32", (C,))),
        outputs=(Tensor("item_features", "TYPE_FP32", (-1, F)), Tensor("intent_probs", "TYPE_FP32", (C,))),
        runtimes={"cpu": _py("feature_lookup"), "gpu": _py("feature_lookup")},
        max_batch_size=max_batch_size, dynamic_batching=batching,
        data_files={"item_features.npz": "item_features.npz"},
        parameters={"max_candidates": limits["max_candidates"]},
    )
    ranker = ModelSpec(
        "ranker",
        inputs=(Tensor("query_embedding", "TYPE_FP32", (D,)), Tensor("intent_probs", "TYPE_FP32", (C,)),
                Tensor("item_features", "TYPE_FP32", (-1, F))),
        outputs=(Tensor("scores", "TYPE_FP32", (-1,)),),
        runtimes={"cpu": onnx_cpu, "gpu": onnx_gpu()},
        max_batch_size=max_batch_size, dynamic_batching=batching,
        onnx_export_file="ranker.onnx", plan_export_file="ranker_fp16.plan",
        parameters={"intra_op_threads": "1"},
    )
    postprocess = ModelSpec(
        "postprocess",
        inputs=(Tensor("scores", "TYPE_FP32", (-1,)), Tensor("CANDIDATE_IDS", "TYPE_INT64", (-1,)),
                Tensor("intent_probs", "TYPE_FP32", (C,)), Tensor("TOP_K", "TYPE_INT32", (1,), optional=True)),
        outputs=(Tensor("TOP_IDS", "TYPE_INT64", (-1,)), Tensor("TOP_SCORES", "TYPE_FP32", (-1,)),
                 Tensor("INTENT", "TYPE_STRING", (1,)), Tensor("INTENT_SCORE", "TYPE_FP32", (1,))),
        runtimes={"cpu": _py("postprocess"), "gpu": _py("postprocess")},
        max_batch_size=max_batch_size, dynamic_batching=batching,
        data_files={"intents.json": "intents.json"},
        parameters={"top_k_default": limits["top_k_default"]},
    )
    ensemble = ModelSpec(
        ENSEMBLE,
        inputs=(Tensor("QUERY", "TYPE_STRING", (1,)), Tensor("CANDIDATE_IDS", "TYPE_INT64", (-1,)),
                Tensor("TOP_K", "TYPE_INT32", (1,), optional=True)),
        outputs=postprocess.outputs,
        runtimes={"cpu": Runtime("ensemble"), "gpu": Runtime("ensemble")},
        max_batch_size=max_batch_size, dynamic_batching=None,
        steps=(
            Step("preprocess", {"QUERY": "QUERY"},
                 {"input_ids": "input_ids", "attention_mask": "attention_mask"}),
            Step("query_intent", {"input_ids": "input_ids", "attention_mask": "attention_mask"},
                 {"intent_logits": "intent_logits", "query_embedding": "query_embedding"}),
            Step("feature_lookup", {"CANDIDATE_IDS": "CANDIDATE_IDS", "intent_logits": "intent_logits"},
                 {"item_features": "item_features", "intent_probs": "intent_probs"}),
            Step("ranker", {"query_embedding": "query_embedding", "intent_probs": "intent_probs",
                            "item_features": "item_features"},
                 {"scores": "scores"}),
            Step("postprocess", {"scores": "scores", "CANDIDATE_IDS": "CANDIDATE_IDS",
                                 "intent_probs": "intent_probs", "TOP_K": "TOP_K"},
                 {"TOP_IDS": "TOP_IDS", "TOP_SCORES": "TOP_SCORES", "INTENT": "INTENT",
                  "INTENT_SCORE": "INTENT_SCORE"}),
        ),
    )
    return RepositorySpec(models=(preprocess, query_intent, feature_lookup, ranker, postprocess, ensemble),
                          top_k_default=top_k_default, max_candidates=max_candidates,
                          max_query_chars=max_query_chars, dynamic_batching=dynamic_batching)
