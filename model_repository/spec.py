"""The one typed spec of the Triton model repository: every model of the `search_ranking`
ensemble, its I/O, batching, instances and version policy, per target (`cpu`, `gpu`), the request
limits, the ranking semantics switch (strict unknown ids) and the model variant each target serves.

`model_repository.configgen` turns a `RepositorySpec` into `ModelConfig` protobufs; nothing else
writes config.pbtxt. `request_limits(spec)` is the one place the request limits are read from
(the repository's models enforce them; a proxy may check them before a request reaches Triton).

One pipeline, two layouts (both from `search_ranking_spec`):
- cpu (the pytriton wheel's Triton: Python backend only): two Python-backend steps that run the
  ONNX graphs through onnxruntime in-process, so a request crosses the Python backend twice:
    query_intent (tokenize -> query_intent graph -> softmax, intent name)
    -> ranker (dedupe -> feature lookup -> ranker graph -> top-k)
- gpu (NGC Triton): the graphs on Triton's onnxruntime backend (TensorRT accelerator) or as
  TensorRT plans, Python only where no graph can do the work:
    preprocess (tokenize) -> query_intent (graph) -> feature_lookup (softmax, intent name, dedupe,
    lookup) -> ranker (graph) -> postprocess (top-k)
The Python code is shared (ensembles/common.py, ensembles/stages.py, export/ranking.py), so both
layouts answer the same.

Batching: every model has max_batch_size > 0 and the ensemble too, so a client sends QUERY [1,1]
and CANDIDATE_IDS [1,N]. Triton's dynamic batcher only puts requests with equal input shapes into
one batch; the cpu Python steps take every request of an execute call as one onnxruntime batch
(candidate rows padded to the longest). On cpu the batcher never waits (queue delay 0: it batches
what queued up while the step was busy); on gpu it waits up to 200 us for preferred sizes.

top_k: an optional ensemble input `TOP_K` (INT32 [1]) and, equivalently, the request parameter
`top_k` (the input wins when both are given); default `top_k_default`, at most `max_top_k`.
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
class Variant:
    """Which ONNX files of the export a target serves for the two graphs."""

    query_intent: str
    ranker: str
    description: str = ""
    # Dynamic INT8 quantization scales activations by each run's min/max, so a row's result
    # depends on what else is in the batch: such a variant runs each query (row) on its own.
    batch_invariant: bool = True

    def file(self, role: str) -> str:
        return {"query_intent": self.query_intent, "ranker": self.ranker}[role]


# The export writes the INT8 and student files only when they pass its gates (export/pipeline.py).
VARIANTS: dict[str, Variant] = {
    "fp32": Variant("query_intent.onnx", "ranker.onnx", "the FP32 teacher encoder and ranker"),
    "int8": Variant("query_intent_int8.onnx", "ranker_int8.onnx", "both graphs INT8 (dynamic quantization)",
                    batch_invariant=False),
    "student": Variant("query_intent_student.onnx", "ranker_student.onnx",
                       "the distilled 1-layer encoder and its own ranker (trained on its embeddings)"),
}


@dataclass(frozen=True)
class Limits:
    """What one request may ask; above a limit it is refused with HTTP 400 / gRPC INVALID_ARGUMENT."""

    max_candidates: int = 1000      # candidate ids per query (before dedupe)
    max_top_k: int = 1000           # TOP_K / top_k
    max_query_bytes: int = 1024     # UTF-8 bytes of one query
    max_batch_size: int = 8         # queries per request (rows of QUERY / CANDIDATE_IDS)


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


# cpu: batch whatever queued up while the step was busy, never wait for more (at low load a wait is
# pure latency; under load the queue fills by itself).
CPU_BATCHING = DynamicBatching(preferred_batch_sizes=(), max_queue_delay_us=0)
GPU_BATCHING = DynamicBatching()


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
    runtimes: dict[str, Runtime]   # per target it is part of (a name may have other I/O on another target)
    max_batch_size: int = 8
    dynamic_batching: DynamicBatching | None = DynamicBatching()
    version_policy_latest: int = 1
    # files of the export copied into the version dir: {export file name: file name in the version dir}
    data_files: dict[str, str] = field(default_factory=dict)
    onnx_role: Literal["query_intent", "ranker"] | None = None   # the graph it runs; the file is the variant's
    plan_export_file: str | None = None   # a TensorRT plan (of the FP32 graph), used by gpu when present
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
    models: tuple[ModelSpec, ...]           # every target's models; `models_for(target)` picks one layout
    top_k_default: int = 10
    limits: Limits = Limits()
    strict_unknown_ids: bool = False        # True: an unknown candidate id fails the request (400)
    dynamic_batching: bool = True
    variants: dict[str, str] = field(default_factory=lambda: {t: "fp32" for t in TARGETS})

    def models_for(self, target: str) -> tuple[ModelSpec, ...]:
        return tuple(m for m in self.models if target in m.runtimes)

    def model(self, name: str, target: str = "cpu") -> ModelSpec:
        for m in self.models_for(target):
            if m.name == name:
                return m
        raise KeyError(f"{name} (target {target})")

    def ensemble_for(self, target: str) -> ModelSpec:
        return self.model(ENSEMBLE, target)

    def variant(self, target: str) -> Variant:
        return VARIANTS[self.variants.get(target, "fp32")]

    def onnx_file(self, model: ModelSpec, target: str) -> str | None:
        """The export's ONNX file a model runs on a target (its role in the target's variant)."""
        return self.variant(target).file(model.onnx_role) if model.onnx_role else None

    def with_dynamic_batching(self, on: bool) -> "RepositorySpec":
        return replace(self, dynamic_batching=on)

    def with_variant(self, variant: str, target: str | None = None) -> "RepositorySpec":
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
        targets = [target] if target else list(TARGETS)
        return replace(self, variants={**self.variants, **{t: variant for t in targets}})


def request_limits(spec: "RepositorySpec | Limits | None" = None) -> dict[str, int]:
    """The request limits as a plain dict (for proxy-side validation and docs):
    {"max_candidates", "max_top_k", "max_query_bytes", "max_batch_size"}; of a spec, of a Limits,
    or the defaults (no argument: what a repository built without limit options enforces)."""
    lim = spec if isinstance(spec, Limits) else (spec.limits if spec is not None else Limits())
    return {"max_candidates": lim.max_candidates, "max_top_k": lim.max_top_k,
            "max_query_bytes": lim.max_query_bytes, "max_batch_size": lim.max_batch_size}


OUTPUTS = (Tensor("TOP_IDS", "TYPE_INT64", (-1,)), Tensor("TOP_SCORES", "TYPE_FP32", (-1,)),
           Tensor("INTENT", "TYPE_STRING", (1,)), Tensor("INTENT_SCORE", "TYPE_FP32", (1,)),
           Tensor("UNKNOWN_COUNT", "TYPE_INT32", (1,)))


def _py(impl: str, kind: str = "KIND_CPU", count: int = 1) -> Runtime:
    return Runtime("python", python_impl=impl, instances=InstanceGroup(kind, count))


def search_ranking_spec(sig: Signature, *, top_k_default: int = 10, limits: Limits | None = None,
                        max_candidates: int | None = None, max_query_bytes: int | None = None,
                        max_top_k: int | None = None, max_batch_size: int | None = None,
                        strict_unknown_ids: bool = False, dynamic_batching: bool = True,
                        variants: dict[str, str] | None = None, cpu_instances: int = 1) -> RepositorySpec:
    lim = limits or Limits()
    lim = replace(lim, **{k: v for k, v in dict(max_candidates=max_candidates, max_query_bytes=max_query_bytes,
                                                 max_top_k=max_top_k, max_batch_size=max_batch_size).items()
                          if v is not None})
    if not 1 <= top_k_default <= lim.max_top_k:
        raise ValueError(f"top_k_default {top_k_default} must be between 1 and max_top_k {lim.max_top_k}")
    for v in (variants or {}).values():
        if v not in VARIANTS:
            raise ValueError(f"unknown variant {v!r}; choose one of {', '.join(VARIANTS)}")
    C, D, F, L = sig.num_intents, sig.embedding_dim, sig.feature_dim, sig.seq_len
    B = lim.max_batch_size
    strict = "true" if strict_unknown_ids else "false"
    QUERY = Tensor("QUERY", "TYPE_STRING", (1,))
    CANDIDATE_IDS = Tensor("CANDIDATE_IDS", "TYPE_INT64", (-1,))
    TOP_K = Tensor("TOP_K", "TYPE_INT32", (1,), optional=True)
    intent_probs = Tensor("intent_probs", "TYPE_FP32", (C,))
    query_embedding = Tensor("query_embedding", "TYPE_FP32", (D,))
    top_ids, top_scores, intent, intent_score, unknown_count = OUTPUTS
    ort = {"intra_op_threads": "1"}

    # ---- cpu: two fused Python-backend steps -------------------------------------------------
    cpu_query = ModelSpec(
        "query_intent", inputs=(QUERY,), outputs=(intent_probs, query_embedding, intent, intent_score),
        runtimes={"cpu": _py("query_intent", count=cpu_instances)},
        max_batch_size=B, dynamic_batching=CPU_BATCHING,
        data_files={"tokenizer.json": "tokenizer.json", "intents.json": "intents.json"},
        onnx_role="query_intent",
        parameters={**ort, "max_query_bytes": str(lim.max_query_bytes)},
    )
    cpu_rank = ModelSpec(
        "ranker", inputs=(CANDIDATE_IDS, query_embedding, intent_probs, TOP_K),
        outputs=(top_ids, top_scores, unknown_count),
        runtimes={"cpu": _py("ranker", count=cpu_instances)},
        max_batch_size=B, dynamic_batching=CPU_BATCHING,
        data_files={"item_features.npz": "item_features.npz"},
        onnx_role="ranker",
        parameters={**ort, "max_candidates": str(lim.max_candidates), "max_top_k": str(lim.max_top_k),
                    "top_k_default": str(top_k_default), "strict_unknown_ids": strict},
    )
    cpu_ensemble = ModelSpec(
        ENSEMBLE, inputs=(QUERY, CANDIDATE_IDS, TOP_K), outputs=OUTPUTS,
        runtimes={"cpu": Runtime("ensemble")}, max_batch_size=B, dynamic_batching=None,
        steps=(
            Step("query_intent", {"QUERY": "QUERY"},
                 {"intent_probs": "intent_probs", "query_embedding": "query_embedding",
                  "INTENT": "INTENT", "INTENT_SCORE": "INTENT_SCORE"}),
            Step("ranker", {"CANDIDATE_IDS": "CANDIDATE_IDS", "query_embedding": "query_embedding",
                            "intent_probs": "intent_probs", "TOP_K": "TOP_K"},
                 {"TOP_IDS": "TOP_IDS", "TOP_SCORES": "TOP_SCORES", "UNKNOWN_COUNT": "UNKNOWN_COUNT"}),
        ),
    )

    # ---- gpu: native graphs, Python around them ------------------------------------------------
    def onnx_gpu() -> dict[str, Runtime]:
        return {"gpu": Runtime("onnxruntime", instances=InstanceGroup("KIND_GPU", 1), tensorrt_accelerator=True)}

    input_ids, attention_mask = Tensor("input_ids", "TYPE_INT64", (L,)), Tensor("attention_mask", "TYPE_INT64", (L,))
    intent_logits = Tensor("intent_logits", "TYPE_FP32", (C,))
    item_features = Tensor("item_features", "TYPE_FP32", (-1, F))
    candidate_ids = Tensor("candidate_ids", "TYPE_INT64", (-1,))
    candidate_count = Tensor("candidate_count", "TYPE_INT32", (1,))
    scores = Tensor("scores", "TYPE_FP32", (-1,))
    gpu_pre = ModelSpec(
        "preprocess", inputs=(QUERY,), outputs=(input_ids, attention_mask),
        runtimes={"gpu": _py("preprocess")}, max_batch_size=B, dynamic_batching=GPU_BATCHING,
        data_files={"tokenizer.json": "tokenizer.json"},
        parameters={"max_query_bytes": str(lim.max_query_bytes)},
    )
    gpu_query = ModelSpec(
        "query_intent", inputs=(input_ids, attention_mask), outputs=(intent_logits, query_embedding),
        runtimes=onnx_gpu(), max_batch_size=B, dynamic_batching=GPU_BATCHING,
        onnx_role="query_intent", plan_export_file="query_intent_fp16.plan",
    )
    gpu_lookup = ModelSpec(
        "feature_lookup", inputs=(CANDIDATE_IDS, intent_logits),
        outputs=(item_features, intent_probs, candidate_ids, candidate_count, unknown_count, intent, intent_score),
        runtimes={"gpu": _py("feature_lookup")}, max_batch_size=B, dynamic_batching=GPU_BATCHING,
        data_files={"item_features.npz": "item_features.npz", "intents.json": "intents.json"},
        parameters={"max_candidates": str(lim.max_candidates), "strict_unknown_ids": strict},
    )
    gpu_rank = ModelSpec(
        "ranker", inputs=(query_embedding, intent_probs, item_features), outputs=(scores,),
        runtimes=onnx_gpu(), max_batch_size=B, dynamic_batching=GPU_BATCHING,
        onnx_role="ranker", plan_export_file="ranker_fp16.plan",
    )
    gpu_post = ModelSpec(
        "postprocess", inputs=(scores, candidate_ids, candidate_count, TOP_K), outputs=(top_ids, top_scores),
        runtimes={"gpu": _py("postprocess")}, max_batch_size=B, dynamic_batching=GPU_BATCHING,
        parameters={"top_k_default": str(top_k_default), "max_top_k": str(lim.max_top_k)},
    )
    gpu_ensemble = ModelSpec(
        ENSEMBLE, inputs=(QUERY, CANDIDATE_IDS, TOP_K), outputs=OUTPUTS,
        runtimes={"gpu": Runtime("ensemble")}, max_batch_size=B, dynamic_batching=None,
        steps=(
            Step("preprocess", {"QUERY": "QUERY"}, {"input_ids": "input_ids", "attention_mask": "attention_mask"}),
            Step("query_intent", {"input_ids": "input_ids", "attention_mask": "attention_mask"},
                 {"intent_logits": "intent_logits", "query_embedding": "query_embedding"}),
            Step("feature_lookup", {"CANDIDATE_IDS": "CANDIDATE_IDS", "intent_logits": "intent_logits"},
                 {"item_features": "item_features", "intent_probs": "intent_probs", "candidate_ids": "candidate_ids",
                  "candidate_count": "candidate_count", "UNKNOWN_COUNT": "UNKNOWN_COUNT", "INTENT": "INTENT",
                  "INTENT_SCORE": "INTENT_SCORE"}),
            Step("ranker", {"query_embedding": "query_embedding", "intent_probs": "intent_probs",
                            "item_features": "item_features"}, {"scores": "scores"}),
            Step("postprocess", {"scores": "scores", "candidate_ids": "candidate_ids",
                                 "candidate_count": "candidate_count", "TOP_K": "TOP_K"},
                 {"TOP_IDS": "TOP_IDS", "TOP_SCORES": "TOP_SCORES"}),
        ),
    )
    return RepositorySpec(
        models=(cpu_query, cpu_rank, cpu_ensemble, gpu_pre, gpu_query, gpu_lookup, gpu_rank, gpu_post, gpu_ensemble),
        top_k_default=top_k_default, limits=lim, strict_unknown_ids=strict_unknown_ids,
        dynamic_batching=dynamic_batching, variants={**{t: "fp32" for t in TARGETS}, **(variants or {})})
