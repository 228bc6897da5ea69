"""Section 1: what HAProxy costs. perf_analyzer against `search_ranking` through HAProxy and
directly on the Triton behind it, gRPC and HTTP, concurrency 1, 8 and 32, interleaved in the
same run (direct, proxy, proxy, direct, ... so drift of the machine hits both)."""
from __future__ import annotations

import numpy as np

from bench import perf
from bench.common import (
    Ctx,
    Section,
    bench_stack,
    load_queries,
    md_table,
    perf_available,
)

CONCURRENCY = (1, 8, 32)
PROTOCOLS = ("grpc", "http")


def run(ctx: Ctx) -> Section:
    export = ctx.need_export()
    perf_available()
    queries = load_queries(export, 16)
    data = perf.input_data(queries)
    repo = ctx.repository("fp32")
    interval = int(ctx.dur(2000, 1000))
    rounds = int(ctx.dur(3, 1))
    conc = CONCURRENCY if not ctx.quick else (1, 8)
    results: dict[tuple, list[dict]] = {}
    # A single instance behind HAProxy: the proxy's only server is the Triton measured directly.
    with bench_stack(ctx, "routing", repo, instances=(("onprem-1", "onprem", 100, True),)) as s:
        inst, h = s.instances[0], s.haproxy
        urls = {("direct", "grpc"): inst.grpc_url, ("direct", "http"): f"{inst.host}:{inst.http_port}",
                ("haproxy", "grpc"): f"{h.host}:{h.grpc_port}", ("haproxy", "http"): f"{h.host}:{h.http_port}"}
        # warm up both paths (first requests load the Python stubs' caches)
        for proto in PROTOCOLS:
            for via in ("direct", "haproxy"):
                perf.warmup(urls[(via, proto)], data, proto)
        for r in range(rounds):
            for c in conc:
                for proto in PROTOCOLS:
                    order = ("direct", "haproxy") if (r + c) % 2 == 0 else ("haproxy", "direct")
                    for via in order:
                        ctx.say(f"routing: round {r + 1}/{rounds} {proto} c={c} {via}")
                        m = perf.measure(urls[(via, proto)], c, data, proto, interval)
                        results.setdefault((via, proto, c), []).append(m)

    def med(via, proto, c, k):
        return float(np.median([m[k] for m in results[(via, proto, c)]]))

    rows, spread_vals = [], []
    for proto in PROTOCOLS:
        for c in conc:
            d_t, p_t = med("direct", proto, c, "throughput"), med("haproxy", proto, c, "throughput")
            d50, p50 = med("direct", proto, c, "p50_ms"), med("haproxy", proto, c, "p50_ms")
            d99, p99 = med("direct", proto, c, "p99_ms"), med("haproxy", proto, c, "p99_ms")
            per_round = [p["throughput"] / d["throughput"] for d, p in
                         zip(results[("direct", proto, c)], results[("haproxy", proto, c)]) if d["throughput"]]
            spread = f"{min(per_round):.2f}-{max(per_round):.2f}" if per_round else "-"
            if per_round:
                spread_vals.append((max(per_round), min(per_round)))
            rows.append([proto, c, d_t, p_t, f"{p_t / d_t:.3f}" if d_t else "-", spread, d50, p50, p50 - d50,
                         d99, p99, p99 - d99])
    table = md_table(["protocol", "concurrency", "direct infer/s", "via HAProxy infer/s",
                      "throughput ratio (HAProxy / direct)", "ratio per round (min-max)", "direct p50 ms", "HAProxy p50 ms", "added p50 ms",
                      "direct p99 ms", "HAProxy p99 ms", "added p99 ms"], rows)
    n_cand = [len(q["candidate_ids"]) for q in queries]
    ratios = [r[2] and r[3] / r[2] for r in rows]
    added50 = [r[8] for r in rows]
    spreads = [hi - lo for hi, lo in spread_vals] or [0.0]
    med_ratio = float(np.median(ratios))
    headline = (f"Through HAProxy the ensemble keeps {med_ratio:.0%} of the direct throughput (median over protocol x "
                f"concurrency; cells {min(ratios):.0%}-{max(ratios):.0%}, while the per-round ratio of one cell spans up "
                f"to {max(spreads):.2f} on this machine: the noise floor); added p50 latency {min(added50):+.2f} to "
                f"{max(added50):+.2f} ms (gRPC and HTTP, concurrency {', '.join(map(str, conc))}).")
    return Section(
        "routing", "", headline=headline,
        what="Throughput and latency of the `search_ranking` ensemble through HAProxy vs directly on the one "
             "Triton behind it, over gRPC and HTTP at concurrency " + ", ".join(map(str, conc)) +
             ": the throughput ratio and the p50/p99 latency HAProxy adds.",
        how=f"A stack of the benchmark's own (`control.local.stack.up`, free loopback ports) with a single Triton "
            "instance (weight 100), so HAProxy's backend has exactly the server that is measured directly; the "
            "generated HAProxy config as the stack runs it (health checks, retries). perf_analyzer "
            "(`bench/perf.py`, from the tritonclient 2.40.0 wheel) with `--input-data` holding "
            f"{len(queries)} held-out queries of the export ({min(n_cand)}-{max(n_cand)} candidates, TOP_K 10), "
            f"measurement interval {interval} ms, p50/p99 from its CSV. Interleaved: for every (concurrency, "
            f"protocol) the direct and the HAProxy run follow each other, order alternating; {rounds} round(s), "
            "medians over rounds. Client, HAProxy and Triton share this machine's cores.",
        body=[table])
