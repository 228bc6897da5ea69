"""Section 2: serving against its limits. The same pipeline three ways, loaded by the same Python
closed-loop load generator, interleaved per concurrency:
  - in-process: export.reference.ReferencePipeline (numpy + onnxruntime) called by N threads in
    the load generator's own process (no network, no serialization: the bound for this hardware);
  - Triton: the `search_ranking` ensemble on one Triton, tritonclient.http;
  - Flask: a single-process web service calling the same ReferencePipeline per request
    (bench/flask_service.py, werkzeug threaded), `requests` with JSON.
Plus perf_analyzer (a C++ client, so the client's GIL is out of the picture) against the Triton."""
from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import requests

from bench import perf
from bench.ceiling import ceiling_repository
from bench.common import (
    BREAKDOWN_HEADERS,
    PROJECT_ROOT,
    Ctx,
    Missing,
    Section,
    drive,
    ensemble_steps,
    fmt_ratio,
    load_queries,
    md_table,
    mmm,
    perf_available,
    single_triton,
    stats_breakdown,
    triton_http_caller,
    triton_model_stats,
)
from control.local.procs import free_port

CONCURRENCY = (1, 4, 16)
BREAKDOWN_CONCURRENCY = (1, 16)
TOP_K = 10
# Issue 17's targets: concurrency-1 p50 at most 3x the in-process pipeline's (the median of the
# per-round ratios decides); at the top concurrency perf_analyzer reaches >= 0.6x the in-process bound.
MAX_C1_P50_RATIO = 3.0
MIN_TOP_THROUGHPUT_RATIO = 0.6
# the same ensemble serving graphs that cost nothing (bench/ceiling.py): the serving path's own cost
CEILING_PATH = "Triton, graphs that cost nothing (HTTP)"


def targets(http_c1: float | None, perf_c1: float | None, perf_top: float | None, beats_flask: bool,
            top: int) -> list[list]:
    """Rows [target, figure, met / missed] of issue 17's serving targets from this run's figures
    (median per-round p50 ratios at concurrency 1, perf_analyzer's throughput / the in-process bound
    at the top concurrency, whether Triton beat Flask on p50 and p99 everywhere)."""
    def verdict(ok):
        return "not measured" if ok is None else ("met" if ok else "missed")

    def le(x, bound):
        return None if x is None else x <= bound

    return [[f"concurrency 1: p50 Triton (HTTP, Python client) / in-process <= {MAX_C1_P50_RATIO:g}x",
             fmt_ratio(http_c1, 1.0), verdict(le(http_c1, MAX_C1_P50_RATIO))],
            [f"concurrency 1: p50 Triton (perf_analyzer gRPC) / in-process <= {MAX_C1_P50_RATIO:g}x",
             fmt_ratio(perf_c1, 1.0), verdict(le(perf_c1, MAX_C1_P50_RATIO))],
            [f"concurrency {top}: throughput Triton (perf_analyzer) / in-process >= {MIN_TOP_THROUGHPUT_RATIO:g}x",
             fmt_ratio(perf_top, 1.0), verdict(None if perf_top is None else perf_top >= MIN_TOP_THROUGHPUT_RATIO)],
            ["Triton faster than Flask on p50 and p99 at every concurrency", "yes" if beats_flask else "no",
             verdict(beats_flask)]]


def server_breakdown(ctx: Ctx, http: str, grpc: str, data: dict, concurrency=BREAKDOWN_CONCURRENCY,
                     interval_ms: int = 2000) -> list[str]:
    """Where a request's time goes inside Triton: its per-model statistics before and after one
    perf_analyzer run (gRPC) per concurrency, as markdown blocks."""
    steps = ensemble_steps(http)
    out = []
    for c in concurrency:
        ctx.say(f"serving: per-step breakdown at c={c}")
        before = triton_model_stats(http)
        m = perf.measure(grpc, c, data, "grpc", interval_ms)
        rows = stats_breakdown(before, triton_model_stats(http), steps)
        out += [f"Per step at concurrency {c} (perf_analyzer gRPC: {m['throughput']:.0f} infer/s, client p50 "
                f"{m['p50_ms']:.2f} ms; Triton's statistics, averages per request over the whole run):",
                md_table(BREAKDOWN_HEADERS, rows)]
    return out


def median_run(runs: list[dict]) -> dict:
    """Per-figure medians over the rounds of one path (errors and failures summed)."""
    out = dict(runs[0])
    for key in ("throughput", "p50_ms", "p99_ms"):
        vals = [r[key] for r in runs if r.get(key) is not None]
        out[key] = float(np.median(vals)) if vals else None
    if "failed" in out:
        out["failed"] = sum(r["failed"] for r in runs)
        errors: dict = {}
        for r in runs:
            for k, v in r.get("errors", {}).items():
                errors[k] = errors.get(k, 0) + v
        out["errors"] = errors
    out["rounds"] = len(runs)
    return out


