"""Section 3: model formats. FP32 vs INT8 vs the distilled student:
  - in onnxruntime alone: `export.bench.run_bench` (the export's own measurement, reused);
  - through Triton, end to end: one repository per variant (`build_repository(..., variant=V)`: the
    spec serves the variant's ONNX files), all Tritons up at once, perf_analyzer against each in turn
    (interleaved, order rotated per round), and the held-out NDCG@10 of what each one serves;
  - the serving guard: a variant is worth serving when it is >= MIN_SPEEDUP x FP32's end-to-end
    throughput at concurrency 16 and its served NDCG@10 is within MAX_NDCG_DROP of FP32's."""
from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from bench import perf
from bench.ceiling import ceiling_repository
from bench.common import (
    Ctx,
    Missing,
    Section,
    fmt_ratio,
    load_queries,
    md_table,
    mmm,
    perf_available,
    single_triton,
    triton_inputs,
)
from bench.serving import round_ratios, server_breakdown
from model_repository.spec import VARIANTS

VARIANT_NAMES = ("fp32", "int8", "student")
CONCURRENCY = (1, 16)
MIN_SPEEDUP = 1.5          # end-to-end throughput vs fp32 at concurrency 16
MAX_NDCG_DROP = 0.01       # 1 point of held-out NDCG@10
CEILING = "ceiling"        # the FP32 repository with graphs that cost nothing (bench/ceiling.py)


def variant_files(variant: str) -> tuple[str, str]:

    v = VARIANTS[variant]
    return v.query_intent, v.ranker


def guard(speedup: float | None, ndcg_drop: float | None) -> tuple[bool, str]:
    """(kept, reason) of the serving guard for one variant."""
    if speedup is None or ndcg_drop is None:
        return False, "not measured"
    fast, good = speedup >= MIN_SPEEDUP, ndcg_drop <= MAX_NDCG_DROP
    why = (f"{speedup:.2f}x throughput ({'>=' if fast else '<'} {MIN_SPEEDUP}x), NDCG@10 drop "
           f"{ndcg_drop * 100:.2f} points ({'<=' if good else '>'} {MAX_NDCG_DROP * 100:.0f})")
    return fast and good, ("kept: " if fast and good else "rejected: ") + why


