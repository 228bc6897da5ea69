"""Section 3: model formats. FP32 vs INT8 vs the distilled student:
  - in onnxruntime alone: `export.bench.run_bench` (the export's own measurement, reused);
  - through Triton: one repository per variant, all Tritons up at once, perf_analyzer against each
    in turn (interleaved, order rotated per round).
The repository builder takes the ONNX files by their fixed names (query_intent.onnx, ranker.onnx),
so a variant is served by building from a derived export: a copy of the export in the scratch dir
with the variant's file under the served name and metadata.json re-recorded (export.artifacts)."""
from __future__ import annotations

import json
import shutil
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from bench.common import (
    Ctx, Missing, Section, fmt_ratio, load_queries, md_table, perf_available, perf_input_data, perf_measure,
    perf_warmup, single_triton,
)

# variant -> {served file name: export file}
VARIANTS = {
    "fp32": {},
    "int8": {"query_intent.onnx": "query_intent_int8.onnx", "ranker.onnx": "ranker_int8.onnx"},
    "student": {"query_intent.onnx": "query_intent_student.onnx"},
}


def derived_export(ctx: Ctx, export: Path, variant: str) -> Path | None:
    swaps = VARIANTS[variant]
    if not swaps:
        return export
    if not all((export / src).exists() for src in swaps.values()):
        return None
    from export.artifacts import write_metadata  # noqa: PLC0415

    out = ctx.work_dir / "variants" / variant
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for f in export.iterdir():
        if f.is_file() and f.name not in ("metadata.json", "checkpoint.pt"):
            shutil.copy2(f, out / f.name)
    for served, src in swaps.items():
        shutil.copy2(export / src, out / served)
    meta = json.loads((export / "metadata.json").read_text())
    meta["derived_for_bench"] = {"from": str(export), "served_as": swaps}
    write_metadata(out, meta)
    return out


def ort_section(ctx: Ctx, export: Path, headline_parts: list[str]) -> list[str]:
    try:
        from export.bench import run_bench  # noqa: PLC0415
    except ImportError as e:
        return [f"onnxruntime-only: not measured, `export/bench.py` is not importable ({e})."]
    rows = run_bench(export, batches=(1, 64), repeats=int(ctx.dur(50, 8)))
    base = {(r["model"], r["batch"]): r for r in rows if r["variant"] == "fp32"}
    table = []
    for r in rows:
        b = base.get((r["model"], r["batch"]))
        table.append([r["model"], r["variant"], r["batch"], r["candidates"], r["latency_ms"], r["throughput_per_s"],
                      fmt_ratio(b["latency_ms"], r["latency_ms"]) if b else "-"])
    hl = [f"{r['variant']} {fmt_ratio(base[(r['model'], r['batch'])]['latency_ms'], r['latency_ms'])}"
          for r in rows if r["model"] == "query_intent" and r["batch"] == 64 and r["variant"] != "fp32"
          and (r["model"], r["batch"]) in base]
    if hl:
        headline_parts.append("onnxruntime alone, query_intent at batch 64, speed vs fp32: " + ", ".join(hl))
    missing = [f for f in ("query_intent_int8.onnx", "query_intent_student.onnx", "ranker_int8.onnx")
               if not (export / f).exists()]
    out = ["onnxruntime alone (`export.bench.run_bench`, median of the runs, one session per file, "
           "default threading):",
           md_table(["model", "variant", "batch", "candidates", "latency ms", "items/s", "speedup vs fp32"], table)]
    if missing:
        out.append(f"Not in this export: {', '.join(missing)}.")
    return out


def quality(export: Path) -> list[str]:
    try:
        meta = json.loads((export / "metadata.json").read_text())
        fp32 = meta["metrics"]["onnx_fp32"]
        v = meta.get("variants", {})
    except (KeyError, ValueError, OSError):
        return []
    qi8, st, rk8 = v.get("query_intent_int8", {}), v.get("query_intent_student", {}), v.get("ranker_int8", {})
    def f3(x):
        return None if x is None else f"{float(x):.3f}"
    rows = [["fp32", f3(fp32.get("intent_acc")), f3(fp32.get("ndcg"))],
            ["int8 query_intent", f3(qi8.get("intent_acc")), None], ["int8 ranker", None, f3(rk8.get("ndcg"))],
            ["student query_intent", f3(st.get("intent_acc")), f3(st.get("ndcg_with_ranker"))]]
    return ["Quality of each variant on the held-out set, as the export recorded it (metadata.json):",
            md_table(["variant", "intent accuracy", "NDCG"], rows)]