def round_ratios(num: list[dict], den: list[dict], key: str = "p50_ms") -> list[float]:
    """The ratio num/den of one figure per round: the two runs of a round were measured next to
    each other, so a burst of load elsewhere shifts both; rounds missing a figure are skipped."""
    return [a[key] / b[key] for a, b in zip(num, den) if a.get(key) is not None and b.get(key)]


def spread_row(name: str, ratios: list[float]) -> list:
    lo, med, hi = mmm(ratios)
    return [name, len(ratios), fmt_ratio(lo, 1.0), fmt_ratio(med, 1.0), fmt_ratio(hi, 1.0),
            " ".join(f"{r:.2f}" for r in ratios) or "-"]


def inprocess_caller(pipe, queries):
    def make():
        def call(i: int):
            q = queries[i % len(queries)]
            pipe.rank(q["query"], q["candidate_ids"], TOP_K)
        return call
    return make


def flask_caller(url: str, queries):
    def make():
        s = requests.Session()
        bodies = [{"query": q["query"], "candidate_ids": q["candidate_ids"], "top_k": TOP_K} for q in queries]

        def call(i: int):
            r = s.post(f"{url}/rank", json=bodies[i % len(bodies)], timeout=30)
            r.raise_for_status()
            if "top_ids" not in r.json():
                raise RuntimeError("no top_ids in the answer")
        return call
    return make


