"""A chart of the traffic split over time, for people who would rather look than read:
`triton-hybrid report --since 1h --out report.png`.

Three panels sharing one UTC time axis:
  1. site weights (onprem / cloud, the policy's decision, 0..100) as steps; failover periods
     shaded red, override periods shaded grey, and every weight change marked with its reason;
  2. traffic per site (requests/s), stacked;
  3. mean queue time per instance (ms), the signal the policy scales out on.

Two sources, same picture:
  - the decision audit (`control_decisions` in the control database, control/traffic/audit.py): every
    policy tick has the site weights it decided and, per instance, the request rate and queue time
    it saw; instance -> site comes from the registry;
  - Prometheus range queries (`--prometheus URL`): `triton_hybrid_site_weight`, Triton's
    `nv_inference_request_success` rate per site, `triton_hybrid_instance_queue_ms`,
    `triton_hybrid_failover_active` and `triton_hybrid_override_active`.
"""
from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import requests

SITE_COLORS = {"onprem": "#1f77b4", "cloud": "#ff7f0e"}
QUIET_REASONS = {"steady", "hold_sustain", "hold_cooldown", "unknown_metrics", "failback_wait", "override",
                 "resume_wait"}

Points = list[tuple[float, float]]


class ReportError(RuntimeError):
    """No data to chart, or the source could not be read; the message says which and why."""


@dataclass
class ReportData:
    source: str
    start: float
    end: float
    weights: dict[str, Points] = field(default_factory=dict)       # site -> (t, weight)
    traffic: dict[str, Points] = field(default_factory=dict)       # site -> (t, req/s)
    queue: dict[str, Points] = field(default_factory=dict)         # instance -> (t, ms)
    failover: dict[str, Points] = field(default_factory=dict)      # site -> (t, 0/1)
    override: Points = field(default_factory=list)                 # (t, 0/1)
    changes: list[tuple[float, str, str]] = field(default_factory=list)  # (t, reason, "onprem/cloud")
    reasons: dict[str, int] = field(default_factory=dict)          # reason -> decisions

    @property
    def empty(self) -> bool:
        return not any(self.weights.values()) and not any(self.traffic.values())


# ---- source 1: the decision audit --------------------------------------------------------------

def from_audit(db_path: str | Path, since_s: float, sites_of: dict[str, str], now: float | None = None) -> ReportData:
    """Read the decisions of the last `since_s` seconds (read-only; the daemon may be writing)."""
    now = time.time() if now is None else now
    db_path = Path(db_path)
    if not db_path.exists():
        raise ReportError(f"no control database at {db_path}: has the control plane run? "
                          "(or chart from Prometheus with --prometheus URL)")
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    conn.row_factory = sqlite3.Row
    try:
        rows = conn.execute("SELECT ts, reason, message, old_weights, new_weights, changed, inputs, state "
                            "FROM control_decisions WHERE ts >= ? AND ts <= ? ORDER BY ts, id",
                            (now - since_s, now)).fetchall()
    except sqlite3.OperationalError as e:
        raise ReportError(f"{db_path} has no decision audit table yet ({e})") from None
    finally:
        conn.close()
    data = ReportData(source=f"decision audit {db_path}", start=now - since_s, end=now)
    for r in rows:
        ts = float(r["ts"])
        new = json.loads(r["new_weights"])
        old = json.loads(r["old_weights"])
        inputs = json.loads(r["inputs"] or "{}")
        state = json.loads(r["state"] or "{}")
        reason = r["reason"]
        data.reasons[reason] = data.reasons.get(reason, 0) + 1
        for site, w in new.items():
            data.weights.setdefault(site, []).append((ts, float(w)))
        per_site: dict[str, float] = {}
        for name, inst in (inputs.get("instances") or {}).items():
            site = sites_of.get(name)
            if inst.get("rps") is not None and site:
                per_site[site] = per_site.get(site, 0.0) + float(inst["rps"])
            # A gap (instance down / not polled) stays a gap in the line, not an interpolation.
            q = inst.get("queue_ms")
            data.queue.setdefault(name, []).append((ts, float("nan") if q is None else float(q)))
        for site in set(sites_of.values()):
            data.traffic.setdefault(site, []).append((ts, per_site.get(site, 0.0)))
        failed = state.get("failover_site")
        for site in set(sites_of.values()) | set(new):
            data.failover.setdefault(site, []).append((ts, 1.0 if failed == site else 0.0))
        data.override.append((ts, 1.0 if reason == "override" else 0.0))
        if new != old:
            data.changes.append((ts, reason, f"{new.get('onprem', '?')}/{new.get('cloud', '?')}"))
    return data


