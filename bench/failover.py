"""Section 4: failover. The drill runner of control/drills (`run_drill`) for onprem-crash
(kill -9 of the on-prem Triton), onprem-hang (SIGSTOP, then SIGCONT) and query-of-death (bad
requests declaring huge shapes, in the middle of the load), N repetitions each, alternating, each
on a fresh drill stack of its own; recovery time and failed requests per run, min / median / max
over the runs; for query-of-death the Tritons crashed and the bad requests refused."""
from __future__ import annotations

from pathlib import Path

from bench.common import Ctx, Missing, Section, md_table, mmm

SCENARIOS = ("onprem-crash", "onprem-hang", "query-of-death")
RECOVERY = ("onprem-crash", "onprem-hang")  # the scenarios with a fault to recover from


def run(ctx: Ctx) -> Section:
    try:
        from control.cli.drill import search_ranking_spec  # noqa: PLC0415
        from control.drills import scenarios  # noqa: PLC0415
        from control.drills.runner import run_drill  # noqa: PLC0415
        from control.local.isolated import isolated_settings as make_settings  # noqa: PLC0415
    except ImportError as e:
        raise Missing(f"the drill runner (control/drills) is not importable ({e})") from None
    missing = [s for s in SCENARIOS if s not in scenarios.SCENARIOS]
    if missing:
        raise Missing(f"control/drills has no scenario {', '.join(missing)}")
    repo = ctx.repository("fp32")
    reps = int(ctx.dur(10, 1))
    duration, rate = ctx.dur(10.0, 8.0), 40.0
    base = make_settings(ctx.work_dir / "failover" / "run", control={"start_daemon": False})
    weights = {i.name: i.weight for i in base.instances}
    runs: dict[str, list[dict]] = {s: [] for s in SCENARIOS}
    for k in range(reps):
        for name in (SCENARIOS if k % 2 == 0 else SCENARIOS[::-1]):
            ctx.say(f"failover: {name} run {k + 1}/{reps}")
            try:
                rep = run_drill(scenarios.get(name), base, Path(repo), duration_s=duration, rate=rate,
                                spec_factory=lambda env: search_ranking_spec(Path(repo)),
                                run_root=ctx.work_dir / "failover" / "drills", write=False)
            except Exception as e:  # noqa: BLE001 - a broken run is reported, the others go on
                rep = {"status": "error", "error": f"{type(e).__name__}: {e}"[:300]}
            runs[name].append(rep)
    rows, per_run = [], []
    for name in RECOVERY:
        reports = runs[name]
        figs = [r.get("figures") or {} for r in reports]
        rec = [f.get("recovery_s") for f in figs]
        det = [f.get("detect_s") for f in figs]
        failed = [(f.get("failures") or {}).get("total") for f in figs]
        sent = [(f.get("requests") or {}).get("sent") for f in figs]
        back = [(f.get("after_lift") or {}).get("serving_s") for f in figs]
        p99 = [(f.get("latency_ms") or {}).get("fault_p99") for f in figs]
        ok_runs = sum(1 for r in reports if r.get("status") in ("passed", "failed"))
        rmin, rmed, rmax = mmm(rec)
        dmin, dmed, dmax = mmm(det)
        fmin, fmed, fmax = mmm(failed)
        rows.append([name, f"{ok_runs}/{len(reports)}", rmin, rmed, rmax, dmin, dmed, dmax,
                     None if fmin is None else int(fmin), fmed, None if fmax is None else int(fmax),
                     int(sum(x for x in failed if x is not None)), int(sum(x for x in sent if x is not None)),
                     mmm(back)[1], mmm(p99)[1]])
        for i, r in enumerate(reports):
            f = r.get("figures") or {}
            per_run.append([name, i + 1, r.get("status"), f.get("detect_s"), f.get("recovery_s"),
                            (f.get("failures") or {}).get("total"), (f.get("requests") or {}).get("sent"),
                            (f.get("after_lift") or {}).get("serving_s"),
                            r.get("error") or ", ".join(f"{k}: {v}" for k, v in
                                                        ((f.get("failures") or {}).get("by_kind") or {}).items())])
    headline = "; ".join(f"{r[0]}: recovery median {r[3]:.2f} s (min {r[2]:.2f}, max {r[4]:.2f}), {r[11]} failed of "
                         f"{r[12]} requests over {r[1]} runs" if r[3] is not None else f"{r[0]}: no recovery measured"
                         for r in rows) + "."
    qod = []
    for i, r in enumerate(runs["query-of-death"]):
        f = r.get("figures") or {}
        q = f.get("query_of_death") or {}
        qod.append([i + 1, r.get("status"), len(f.get("crashed_instances") or []), (f.get("failures") or {}).get("total"),
                    (f.get("requests") or {}).get("sent"), f"{q.get('refused', '-')}/{q.get('sent', '-')}",
                    r.get("error") or q.get("first_refusal") or ""])
    crashed = sum(row[2] for row in qod)
    failed_good = sum(row[3] or 0 for row in qod)
    headline += (f" query-of-death: {crashed} Triton(s) crashed, {failed_good} good request(s) failed over "
                 f"{len(qod)} runs.")
    body = [md_table(["scenario", "runs analysed", "recovery s min", "median", "max", "detect s min", "median",
                      "max", "failed requests min", "median", "max", "failed total", "requests total",
                      "back serving after lift s (median)", "p99 ms during fault (median)"], rows),
            "**query-of-death** (six bad requests per run: HTTP JSON, HTTP binary and gRPC, each declaring one "
            "input with 10^12 elements, sent in the middle of the load; targets: 0 crashed, 0 failed good requests, "
            "every bad request refused at the proxy):\n\n" +
            md_table(["run", "status", "Tritons crashed", "failed good requests", "requests sent",
                      "bad requests refused", "first refusal / error"], qod),
            "<details><summary>Every run</summary>\n\n" +
            md_table(["scenario", "run", "status", "detect s", "recovery s", "failed", "sent",
                      "back after lift s", "errors / note"], per_run) + "\n\n</details>"]
    return Section(
        "failover", "", headline=headline,
        what=f"Recovery time and client-visible failed requests over {reps} repetitions each of onprem-crash "
             "(kill -9 of the on-prem Triton, restarted at the lift) and onprem-hang (SIGSTOP, SIGCONT at the "
             "lift): min, median, max; and query-of-death (Tritons crashed, good requests failed).",
        how=f"`control.drills.runner.run_drill` (the drill engineer's runner, reports not written), each run on a "
            f"fresh drill stack: two Tritons (onprem-1 weight {weights.get('onprem-1')}, cloud-1 weight "
            f"{weights.get('cloud-1')}) serving the `search_ranking` repository, HAProxy with the drill tuning "
            "(health checks every 200 ms, fall 2, connect timeout 300 ms, server timeout 800 ms, one retry with "
            "redispatch on connection failure or timeout, the request guard on), no control daemon. "
            f"Open-loop load {rate:g} req/s for {duration:g} s through "
            "HAProxy (HTTP and gRPC alternating, the ensemble's stored smoke request); fault at 30 %, lift at 60 % "
            "of the run. Recovery = time from the fault until HAProxy has moved the victim out of every backend "
            "and the last failed or slow (> max(300 ms, 4x pre-fault p99)) request has ended (the runner's "
            "analysis). Scenarios alternate order per repetition.",
        body=body)
