"""Section 7: site down. The two-site drill `site-down` of control/drills/sites.py, N times (default
10), each on a fresh pair of sites: the whole on-prem site (HAProxy entry, Triton host, agents and
the leading control plane) cut off at once under load through both entries, then back. Per figure:
min / median / max over the runs; every run in a table below."""
from __future__ import annotations

import os

from bench.common import Ctx, Missing, Section, md_table, mmm

# (label, how to read it from a run's figures)
FIGURES = [
    ("standby (cloud) leads, s after the cut", lambda f: f.get("takeover_s")),
    ("Route53 at the cloud entry only, s after the cut", lambda f: f.get("dns_cloud_only_s")),
    ("failed requests at the cloud entry", lambda f: (f.get("cloud_entry") or {}).get("failed")),
    ("requests through the cloud entry", lambda f: (f.get("cloud_entry") or {}).get("sent")),
    ("failed requests at the on-prem entry (its clients lose the site)",
     lambda f: (f.get("onprem_entry") or {}).get("failed")),
    ("sensitive at the cloud entry during the outage: sent", lambda f: (f.get("sensitive_outage") or {}).get("sent")),
    ("... refused 503 with the reason", lambda f: (f.get("sensitive_outage") or {}).get("refused_with_reason")),
    ("sensitive requests served by the cloud Triton (its counter)",
     lambda f: (f.get("sensitive_outage") or {}).get("served_by_cloud_triton_whole_run")),
    ("site back -> its control plane follows as standby, s", lambda f: f.get("rejoined_standby_s")),
    ("site back -> Route53 weight on the on-prem entry again, s", lambda f: f.get("failback_s")),
    ("moves back (on-prem weight raised)", lambda f: (f.get("failback") or {}).get("moves_back")),
    ("direction changes after the return (flaps)", lambda f: (f.get("failback") or {}).get("direction_changes")),
    ("intervals where both control planes led", lambda f: len((f.get("audit") or {}).get("overlaps") or [])),
]


def run(ctx: Ctx) -> Section:
    try:
        from control.drills import sites  # noqa: PLC0415 - pulls boto3/tritonclient: only when this section runs
    except ImportError as e:
        raise Missing(f"control/drills/sites.py is not importable ({e})") from None
    ok, why = sites.available()
    if not ok:
        raise Missing(f"the two-site drill needs network namespaces: {why}")
    reps = int(os.environ.get("BENCH_SITES_RUNS", "0")) or int(ctx.dur(10, 1))
    cfg = sites.SiteDrillConfig()
    reports = []
    for k in range(reps):
        ctx.say(f"sites: site-down run {k + 1}/{reps}")
        try:
            rep = sites.run_site_drill("site-down", ctx.work_dir / "sites", cfg, say=ctx.say)
        except Exception as e:  # noqa: BLE001 - a broken run is reported, the others go on
            rep = {"status": "error", "error": f"{type(e).__name__}: {e}"[:300]}
        rep["load_average"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
        reports.append(rep)
    figs = [r.get("figures") or {} for r in reports]
    rows = []
    for label, get in FIGURES:
        lo, med, hi = mmm([get(f) for f in figs])
        rows.append([label, lo, med, hi])
    passed = sum(r.get("status") == "passed" for r in reports)
    per_run = [[i + 1, r.get("status"), f.get("takeover_s"), f.get("dns_cloud_only_s"),
                (f.get("cloud_entry") or {}).get("failed"), (f.get("cloud_entry") or {}).get("sent"),
                (f.get("onprem_entry") or {}).get("failed"),
                f"{(f.get('sensitive_outage') or {}).get('refused_with_reason', '-')}/"
                f"{(f.get('sensitive_outage') or {}).get('sent', '-')}",
                (f.get("sensitive_outage") or {}).get("served_by_cloud_triton_whole_run"),
                f.get("rejoined_standby_s"), f.get("failback_s"),
                (f.get("failback") or {}).get("onprem_weights"), r.get("load_average"),
                r.get("error") or ", ".join(t["name"] for t in r.get("targets", []) if not t["ok"])]
               for i, (r, f) in enumerate(zip(reports, figs))]
    take, dns = mmm([f.get("takeover_s") for f in figs]), mmm([f.get("dns_cloud_only_s") for f in figs])
    failed_cloud = sum((f.get("cloud_entry") or {}).get("failed") or 0 for f in figs)
    sent_cloud = sum((f.get("cloud_entry") or {}).get("sent") or 0 for f in figs)
    served = sum((f.get("sensitive_outage") or {}).get("served_by_cloud_triton_whole_run") or 0 for f in figs)
    headline = (f"{passed}/{reps} site-down runs passed every target. Cloud control plane leads "
                f"{_f(take[1])} s after the on-prem site is cut (min {_f(take[0])}, max {_f(take[2])}; target 10 s), "
                f"Route53 at the cloud entry only after {_f(dns[1])} s (median); {failed_cloud} failed of "
                f"{sent_cloud} requests at the cloud entry; {served} sensitive requests served in the cloud.")
    return Section(
        "sites", "", headline=headline,
        what=f"The `site-down` drill (issue 16 acceptance), {reps} runs: under load through both site entries, the "
             "whole on-prem site (its HAProxy entry + entry agent, its Triton host + host agent, and the leading "
             "control plane) is cut off at once; later it returns. Min / median / max of each figure.",
        how="`control.drills.sites.run_site_drill('site-down')`, each run on fresh sites: moto's server (S3 with "
            "versioning + Route53) in the root network namespace; per site a namespace (Triton 2.51 CPU with "
            "`add_one` and `add_sensitive` pulled by its host agent, HAProxy 2.6 entry with the drill tuning: checks "
            "every 200 ms, connect timeout 300 ms, server timeout 800 ms, one retry with redispatch; entry agent "
            f"every {cfg.entry_interval_s:g} s) and a namespace for its control plane (`triton-hybrid control run`, "
            f"leader lease {cfg.lease_s:g}/{cfg.renew_s:g}/{cfg.skew_margin_s:g} s, actuators entries + route53, "
            f"failback after {cfg.failback_healthy_s:g} s healthy); all on one bridge. Open-loop load "
            f"{cfg.rate:g} req/s through each entry (HTTP and gRPC alternating) and {cfg.sensitive_rate:g} sensitive "
            "req/s at the cloud entry, from the root namespace. The cut: links down of the on-prem site's and its "
            "control plane's namespaces (packets dropped, not refused), kept until Route53 points at the cloud and "
            f"{cfg.outage_s:g} s more of load; the return: links up, then {cfg.settle_s:g} s of load watched for "
            "flapping. Times from the cut (or the return) to what the cloud control plane's API, moto's Route53 "
            "API and both daemons' audits show. Everything shares this machine's cores.",
        body=[md_table(["figure", "min", "median", "max"], rows),
              "<details><summary>Every run</summary>\n\n" +
              md_table(["run", "status", "leads s", "DNS cloud-only s", "failed cloud entry", "sent cloud entry",
                        "failed on-prem entry", "sensitive refused/sent", "sensitive served in cloud",
                        "rejoined standby s", "failback s", "on-prem weights after return", "load average",
                        "error / targets missed"], per_run) + "\n\n</details>"])


def _f(v) -> str:
    return "-" if v is None else f"{v:.2f}"