# ---- source 2: Prometheus ----------------------------------------------------------------------

PROM_QUERIES = {
    "weights": ("max by (site) (triton_hybrid_site_weight)", "site"),
    "traffic": ('sum by (site) (rate(nv_inference_request_success{job="triton"}[1m]))', "site"),
    "queue": ("max by (instance) (triton_hybrid_instance_queue_ms)", "instance"),
    "failover": ("max by (site) (triton_hybrid_failover_active)", "site"),
    "override": ("max(triton_hybrid_override_active)", None),
}


def query_range(url: str, expr: str, start: float, end: float, step: float) -> list[dict]:
    try:
        r = requests.get(f"{url.rstrip('/')}/api/v1/query_range",
                         params={"query": expr, "start": start, "end": end, "step": step}, timeout=30)
        body = r.json()
    except (requests.RequestException, ValueError) as e:
        raise ReportError(f"Prometheus at {url} did not answer: {e}") from None
    if body.get("status") != "success":
        raise ReportError(f"Prometheus rejected {expr!r}: {body.get('error')}")
    return body["data"]["result"]


def from_prometheus(url: str, since_s: float, now: float | None = None, points: int = 300) -> ReportData:
    now = time.time() if now is None else now
    start = now - since_s
    step = max(1.0, round(since_s / points, 1))
    data = ReportData(source=f"Prometheus {url}", start=start, end=now)
    for key, (expr, label) in PROM_QUERIES.items():
        for series in query_range(url, expr, start, now, step):
            pts = [(float(t), float(v)) for t, v in series["values"] if v not in ("NaN", "+Inf", "-Inf")]
            if key == "override":
                data.override = pts
            else:
                getattr(data, key)[series["metric"].get(label, "?")] = pts
    # Weight changes: where a site weight differs from the sample before it.
    onprem = data.weights.get("onprem", [])
    for (t0, v0), (t1, v1) in zip(onprem, onprem[1:]):
        if v1 != v0:
            cloud = dict(data.weights.get("cloud", [])).get(t1, 100 - v1)
            data.changes.append((t1, "", f"{v1:g}/{cloud:g}"))
    return data


# ---- the chart ---------------------------------------------------------------------------------

def _spans(points: Points, end: float) -> list[tuple[float, float]]:
    """Intervals where a 0/1 series is 1."""
    out, start = [], None
    for t, v in points:
        if v >= 0.5 and start is None:
            start = t
        elif v < 0.5 and start is not None:
            out.append((start, t))
            start = None
    if start is not None:
        out.append((start, end))
    return out