def start_flask(ctx: Ctx, export) -> tuple[subprocess.Popen, str]:

    port = free_port()
    log = open(ctx.work_dir / "flask.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "bench.flask_service", "--export", str(export), "--port", str(port)],
                            cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the Flask service exited: {(ctx.work_dir / 'flask.log').read_text()[-1500:]}")
        try:
            if requests.get(f"{url}/health", timeout=1).ok:
                return proc, url
        except requests.RequestException:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the Flask service did not answer /health within 60 s")


def run(ctx: Ctx) -> Section:
    export = ctx.need_export()
    try:
        import flask  # noqa: F401, PLC0415

        from export.reference import ReferencePipeline  # noqa: PLC0415
    except ImportError as e:
        raise Missing(f"{e.name} is not importable") from None
    queries = load_queries(export, 16)
    repo = ctx.repository("fp32")
    ceiling_repo = ceiling_repository(repo, ctx.work_dir / "repos" / "serving-ceiling")
    dur = ctx.dur(8.0, 2.0)
    warm = ctx.dur(1.5, 0.5)
    conc = CONCURRENCY
    pipe = ReferencePipeline(export)
    res: dict[tuple[str, int], dict] = {}
    perf_rows = []
    perf_bound: list[dict] = []
    perf_runs: dict[tuple[str, int], list[dict]] = {}
    breakdown: list[str] = []
    flask_proc, flask_url = start_flask(ctx, export)
    try:
        with single_triton(ctx, "serving-triton", repo) as (http, grpc), \
                single_triton(ctx, "serving-ceiling", ceiling_repo) as (ceiling_http, _):
            paths = {"in-process (bound)": inprocess_caller(pipe, queries),
                     "Triton ensemble (HTTP)": triton_http_caller(http, queries, TOP_K),
                     "Flask + onnxruntime (HTTP)": flask_caller(flask_url, queries)}
            names = list(paths)
            # at concurrency 1 only: how much of Triton's latency is the serving path itself
            paths[CEILING_PATH] = triton_http_caller(ceiling_http, queries, TOP_K)
            rounds = int(ctx.dur(5, 1))
            runs: dict[tuple[str, int], list[dict]] = {}
            for r in range(rounds):          # interleaved rounds: a burst of load elsewhere hits every path
                for c in conc:
                    k = CONCURRENCY.index(c) + r
                    these = names + [CEILING_PATH] if c == conc[0] else names
                    for name in these[k % len(these):] + these[:k % len(these)]:   # rotate per concurrency and round
                        ctx.say(f"serving: round {r + 1}/{rounds} {name} c={c} for {dur / rounds:g}s")
                        runs.setdefault((name, c), []).append(
                            drive(paths[name], c, dur / rounds, warmup_s=warm).as_dict())
            res = {key: median_run(v) for key, v in runs.items()}
            try:
                perf_available()
                data = perf.input_data(queries, TOP_K)
                perf_runs: dict[tuple[str, int], list[dict]] = {}
                for proto, url in (("grpc", grpc), ("http", http)):
                    perf.warmup(url, data, proto)
                for r in range(rounds):
                    # the in-process reference of this round's perf_analyzer figures at concurrency 1
                    ctx.say(f"serving: round {r + 1}/{rounds} in-process c={conc[0]} beside perf_analyzer")
                    perf_bound.append(drive(paths[names[0]], conc[0], dur / rounds, warmup_s=warm).as_dict())
                    for proto, url in (("grpc", grpc), ("http", http))[::(1 if r % 2 == 0 else -1)]:
                        for c in conc:
                            ctx.say(f"serving: round {r + 1}/{rounds} perf_analyzer {proto} c={c}")
                            perf_runs.setdefault((proto, c), []).append(
                                perf.measure(url, c, data, proto, int(ctx.dur(1500, 1000))))
                for proto in ("grpc", "http"):
                    for c in conc:
                        m = median_run(perf_runs[(proto, c)])
                        perf_rows.append([proto, c, m["throughput"], m["p50_ms"], m["p99_ms"]])
                breakdown = server_breakdown(ctx, http, grpc, data, interval_ms=int(ctx.dur(2000, 1000)))
            except Missing as e:
                perf_rows = [[f"perf_analyzer missing: {e}", None, None, None, None]]
    finally:
        flask_proc.terminate()
        try:
            flask_proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            flask_proc.kill()

    rows = []
    for c in conc:
        bound = res[("in-process (bound)", c)]
        for name in names + [CEILING_PATH]:
            if (name, c) not in res:
                continue
            r = res[(name, c)]
            rows.append([c, name, r["throughput"], r["p50_ms"], r["p99_ms"], r["failed"],
                         fmt_ratio(r["throughput"], bound["throughput"]),
                         fmt_ratio(r["p99_ms"], bound["p99_ms"])])
    ratio_rows = []
    perf_by = {(r[0], r[1]): r for r in perf_rows if r[1] is not None}
    for c in conc:
        t, f, b = (res[(n, c)] for n in ("Triton ensemble (HTTP)", "Flask + onnxruntime (HTTP)", "in-process (bound)"))
        pa = perf_by.get(("grpc", c))
        ratio_rows.append([c, fmt_ratio(t["throughput"], f["throughput"]), fmt_ratio(t["p50_ms"], f["p50_ms"]),
                           fmt_ratio(t["p99_ms"], f["p99_ms"]),
                           # latency vs the in-process pipeline: only where neither queues (concurrency 1)
                           fmt_ratio(t["p50_ms"], b["p50_ms"]) if c == 1 else "-",
                           fmt_ratio(pa[3], b["p50_ms"]) if pa and c == 1 else "-",
                           fmt_ratio(pa[2], b["throughput"]) if pa else "-"])
    low = conc[0]
    http_ratios = round_ratios(runs[("Triton ensemble (HTTP)", low)], runs[("in-process (bound)", low)])
    perf_ratios = round_ratios(perf_runs.get(("grpc", low), []), perf_bound)
    ceiling_ratios = round_ratios(runs[(CEILING_PATH, low)], runs[("in-process (bound)", low)])
    spread = [spread_row("Triton ensemble (HTTP, Python client) / in-process", http_ratios),
              spread_row("Triton, graphs that cost nothing (HTTP, Python client) / in-process", ceiling_ratios)]
    if perf_ratios:
        spread.append(spread_row("Triton ensemble (perf_analyzer gRPC) / in-process", perf_ratios))
    errors = {f"{n} c={c}": r["errors"] for (n, c), r in res.items() if r["errors"]}
    body = [md_table(["concurrency", "path", "req/s", "p50 ms", "p99 ms", "failed",
                      "throughput vs in-process", "p99 vs in-process"], rows),
            "Triton vs the Flask service and vs the in-process bound (Triton HTTP and Flask: the same Python load "
            "generator; perf_analyzer: gRPC, from the table below):",
            md_table(["concurrency", "throughput Triton / Flask", "p50 Triton / Flask", "p99 Triton / Flask",
                      "p50 Triton (HTTP) / in-process", "p50 Triton (perf_analyzer) / in-process",
                      "throughput Triton (perf_analyzer) / in-process"], ratio_rows),
            f"p50 at concurrency {low}, Triton / in-process, per round (each ratio from two runs measured one after "
            "the other; for perf_analyzer, an in-process run right before that round's perf_analyzer runs):",
            md_table(["ratio", "rounds", "min", "median", "max", "per round"], spread),
            "perf_analyzer (C++ client) against the same Triton, same queries:",
            md_table(["protocol", "concurrency", "infer/s", "p50 ms", "p99 ms"], perf_rows)]
    body += breakdown
    if errors:
        body.append("Errors: " + "; ".join(f"{k}: {v}" for k, v in errors.items()))
    top = conc[-1]
    t, f, b = (res[(n, top)] for n in ("Triton ensemble (HTTP)", "Flask + onnxruntime (HTTP)", "in-process (bound)"))
    t1, b1 = res[("Triton ensemble (HTTP)", low)], res[("in-process (bound)", low)]
    pa1, pa16 = perf_by.get(("grpc", low)), perf_by.get(("grpc", top))
    beats = all(res[("Triton ensemble (HTTP)", c)][k] < res[("Flask + onnxruntime (HTTP)", c)][k]
                for c in conc for k in ("p50_ms", "p99_ms"))
    hlo, hmed, hhi = mmm(http_ratios)
    plo, pmed, phi = mmm(perf_ratios)
    goals = targets(hmed, pmed, pa16[2] / b["throughput"] if pa16 and b["throughput"] else None, beats, top)
    clo, cmed, chi = mmm(ceiling_ratios)
    body[:0] = ["Issue 17's targets, judged on this run (concurrency-1 ratios: the median over the rounds):",
                md_table(["target", "figure", "verdict"], goals),
                f"The serving path's own cost at concurrency {low}: the same ensemble serving graphs that cost nothing "
                f"(`bench/ceiling.py`) answers in {fmt_ratio(cmed, 1.0)} the in-process pipeline's p50 (median of rounds, "
                f"{fmt_ratio(clo, 1.0)}-{fmt_ratio(chi, 1.0)}): client, HTTP, Triton and the two Python-backend hops "
                "before any model runs. The models' own time comes on top of it."]
    headline = (f"Concurrency {low}: Triton p50 {t1['p50_ms']:.2f} ms vs the in-process pipeline's {b1['p50_ms']:.2f} ms; "
                f"per round, Triton / in-process = {fmt_ratio(hmed, 1.0)} median ({fmt_ratio(hlo, 1.0)}-"
                f"{fmt_ratio(hhi, 1.0)} over {len(http_ratios)} rounds)"
                + (f", perf_analyzer {pa1[3]:.2f} ms: {fmt_ratio(pmed, 1.0)} median ({fmt_ratio(plo, 1.0)}-"
                   f"{fmt_ratio(phi, 1.0)})" if pa1 and perf_ratios else "")
                + f". Concurrency {top}: Triton {t['throughput']:.0f} req/s = {fmt_ratio(t['throughput'], f['throughput'])} "
                f"the Flask service and {fmt_ratio(t['throughput'], b['throughput'])} the in-process bound "
                f"({b['throughput']:.0f} req/s)"
                + (f"; with perf_analyzer as the client {pa16[2]:.0f} req/s = {fmt_ratio(pa16[2], b['throughput'])}" if pa16 else "")
                + f". Triton {'beats' if beats else 'does NOT beat'} Flask on p50 and p99 at every concurrency measured. "
                f"Targets: {sum(g[2] == 'met' for g in goals)} of {len(goals)} met"
                + ("" if all(g[2] == "met" for g in goals) else
                   " (missed: " + "; ".join(g[0] for g in goals if g[2] != "met") + ")") + ".")
    return Section(
        "serving", "", headline=headline,
        what="The ensemble on Triton vs the same pipeline in-process (one Python process, numpy + onnxruntime: "
             "the upper bound for this hardware) vs what a user would build instead (a single-process Flask "
             "service calling onnxruntime per request). Throughput and p99 at concurrency "
             + ", ".join(map(str, conc)) + ", ratios to the in-process bound.",
        how=f"One Python closed-loop load generator (`bench.common.drive`: N threads, {warm:g} s warm-up, then "
            f"{dur:g} s counted in {int(ctx.dur(5, 1))} interleaved rounds; medians of the rounds) drives all three paths, "
            "interleaved per concurrency (order rotated per round). perf_analyzer: the same rounds, medians, each round "
            "after its own in-process run at concurrency 1. The concurrency-1 latency ratio is also given per round "
            "(min, median, max): the spread is this machine's noise. In-process: "
            "`export.reference.ReferencePipeline.rank` called by the threads (`export.ort_session`: one "
            "intra-op thread, its fastest and steadiest setting here). "
            "Triton: one Triton (no HAProxy) serving the CPU repository built from the export, tritonclient.http "
            "(binary tensors), one client per thread; at concurrency 1 also a second Triton serving that repository "
            "with graphs that cost nothing (`bench/ceiling.py`). Flask: `bench/flask_service.py` (Flask 3, werkzeug "
            "threaded server, one process) running the same ReferencePipeline, `requests` + JSON. "
            f"{len(queries)} held-out queries rotated, TOP_K {TOP_K}. The client shares the machine's cores with "
            "the server, and its GIL caps what one Python client can send: perf_analyzer figures for Triton are "
            "below for that reason.",
        body=body)