def served_ndcg(http: str, export: Path, k: int = 10) -> tuple[float, int]:
    """Mean NDCG@k (gain 2^rel - 1) of the top-k the ensemble returns for every held-out query
    (all its candidates, TOP_K k), over HTTP: (ndcg, queries)."""
    import tritonclient.http as th  # noqa: PLC0415

    held = json.loads((export / "heldout_queries.json").read_text())
    client = th.InferenceServerClient(http, connection_timeout=30, network_timeout=30)
    disc = 1.0 / np.log2(np.arange(2, k + 2))
    vals = []
    for h in held:
        rel = {int(c): r for c, r in zip(h["candidate_ids"], h["relevance"])}
        gains = np.array(sorted((2.0 ** r - 1.0 for r in rel.values()), reverse=True)[:k])
        ideal = float((gains * disc[: len(gains)]).sum())
        if ideal <= 0:
            continue
        top = client.infer("search_ranking", triton_inputs(th, {"query": h["query"],
                                                                 "candidate_ids": list(rel)}, k)).as_numpy("TOP_IDS")
        got = np.array([2.0 ** rel[int(i)] - 1.0 for i in top.reshape(-1)[:k]])
        vals.append(float((got * disc[: len(got)]).sum()) / ideal)
    return float(np.mean(vals)), len(vals)


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
    missing = [f for f in ("query_intent_int8.onnx", "query_intent_student.onnx", "ranker_int8.onnx",
                           "ranker_student.onnx")
               if not (export / f).exists()]
    out = ["onnxruntime alone (`export.bench.run_bench`, median of the runs, one session per file, "
           "`export.ort_session`'s threading: one intra-op thread):",
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
            ["student query_intent + FP32 ranker", f3(st.get("intent_acc")), f3(st.get("ndcg_with_ranker"))],
            ["student query_intent + student ranker (served)", f3(st.get("intent_acc")),
             f3(st.get("ndcg_with_student_ranker"))]]
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
        data = perf.input_data(queries)
        variants = {}
        for v in VARIANT_NAMES:
            missing = [f for f in variant_files(v) if not (export / f).exists()]
            if missing:
                triton_note += f" {v}: {', '.join(missing)} not in the export (its gate rejected it), skipped."
                continue
            variants[v] = ctx.repository(v, export, variant=v)
        if "fp32" in variants:
            variants[CEILING] = ceiling_repository(variants["fp32"], ctx.work_dir / "repos" / CEILING)
        conc = CONCURRENCY
        rounds = int(ctx.dur(5, 1))
        interval = int(ctx.dur(2000, 1000))
        res: dict[tuple[str, int], list[dict]] = {}
        ndcg: dict[str, tuple[float, int]] = {}
        breakdowns: list[str] = []
        with ExitStack() as stack:
            urls, https = {}, {}
            for v, repo in variants.items():
                ctx.say(f"formats: starting a Triton for {v}")
                https[v], urls[v] = stack.enter_context(single_triton(ctx, f"formats-{v}", repo))
            names = list(urls)
            for v in names:
                if v != CEILING:   # its answers mean nothing: every score is 0
                    ctx.say(f"formats: held-out NDCG@10 served by {v}")
                    ndcg[v] = served_ndcg(https[v], export)
                perf.warmup(urls[v], data, "grpc")
            for r in range(rounds):
                for c in conc:
                    k = (r + c) % len(names)
                    for v in names[k:] + names[:k]:
                        ctx.say(f"formats: round {r + 1}/{rounds} {v} c={c}")
                        res.setdefault((v, c), []).append(perf.measure(urls[v], c, data, "grpc", interval))
            # where each variant's time goes at the top concurrency: which step a variant makes cheaper
            for v in names:
                blocks = server_breakdown(ctx, https[v], urls[v], data, concurrency=(conc[-1],), interval_ms=interval)
                breakdowns += [f"**{v}**: " + blocks[0], blocks[1]]

        def med(v, c, key):
            return float(np.median([m[key] for m in res[(v, c)]])) if (v, c) in res else None

        rows = []
        for c in conc:
            for v in names:
                t = med(v, c, "throughput")
                rows.append([v, c, t, med(v, c, "p50_ms"), med(v, c, "p99_ms"), fmt_ratio(t, med("fp32", c, "throughput"))])
        top = conc[-1]
        guard_rows, hl = [], []
        base_ndcg = ndcg.get("fp32", (None, 0))[0]
        ceiling = mmm(round_ratios(res.get((CEILING, top), []), res.get(("fp32", top), []), "throughput"))
        for v in (n for n in names if n != CEILING):
            # the variant's throughput over fp32's of the same round (measured one after the other),
            # median over the rounds: a burst of load elsewhere shifts both figures of a round
            per_round = [] if v == "fp32" else round_ratios(res.get((v, top), []), res.get(("fp32", top), []),
                                                            "throughput")
            lo, speed, hi = mmm(per_round)
            drop = None if base_ndcg is None else base_ndcg - ndcg[v][0]
            kept, why = (True, "the baseline") if v == "fp32" else guard(speed, drop)
            guard_rows.append([v, f"{ndcg[v][0]:.4f}", ndcg[v][1], "-" if v == "fp32" else f"{-drop * 100:+.2f}",
                               "1.00x" if v == "fp32" else fmt_ratio(speed, 1.0),
                               "-" if v == "fp32" else f"{fmt_ratio(lo, 1.0)}-{fmt_ratio(hi, 1.0)}",
                               "kept" if kept else "rejected", why])
            if v != "fp32":
                hl.append(f"{v} {fmt_ratio(speed, 1.0)} ({'kept' if kept else 'rejected'})")
        if ceiling[1] is not None:
            hl.append(f"ceiling (graphs that cost nothing) {fmt_ratio(ceiling[1], 1.0)}")
        if hl:
            headline_parts.append(f"end to end through Triton at concurrency {top}, throughput vs fp32: " + ", ".join(hl))
        body += [f"Through Triton (the whole `search_ranking` ensemble, gRPC, perf_analyzer, {len(queries)} held-out "
                 f"queries, {interval} ms windows, {rounds} round(s) interleaved, medians):",
                 md_table(["variant", "concurrency", "infer/s", "p50 ms", "p99 ms", "throughput vs fp32"], rows),
                 f"The serving guard (>= {MIN_SPEEDUP}x fp32's end-to-end throughput at concurrency {top}: the median "
                 "over the rounds of the variant's throughput / fp32's in the same round; held-out "
                 f"NDCG@10 of the served answers within {MAX_NDCG_DROP * 100:.0f} point of fp32's; NDCG@10 over every "
                 "held-out query, all its candidates, TOP_K 10, through each variant's Triton over HTTP):",
                 md_table(["variant", "served NDCG@10", "queries", "NDCG@10 vs fp32 (points)",
                           f"throughput vs fp32 at c={top} (median of rounds)", "per round (min-max)", "decision",
                           "why"], guard_rows)]
        if ceiling[1] is not None:
            reach = "can" if ceiling[1] >= MIN_SPEEDUP else "cannot"
            body.append(f"The ceiling of any variant on this serving path: the FP32 repository with null graphs "
                        f"(`bench/ceiling.py`: the same inputs and outputs, zeros out, next to no compute) reaches "
                        f"{fmt_ratio(ceiling[1], 1.0)} fp32's throughput at concurrency {top} (median of rounds; per "
                        f"round {fmt_ratio(ceiling[0], 1.0)}-{fmt_ratio(ceiling[2], 1.0)}). A variant's end-to-end "
                        f"gain stays below it, so here a variant {reach} reach the guard's {MIN_SPEEDUP}x: the rest "
                        "of each request's cost is the serving path itself (client, Triton, the Python steps).")
        body += breakdowns
        if triton_note:
            body.append(triton_note.strip())
    except Missing as e:
        body.append(f"Through Triton: not measured ({e}).")
    return Section(
        "formats", "", headline="; ".join(headline_parts) + ("." if headline_parts else ""),
        what="FP32 vs INT8 (dynamic quantization) vs the distilled student query encoder: model latency in "
             "onnxruntime alone, the end-to-end ensemble through Triton with each variant served, and whether "
             "each variant passes the serving guard.",
        how="onnxruntime: `export.bench.run_bench(export, batches=(1, 64))` (the export engineer's measurement, "
            "reused as is). Triton: `model_repository.build.build_repository(export, out, 'cpu', variant=V)` per "
            "variant (the spec's `variants`: int8 = query_intent_int8 + ranker_int8, student = "
            "query_intent_student + ranker_student, the ranker trained on the student's embeddings; `triton-hybrid repo build --variant V`). All variants' "
            "Tritons run at once; perf_analyzer visits them in rotating order per round. On the CPU target each "
            "step runs its graph through onnxruntime (1 intra-op thread) inside a Python-backend model; the int8 "
            "graphs (dynamic quantization: results depend on what shares a batch) run one query per "
            "onnxruntime call, the others one call per execute. The ceiling row serves graphs that cost "
            "nothing (`bench/ceiling.py`) in the FP32 repository: the most any variant can gain here.",
        body=body)
