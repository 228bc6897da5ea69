"""Drill analysis and the report files: report.json (all figures), report.md (for people),
timeline.png (requests per site, latencies and failures, HAProxy server state and weights).

Definitions (seconds; t = 0 is the start of the load):
  detect_s       fault -> the first HAProxy backend marks the victim server DOWN
  moved_s        fault -> no shared backend can send to the victim any more (DOWN or weight 0):
                 the weights have fully moved to the other site
  last_bad_s     fault -> the end of the last failed or slow request that started before the lift
                 (slow = over `slow_ms`: 4x the pre-fault p90, at least 300 ms)
  recovery_s     max(moved_s, last_bad_s)
  after_lift     lift -> the victim UP again in every shared backend (up_s), and -> its success
                 counter moving again (serving_s)
  restore        (restart scenarios) restart done -> HAProxy weights equal the decided weights
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from control.adapters.haproxy_config import ALL_BACKENDS


def _pct(values, q):
    return round(float(np.percentile(values, q)), 2) if len(values) else None


def _first_event(events, name):
    return next((t for t, n, _ in events if n == name), None)


def _r(x, nd=3):
    return None if x is None else round(float(x), nd)


def site_rates(env, samples) -> dict:
    """Requests/s per instance and per site between consecutive counter samples (None = unreadable)."""
    sites = {i.name: i.site for i in env.settings.instances}
    out = {"t": [], "instances": {n: [] for n in sites}, "sites": {"onprem": [], "cloud": []}}
    prev = None
    for t, counts in samples.counts:
        if prev is not None:
            pt, pc = prev
            dt = max(t - pt, 1e-6)
            out["t"].append(round(t, 3))
            per_site = {"onprem": 0.0, "cloud": 0.0}
            for n, s in sites.items():
                a, b = pc.get(n), counts.get(n)
                # b < a: the Triton restarted and its counter began again at 0
                rate = None if a is None or b is None else ((b - a) if b >= a else b) / dt
                out["instances"][n].append(None if rate is None else round(rate, 2))
                per_site[s] += rate or 0.0
            for s in per_site:
                out["sites"][s].append(round(per_site[s], 2))
        if all(v is not None for v in counts.values()) or prev is None:
            prev = (t, counts)
        else:
            # keep the last readable value per instance, so a gap does not spike the next rate
            merged = dict(prev[1])
            merged.update({k: v for k, v in counts.items() if v is not None})
            prev = (t, merged)
    return out


def _served_between(env, samples, t1, t2) -> dict:
    """Successful requests per site between t1 and t2: the sum of counter increases between
    consecutive readable samples (a counter that went down is a restarted Triton: counted from 0)."""
    sites = {i.name: i.site for i in env.settings.instances}
    out = {"onprem": 0.0, "cloud": 0.0}
    for n, s in sites.items():
        pts = [(t, c.get(n)) for t, c in samples.counts if c.get(n) is not None]
        for (ta, a), (tb, b) in zip(pts, pts[1:]):
            if tb < t1 or ta > t2:
                continue
            out[s] += (b - a) if b >= a else b
    return out


def analyze(meta: dict, env, records, samples, scenario) -> dict:
    ev = env.events
    fault_t, lift_t = _first_event(ev, "fault"), _first_event(ev, "lift")
    end_t = _first_event(ev, "load_end") or (records[-1].t_end if records else 0.0)
    victim = None
    if scenario.target_site in ("onprem", "cloud"):
        victim = env.instance(scenario.target_site).name

    before = [r for r in records if fault_t is not None and r.t_end < fault_t and r.ok]
    base_p99 = _pct([r.latency_ms for r in before], 99)
    # p90, not p99: one noisy second before the fault (a busy host) must not hide the slow answers
    slow_ms = max(300.0, 4 * (_pct([r.latency_ms for r in before], 90) or 0))
    failed = [r for r in records if not r.ok]
    after_fault = [r for r in records if fault_t is not None and r.t_end >= fault_t]
    window_end = lift_t if lift_t is not None else end_t
    bad = [r for r in after_fault if (not r.ok or r.latency_ms > slow_ms) and r.t_start < window_end]
    last_bad_s = (max(r.t_end for r in bad) - fault_t) if bad else None

    # HAProxy server states around the fault
    detect_t = moved_t = up_t = None
    if victim and fault_t is not None:
        keys = [f"{be}/{victim}" for be in ALL_BACKENDS]
        for t, st in samples.haproxy:
            if st is None or t < fault_t:
                continue
            gone = [k in st and (not st[k]["up"] or st[k]["weight"] == 0) for k in keys]
            down = [k in st and not st[k]["up"] for k in keys]
            if detect_t is None and any(down):
                detect_t = t
            if moved_t is None and all(gone):
                moved_t = t
            if lift_t is not None and t >= lift_t and up_t is None and moved_t is not None:
                if all(k in st and st[k]["up"] for k in keys):
                    up_t = t
    serving_t = None
    if victim and up_t is not None:
        pts = [(t, c.get(victim)) for t, c in samples.counts if c.get(victim) is not None]
        serving_t = next((tb for (ta, a), (tb, b) in zip(pts, pts[1:]) if ta >= up_t - 0.3 and b != a), None)

    detect_s = None if detect_t is None else detect_t - fault_t
    moved_s = None if moved_t is None else moved_t - fault_t
    recovery_s = None
    if moved_s is not None:
        recovery_s = max(moved_s, last_bad_s or 0.0)
    elif victim is None or scenario.target_site == "cloud":
        recovery_s = last_bad_s

    # Weights before / during the fault (shared HTTP backend)
    def weights_at(t):
        snap = next((st for ts, st in reversed(samples.haproxy) if ts <= t and st), None)
        if not snap:
            return None
        return {k.split("/", 1)[1]: v["weight"] for k, v in snap.items() if k.startswith(ALL_BACKENDS[0] + "/")}
    weights_before = weights_at(fault_t) if fault_t is not None else None
    cloud_names = [i.name for i in env.settings.site_instances("cloud")]
    cloud_max = None
    if fault_t is not None:
        for t, st in samples.haproxy:
            if st and fault_t <= t <= window_end:
                w = sum(v["weight"] for k, v in st.items() if k.startswith(ALL_BACKENDS[0] + "/")
                        and k.split("/", 1)[1] in cloud_names)
                cloud_max = w if cloud_max is None else max(cloud_max, w)
        for t, d in samples.decided:
            if d and fault_t <= t <= window_end:
                iw = d.get("instance_weights") or {}
                w = sum(v for k, v in iw.items() if k in cloud_names)
                cloud_max = w if cloud_max is None else max(cloud_max, w)
    cloud_before = sum((weights_before or {}).get(n, 0) for n in cloud_names)
    served = _served_between(env, samples, fault_t, window_end) if fault_t is not None else {}
    tot = sum(served.values())
    share = {s: round(v / tot, 3) for s, v in served.items()} if tot else {}
    fault_ok = [r.latency_ms for r in records if r.ok and fault_t is not None and fault_t <= r.t_start < window_end]

    # Restore (restart scenarios): restart done -> observed weights == decided on every shared backend
    restore = {"from_event": None, "restored_s": None, "decided": env.extra.get("decided")}
    start_ev = "haproxy_ready" if _first_event(ev, "haproxy_ready") is not None else (
        "control_ready" if _first_event(ev, "control_ready") is not None else None)
    if start_ev and env.extra.get("decided"):
        t_start = _first_event(ev, start_ev)
        want = env.extra["decided"]
        restore["from_event"] = start_ev
        for t, st in samples.haproxy:
            if st is None or t < t_start:
                continue
            if all(st.get(f"{be}/{n}", {}).get("weight") == w for be in ALL_BACKENDS for n, w in want.items()):
                restore["restored_s"] = _r(max(0.0, t - t_start))
                break
        restart_t = _first_event(ev, "lift") if start_ev == "control_ready" else fault_t
        if restore["restored_s"] is not None and restart_t is not None:
            restore["restored_after_restart_cmd_s"] = _r(t_start + restore["restored_s"] - restart_t)
        if start_ev == "haproxy_ready":
            restore["haproxy_down_s"] = _r(t_start - fault_t)

    # Failures
    kinds: dict[str, int] = {}
    for r in failed:
        k = r.error.split(":", 1)[0]
        kinds[k] = kinds.get(k, 0) + 1
    win_lo = fault_t if fault_t is not None else 0
    win_hi = (_first_event(ev, "haproxy_ready") or win_lo) + 1.0
    outside = [r for r in failed if not (win_lo <= r.t_end <= win_hi or win_lo <= r.t_start <= win_hi)] \
        if start_ev == "haproxy_ready" else failed
    a = {
        "victim": victim,
        "fault_t": _r(fault_t), "lift_t": _r(lift_t), "end_t": _r(end_t),
        "detect_s": _r(detect_s), "moved_s": _r(moved_s), "last_bad_s": _r(last_bad_s), "recovery_s": _r(recovery_s),
        "slow_ms": round(slow_ms, 1),
        "after_lift": {"up_s": _r(None if up_t is None or lift_t is None else up_t - lift_t),
                       "serving_s": _r(None if serving_t is None or lift_t is None else serving_t - lift_t)},
        "requests": {"sent": len(records), "ok": len(records) - len(failed),
                     "by_protocol": {p: sum(1 for r in records if r.proto == p) for p in ("http", "grpc")},
                     "slow_after_fault": sum(1 for r in bad if r.ok)},
        "failures": {"total": len(failed), "by_protocol": {p: sum(1 for r in failed if r.proto == p)
                                                           for p in ("http", "grpc")},
                     "by_kind": kinds, "examples": sorted({r.error for r in failed})[:5],
                     "outside_restart_window": len(outside)},
        "latency_ms": {"before_p50": _pct([r.latency_ms for r in before], 50), "before_p99": base_p99,
                       "fault_p50": _pct(fault_ok, 50), "fault_p99": _pct(fault_ok, 99),
                       "fault_max": _r(max(fault_ok) if fault_ok else None, 1)},
        "weights_before": weights_before,
        "fault_window": {"served": {k: int(v) for k, v in served.items()}, "site_share": share,
                         "cloud_weight_before": cloud_before, "cloud_weight_max": cloud_max,
                         "cloud_weight_raised": cloud_max is not None and cloud_max > cloud_before},
        "restore": restore,
        "served_total": _served_between(env, samples, 0.0, end_t),
    }
    versions: dict[str, dict] = {}
    for r in records:
        if r.ok and r.version:
            d = versions.setdefault(r.version, {"count": 0, "first_t": None, "last_t": None})
            d["count"] += 1
            d["first_t"] = _r(r.t_end if d["first_t"] is None else min(d["first_t"], r.t_end))
            d["last_t"] = _r(r.t_end if d["last_t"] is None else max(d["last_t"], r.t_end))
    a["versions"] = versions
    scenario.figures(a, env)
    targets = scenario.targets(a, env)
    return {**meta, "figures": a, "targets": targets, "passed": all(t["ok"] for t in targets),
            "events": [{"t": round(t, 3), "event": n, **{k: str(v) for k, v in d.items()}} for t, n, d in ev],
            "notes": list(env.notes) + [f"{k}: {v}" for k, v in env.extra.items() if k in ("delay_via", "restorer",
                                                                                         "restart_mode")],
            "haproxy": {k: getattr(env.settings.haproxy, k) for k in ("health_interval_ms", "health_fall",
                                                                        "health_rise", "timeout_connect_ms",
                                                                        "timeout_server_ms", "retries")},
            "series": {"site_rates": site_rates(env, samples),
                       # one row per request: start s, latency ms, protocol, ok, version, error kind
                       "requests": [[round(r.t_start, 3), round(r.latency_ms, 1), r.proto, r.ok, r.version,
                                     r.error.split(":", 1)[0]] for r in records]}}


# Files --------------------------------------------------------------------------------------------

def write_report(report: dict, data, out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (out_dir / "report.md").write_text(markdown(report))
    if data is not None:
        records, samples = data
        timeline_png(report, records, samples, out_dir / "timeline.png")
    return out_dir


def _v(x, unit="s"):
    if x is None:
        return "-"
    return f"{x:.2f} {unit}" if isinstance(x, float) else f"{x} {unit}".strip()


def markdown(r: dict) -> str:
    lines = [f"# Drill `{r['scenario']}`: {r.get('title', '')}", ""]
    if r.get("status") == "skipped":
        return "\n".join(lines + [f"**Skipped**: {r['skip_reason']}", ""])
    f = r["figures"]
    lines += [f"**{'PASS' if r['passed'] else 'FAIL'}** — started {r['started_utc']}, load {r['rate']:g} req/s "
              f"for {r['duration_s']:g} s (HTTP + gRPC through HAProxy)", "",
              "| target | goal | measured | result |", "| --- | --- | --- | --- |"]
    for t in r["targets"]:
        val = t["value"]
        val = f"{val:.3f}" if isinstance(val, float) else str(val)
        lines.append(f"| {t['name']} | {t['goal']} | {val} | {'pass' if t['ok'] else '**FAIL**'} |")
    fl = f["failures"]
    lines += ["", "## Figures", "",
              f"- fault at t={_v(f['fault_t'])}, lifted at t={_v(f['lift_t'])}, victim `{f['victim']}`",
              f"- time to detect ({f.get('detect_what', 'HAProxy marks DOWN')}): {_v(f['detect_s'])}",
              f"- weights fully moved (no backend can send to the victim): {_v(f['moved_s'])}",
              f"- last failed/slow (> {f['slow_ms']:.0f} ms) request ended: {_v(f['last_bad_s'])} after the fault",
              f"- recovery time: {_v(f['recovery_s'])}",
              f"- after the lift: UP again {_v(f['after_lift']['up_s'])}, serving again {_v(f['after_lift']['serving_s'])}",
              f"- requests: {f['requests']['sent']} sent, {f['requests']['ok']} ok, "
              f"{f['requests']['slow_after_fault']} slow after the fault; failed {fl['total']} "
              f"(http {fl['by_protocol']['http']}, grpc {fl['by_protocol']['grpc']}) {fl['by_kind'] or ''}",
              f"- latency ms: before p50 {f['latency_ms']['before_p50']} / p99 {f['latency_ms']['before_p99']}; "
              f"during the fault p50 {f['latency_ms']['fault_p50']} / p99 {f['latency_ms']['fault_p99']} / "
              f"max {f['latency_ms']['fault_max']}",
              f"- served per site during the fault window: {f['fault_window']['served']} "
              f"(share {f['fault_window']['site_share']}); whole run: "
              f"{ {k: int(v) for k, v in f['served_total'].items()} }",
              f"- weights before the fault (HTTP backend): {f['weights_before']}",
              f"- model versions that answered: { {v: d['count'] for v, d in f.get('versions', {}).items()} }"]
    if f["restore"].get("from_event"):
        rs = f["restore"]
        lines.append(f"- weights restored to {rs['decided']}: {_v(rs['restored_s'])} after `{rs['from_event']}` "
                     f"({_v(rs.get('restored_after_restart_cmd_s'))} after the restart command)"
                     + (f"; HAProxy down {_v(rs.get('haproxy_down_s'))}" if rs.get("haproxy_down_s") is not None else ""))
    if f.get("rollout"):
        lines += ["", "## Rollouts", "", "Seconds from the start of the publish (the daemon's rollout job and the agents do "
                  "the rest).", "", "| version | outcome | reason | canary live | analysis done | all live | rolled back "
                  "| canary agent's failure |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for v, ro in f["rollout"].items():
            fails = "; ".join(f"{n}: {e[:120]}" for n, e in ro["agent_failures"].items()) or "-"
            lines.append(f"| v{v} | {ro['phase'] or '-'} | {ro['reason'] or '-'} | {_v(ro['canary_live_s'])} | "
                         f"{_v(ro['analysis_done_s'])} | {_v(ro['all_live_s'])} | {_v(ro['rolled_back_s'])} | "
                         f"{fails} |")
    if fl["examples"]:
        lines += ["", "Failure examples:", ""] + [f"- `{e}`" for e in fl["examples"]]
    lines += ["", "## Events", "", "| t (s) | event | details |", "| --- | --- | --- |"]
    for e in r["events"]:
        det = ", ".join(f"{k}={v}" for k, v in e.items() if k not in ("t", "event"))
        lines.append(f"| {e['t']:.2f} | {e['event']} | {det} |")
    if r.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in r["notes"]]
    lines += ["", f"HAProxy: {r['haproxy']}", "", "![timeline](timeline.png)", ""]
    return "\n".join(lines)


def timeline_png(report: dict, records, samples, path: Path) -> None:
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(11, 8.5), sharex=True)
    sr = report["series"]["site_rates"]
    for site, color in (("onprem", "tab:blue"), ("cloud", "tab:orange")):
        ax1.plot(sr["t"], sr["sites"][site], label=f"{site} served/s", color=color)
    fails = [r.t_end for r in records if not r.ok]
    if fails:
        bins = np.arange(0, max(r.t_end for r in records) + 0.5, 0.5)
        h, edges = np.histogram(fails, bins=bins)
        ax1.bar(edges[:-1], h * 2, width=0.5, align="edge", color="tab:red", alpha=0.6, label="failed/s")
    ax1.set_ylabel("requests/s")
    ax1.legend(loc="upper right", fontsize=8)
    ok = [r for r in records if r.ok]
    ax2.scatter([r.t_start for r in ok], [max(r.latency_ms, 0.1) for r in ok], s=3, label="ok", color="tab:green")
    bad = [r for r in records if not r.ok]
    if bad:
        ax2.scatter([r.t_start for r in bad], [max(r.latency_ms, 0.1) for r in bad], s=12, marker="x",
                    label="failed", color="tab:red")
    ax2.set_yscale("log")
    ax2.set_ylabel("latency ms")
    ax2.legend(loc="upper right", fontsize=8)
    servers = sorted({k for _, st in samples.haproxy if st for k in st if k.split("/")[0] in ALL_BACKENDS})
    for k in servers:
        ts = [t for t, st in samples.haproxy]
        w = [(st[k]["weight"] if st[k]["up"] else 0) if st and k in st else np.nan for _, st in samples.haproxy]
        ax3.step(ts, w, where="post", label=f"{k} (effective weight)")
    ax3.set_ylabel("HAProxy weight (0 = DOWN)")
    ax3.set_xlabel("seconds since the load started")
    ax3.legend(loc="upper right", fontsize=7)
    for e in report["events"]:
        style = {"fault": ("tab:red", "-"), "lift": ("tab:green", "-")}.get(e["event"], ("grey", ":"))
        for ax in (ax1, ax2, ax3):
            ax.axvline(e["t"], color=style[0], linestyle=style[1], linewidth=0.8)
        ax1.annotate(e["event"], (e["t"], 1), xycoords=("data", "axes fraction"), fontsize=7, rotation=90,
                     va="top", ha="right")
    f = report["figures"]
    fig.suptitle(f"drill {report['scenario']}: {'PASS' if report['passed'] else 'FAIL'} — detect {f['detect_s']} s, "
                 f"recovery {f['recovery_s']} s, failed {f['failures']['total']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