def render(data: ReportData, out: str | Path, title: str = "triton-hybrid: traffic split") -> dict:
    """Write the PNG; return a summary of what it shows."""
    if data.empty:
        raise ReportError(f"no decisions or samples between {_utc(data.start)} and {_utc(data.end)} in {data.source}")
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.dates as mdates  # noqa: PLC0415
    import matplotlib.pyplot as plt  # noqa: PLC0415

    def dt(ts):
        return datetime.fromtimestamp(ts, tz=timezone.utc)

    fig, (ax_w, ax_t, ax_q) = plt.subplots(3, 1, figsize=(12, 9), sharex=True,
                                           gridspec_kw={"height_ratios": [3, 2, 2]})
    end = data.end
    # 1. weights
    for site in sorted(data.weights):
        pts = data.weights[site]
        if pts:
            ax_w.step([dt(t) for t, _ in pts], [v for _, v in pts], where="post", lw=2,
                      color=SITE_COLORS.get(site), label=f"{site} weight")
    failover_spans = {site: _spans(pts, end) for site, pts in data.failover.items()}
    labelled = False
    for site, spans in failover_spans.items():
        for a, b in spans:
            ax_w.axvspan(dt(a), dt(b), color="red", alpha=0.12,
                         label=None if labelled else "failover (away from a site)")
            labelled = True
    override_spans = _spans(data.override, end)
    for n, (a, b) in enumerate(override_spans):
        ax_w.axvspan(dt(a), dt(b), color="grey", alpha=0.2, label=None if n else "manual override")
    shown = 0
    for t, reason, text in data.changes[:40]:
        ax_w.axvline(dt(t), color="black", lw=0.5, alpha=0.4)
        if reason and reason not in QUIET_REASONS:
            # Stagger the labels over five heights so that changes close in time stay readable.
            ax_w.annotate(f"{reason} → {text}", (dt(t), 103 + 6 * (shown % 5)), fontsize=7, ha="left", va="bottom",
                          bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.7})
            shown += 1
    ax_w.set_ylim(-5, 136)
    ax_w.set_ylabel("site weight (0..100)")
    ax_w.legend(loc="center right", fontsize=8)
    ax_w.grid(alpha=0.3)
    # 2. traffic per site, stacked
    sites = sorted((s for s in data.traffic if data.traffic[s]), key=lambda s: (s != "onprem", s))
    if sites:
        times = sorted({t for s in sites for t, _ in data.traffic[s]})
        stacks = [[dict(data.traffic[s]).get(t, 0.0) for t in times] for s in sites]
        ax_t.stackplot([dt(t) for t in times], stacks, labels=[f"{s} req/s" for s in sites],
                       colors=[SITE_COLORS.get(s, None) for s in sites], alpha=0.7, step="post")
        ax_t.legend(loc="upper left", fontsize=8)
    ax_t.set_ylabel("requests/s")
    ax_t.grid(alpha=0.3)
    # 3. queue time per instance
    for name in sorted(data.queue):
        pts = data.queue[name]
        if pts:
            ax_q.plot([dt(t) for t, _ in pts], [v for _, v in pts], lw=1.2, label=f"{name} queue")
    if data.queue:
        ax_q.legend(loc="upper left", fontsize=8)
    ax_q.set_ylabel("mean queue time (ms)")
    ax_q.grid(alpha=0.3)
    ax_q.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S", tz=timezone.utc))
    ax_q.set_xlabel("time (UTC)")
    # From the first sample (not the start of --since: a 1h window with 5 minutes of data would
    # squeeze them into the right edge) to the end of the window.
    first = min((p[0][0] for p in (*data.weights.values(), *data.traffic.values()) if p), default=data.start)
    left = max(data.start, first - 0.02 * (data.end - first))
    ax_q.set_xlim(dt(left), dt(data.end))

    summary = summarize(data)
    fig.suptitle(f"{title}\n{_utc(data.start)} – {_utc(data.end)} · {data.source} · "
                 + (f"{summary['decisions']} decisions" if summary["decisions"] is not None
                    else f"{summary['samples']} samples") + f", {summary['weight_changes']} weight changes", fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    summary["out"] = str(out)
    return summary


def summarize(data: ReportData) -> dict:
    def mean(pts):
        return round(sum(v for _, v in pts) / len(pts), 2) if pts else None

    def last(pts):
        return pts[-1][1] if pts else None

    return {
        "source": data.source,
        "start": _utc(data.start), "end": _utc(data.end),
        # Prometheus has no decisions, only samples of the weights.
        "decisions": sum(data.reasons.values()) if data.reasons else None,
        "samples": max((len(p) for p in data.weights.values()), default=0),
        "weight_changes": len(data.changes),
        "reasons": dict(sorted(data.reasons.items(), key=lambda kv: -kv[1])),
        "final_weights": {s: last(p) for s, p in data.weights.items()},
        "mean_rps": {s: mean(p) for s, p in data.traffic.items()},
        "failover_spans": sum(len(_spans(p, data.end)) for p in data.failover.values()),
        "changes": [{"time": _utc(t), "reason": r, "weights": w} for t, r, w in data.changes[:20]],
    }


def _utc(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))