def run(ctx: Ctx) -> Section:
    export = ctx.need_export()
    headline_parts: list[str] = []
    body = ort_section(ctx, export, headline_parts)
    body += quality(export)
    triton_note = ""
    try:
        perf_available()
        queries = load_queries(export, 16)
        data = perf_input_data(queries)
        variants = {}
        for v in VARIANTS:
            d = derived_export(ctx, export, v)
            if d is None:
                triton_note += f" {v}: its ONNX file is not in the export, skipped."
                continue
            variants[v] = ctx.repository(v, d)
        conc = (1, 8)
        rounds = int(ctx.dur(3, 1))
        interval = int(ctx.dur(2000, 1000))
        res: dict[tuple[str, int], list[dict]] = {}
        with ExitStack() as stack:
            urls = {}
            for v, repo in variants.items():
                ctx.say(f"formats: starting a Triton for {v}")
                urls[v] = stack.enter_context(single_triton(ctx, f"formats-{v}", repo))[1]
            names = list(urls)
            for v in names:
                perf_warmup(urls[v], data, "grpc")
            for r in range(rounds):
                for c in conc:
                    k = (r + c) % len(names)
                    for v in names[k:] + names[:k]:
                        ctx.say(f"formats: round {r + 1}/{rounds} {v} c={c}")
                        res.setdefault((v, c), []).append(perf_measure(urls[v], c, data, "grpc", interval))
        rows = []
        for c in conc:
            base_t = float(np.median([m["throughput"] for m in res[("fp32", c)]])) if ("fp32", c) in res else None
            for v in names:
                t = float(np.median([m["throughput"] for m in res[(v, c)]]))
                p50 = float(np.median([m["p50_ms"] for m in res[(v, c)]]))
                p99 = float(np.median([m["p99_ms"] for m in res[(v, c)]]))
                rows.append([v, c, t, p50, p99, fmt_ratio(t, base_t)])
        hl = [f"{v} {fmt_ratio(float(np.median([m['throughput'] for m in res[(v, 8)]])), float(np.median([m['throughput'] for m in res[('fp32', 8)]])))}"
              for v in names if v != "fp32" and (v, 8) in res and ("fp32", 8) in res]
        if hl:
            headline_parts.append("through Triton at concurrency 8, throughput vs fp32: " + ", ".join(hl))
        body += [f"Through Triton (the whole `search_ranking` ensemble, gRPC, perf_analyzer, {len(queries)} held-out "
                 f"queries, {interval} ms windows, {rounds} round(s) interleaved, medians):",
                 md_table(["variant", "concurrency", "infer/s", "p50 ms", "p99 ms", "throughput vs fp32"], rows)]
        if triton_note:
            body.append(triton_note.strip())
    except Missing as e:
        body.append(f"Through Triton: not measured ({e}).")
    return Section(
        "formats", "", headline="; ".join(headline_parts) + ("." if headline_parts else ""),
        what="FP32 vs INT8 (dynamic quantization) vs the distilled student query encoder: model latency in "
             "onnxruntime alone, and the end-to-end ensemble through Triton with each variant served.",
        how="onnxruntime: `export.bench.run_bench(export, batches=(1, 64))` (the export engineer's measurement, "
            "reused as is). Triton: for each variant a derived export (copy of the export with the variant's "
            "file served as `query_intent.onnx` / `ranker.onnx`, metadata re-recorded with export.artifacts) -> "
            "`model_repository.build.build_repository(..., 'cpu')`; int8 = query_intent_int8 + ranker_int8, "
            "student = query_intent_student + the FP32 ranker. All variants' Tritons run at once; perf_analyzer "
            "visits them in rotating order per round. Inside Triton each ONNX model runs in a Python-backend "
            "model through onnxruntime with 1 intra-op thread (the CPU target).",
        body=body)
