"""Section 5: rollout through the host agents (issue 14). N simulated hosts (1, 2, 4: local hosts of
`control.local.stack.up`, each its agent beside its Triton with a repository dir of its own under the
run dir) behind HAProxy, a steady load through it, the control daemon's rollout job ticking the
rollout controller. A new version of `ranker` (changed bytes) is published with
`control.mirror.publish.publish_version`; nothing else is called: the controller moves it through
canary -> analysis -> promotion waves and the agents pull, verify, smoke and load it.

Measured per rollout, from the start of the publish: the canary live, the analysis done, every host
live (the audit rows of /v1/rollouts); the bytes each host's agent pulled
(`triton_hybrid_agent_pulled_bytes_total`); requests failed through HAProxy meanwhile. The "before"
column is the last measurement of the removed `sync_all` path (2 instances, no canary, no analysis)."""
from __future__ import annotations

import shutil
import threading
import time
import uuid
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families

from bench.common import (
    Ctx,
    Missing,
    Section,
    bench_stack,
    load_queries,
    md_table,
    mmm,
    triton_http_caller,
)
from control.waiting import wait_until

MODEL = "ranker"
TERMINAL = ("done", "rolled_back", "stopped")

# control.rollout for the benchmark: the default analysis judges a canary for 60 s; here 5 s, so the
# phases that are not a configured wait (pull, verify, load, smoke, waves) are visible beside it.
# No weight hook in the daemon yet: weights are not stepped.
ROLLOUT = {"interval_s": 1.0, "analysis_window_s": 5.0, "min_requests": 20, "max_failed_checks": 3,
           "max_latency_ratio": 5.0, "canary_instances": 1, "canary_step_weight": 0, "wave_size": 1,
           "progress_deadline_s": 60.0, "status_stale_s": 15.0}
AGENT_INTERVAL_S = 1.0

# Hosts per run: a canary needs a stable host of its own site beside it (the analysis baseline).
TOPOLOGIES = {
    1: (("onprem-1", "onprem", 100, True),),
    2: (("onprem-1", "onprem", 50, True), ("onprem-2", "onprem", 50, True)),
    4: (("onprem-1", "onprem", 25, True), ("onprem-2", "onprem", 25, True),
        ("cloud-1", "cloud", 25, False), ("cloud-2", "cloud", 25, False)),
}

# The removed sync path (control.mirror.sync.sync_all: pull + verify + candidate smoke + go-live on
# every instance at once, no canary), this section's last run before issue 14: BENCHMARKS.md of
# 2026-11-22 20:24 UTC, 2 instances, changed ranker, 3 runs.
BEFORE_SYNC = {"hosts": 2, "min": 6.43, "median": 6.75, "max": 7.99, "uploaded": 322_169, "failed": 0}


class SteadyLoad:
    """`threads` closed-loop clients through HAProxy until stopped; counts per window."""

    def __init__(self, make_call, threads: int = 2):
        self.make_call, self.n = make_call, threads
        self.ok = 0
        self.failed = 0
        self.errors: dict[str, int] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(threads)]

    def _run(self, k: int):
        call = self.make_call()
        i = k
        while not self._stop.is_set():
            try:
                call(i)
                with self._lock:
                    self.ok += 1
            except Exception as e:  # noqa: BLE001 - every failure counts
                with self._lock:
                    self.failed += 1
                    key = f"{type(e).__name__}: {e}"[:160]
                    self.errors[key] = self.errors.get(key, 0) + 1
            i += self.n

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return self.ok, self.failed

    def start(self) -> SteadyLoad:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    __enter__ = start

    def __exit__(self, *exc):
        self.stop()


def next_version_dir(repo: Path, model: str, change: bool = True) -> int:
    """Copy the newest version of `model` to the next number; with `change`, its ONNX file gets a
    new doc_string (different bytes, same graph and weights, so the smoke answers stay right)."""
    versions = sorted(int(p.name) for p in (repo / model).iterdir() if p.is_dir() and p.name.isdigit())
    src, v = repo / model / str(versions[-1]), versions[-1] + 1
    dst = repo / model / str(v)
    shutil.copytree(src, dst)
    if not change:
        return v
    import onnx  # noqa: PLC0415 - heavy, only for this section
    path = dst / "model.onnx"
    m = onnx.load(str(path))
    m.doc_string = f"bench rollout {uuid.uuid4().hex}"
    onnx.save(m, str(path))
    return v


def pulled_bytes(inst) -> float:
    """What the host's agent downloaded from S3 since it started (its /metrics)."""
    r = requests.get(f"{inst.agent_url}/metrics", timeout=3)
    r.raise_for_status()
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            if s.name == "triton_hybrid_agent_pulled_bytes_total":
                return s.value
    return 0.0


class Control:
    """The daemon's admin API: /v1/rollouts for the rollout's phase and audit rows."""

    def __init__(self, settings):
        c = settings.control
        self.url = f"http://{c.api_host}:{c.api_port}"
        self.headers = {"Authorization": f"Bearer {c.admin_token.get_secret_value()}"}

    def rollout(self, model: str) -> dict:
        r = requests.get(f"{self.url}/v1/rollouts/{model}", headers=self.headers, timeout=5)
        r.raise_for_status()
        return r.json()["models"][model]

    def command(self, model: str, cmd: str) -> dict:
        r = requests.post(f"{self.url}/v1/rollouts/{model}/{cmd}", json={}, headers=self.headers, timeout=5)
        r.raise_for_status()
        return r.json()


def one_rollout(ctx: Ctx, settings, control: Control, repo: Path, load: SteadyLoad, hosts: int) -> dict:
    """Publish a changed ranker and wait until its rollout ends; the figures of that rollout."""
    from control.mirror.publish import publish_version  # noqa: PLC0415 - boto3, only for this section
    v = next_version_dir(repo, MODEL)
    before = {i.name: pulled_bytes(i) for i in settings.instances}
    ok0, f0 = load.counts()
    t0 = time.time()
    pub = publish_version(settings, repo, MODEL, v)
    t_pub = time.time()
    rows: dict[str, float] = {}
    seen: set[int] = set()
    promoted_by_hand = []

    def ended():
        st = control.rollout(MODEL)
        for row in st["history"]:
            if row["id"] in seen or row["version"] != v:
                continue
            seen.add(row["id"])
            rows.setdefault(row["to_phase"], row["ts"])
            rows.setdefault(f"reason:{row['reason']}", row["ts"])
            if row["to_phase"] in TERMINAL:
                rows["end"] = row["ts"]
                rows["outcome"] = f"{row['to_phase']} ({row['reason']})"
        r = st.get("rollout") or {}
        # One host has no same-site baseline: the machine waits for a canary it cannot choose. The
        # operator's way on: promote (analysis skipped), as soon as it waits.
        if hosts == 1 and r.get("version") == v and r.get("phase") == "published" and not promoted_by_hand:
            control.command(MODEL, "promote")
            promoted_by_hand.append(time.time())
        return "end" in rows

    wait_until(ended, ROLLOUT["progress_deadline_s"] * 4, f"the rollout of {MODEL} v{v} to end", interval=0.1)
    time.sleep(0.5)  # requests in flight at the end count too
    ok1, f1 = load.counts()
    after = {i.name: pulled_bytes(i) for i in settings.instances}
    live = {n: (s.get("live")) for n, s in control.rollout(MODEL)["instances"].items()}

    def since(key):
        return None if key not in rows else rows[key] - t0
    canary, analysed, done = since("analysis"), since("reason:analysis_passed"), since("done")
    out = {"version": v, "uploaded": pub.uploaded_bytes, "total": pub.bytes_total, "publish_s": t_pub - t0,
           "canary_live_s": canary, "analysis_done_s": analysed, "all_live_s": done,
           "analysis_s": None if canary is None or analysed is None else analysed - canary,
           "wave_s": None if analysed is None or done is None or hosts < 2 else (done - analysed) / (hosts - 1),
           "outcome": rows.get("outcome"), "end_s": since("end"),
           "pulled": {n: after[n] - before[n] for n in after}, "live": live,
           "all_live": all(x == v for x in live.values()), "ok": ok1 - ok0, "failed": f1 - f0,
           "promoted_by_hand": bool(promoted_by_hand)}
    ctx.say(f"rollout {hosts} host(s) v{v}: {out['outcome']}, canary live {_s(out['canary_live_s'])}, analysis done "
            f"{_s(out['analysis_done_s'])}, all live {_s(out['all_live_s'])}; pulled "
            f"{ {n: int(b) for n, b in out['pulled'].items()} }; failed {out['failed']} of {out['ok'] + out['failed']}")
    return out


def _s(x) -> str:
    return "-" if x is None else f"{x:.2f}s"


def run_hosts(ctx: Ctx, hosts: int, source_repo: Path, queries: list, reps: int) -> dict:
    repo = ctx.work_dir / f"rollout-{hosts}" / "repository"
    shutil.rmtree(repo, ignore_errors=True)
    shutil.copytree(source_repo, repo)
    instances = TOPOLOGIES[hosts]
    onprem = sum(w for _, site, w, _ in instances if site == "onprem")
    total = sum(w for *_, w, _ in instances)
    sections = {"control": {"rollout": ROLLOUT,
                            # the shared CPU is no signal; keep the weights the topology gives
                            "policy": {"util_signal": "none", "home_onprem_weight": round(100 * onprem / total)}},
                "agent": {"interval_s": AGENT_INTERVAL_S}}
    t_start = time.monotonic()
    with bench_stack(ctx, f"rollout-{hosts}-stack", repo, instances=instances, with_control=True, **sections) as s:
        started_s = time.monotonic() - t_start
        control = Control(s)
        h = s.haproxy
        with SteadyLoad(triton_http_caller(f"{h.host}:{h.http_port}", queries), threads=2) as load:
            wait_until(lambda: load.counts()[0] >= 50, 60, "the steady load answering 50 requests")
            runs = [one_rollout(ctx, s, control, repo, load, hosts) for _ in range(reps)]
        return {"hosts": hosts, "runs": runs, "stack_start_s": started_s, "errors": dict(load.errors),
                "uptime": Path("/proc/loadavg").read_text().split()[:3]}


def _med(rs, key):
    return mmm([r[key] for r in rs if r[key] is not None])


def run(ctx: Ctx) -> Section:
    export = ctx.need_export()
    try:
        import control.mirror.publish  # noqa: F401, PLC0415 - boto3, only for this section
    except ImportError as e:
        raise Missing(f"control.mirror.publish is not importable ({e})") from None
    source = ctx.repository("fp32")
    queries = load_queries(export, 16)
    reps = int(ctx.dur(3, 1))
    results, notes = [], []
    for hosts in sorted(TOPOLOGIES):
        try:
            results.append(run_hosts(ctx, hosts, source, queries, reps))
        except Exception as e:  # noqa: BLE001 - one size that cannot run here is reported, the others go on
            notes.append(f"{hosts} host(s): not measured: {type(e).__name__}: {str(e)[:300]}")
            ctx.say(notes[-1])
    table = []
    for res in results:
        rs = res["runs"]
        pulled = [b for r in rs for b in r["pulled"].values()]
        table.append([
            res["hosts"], len(rs), ", ".join(sorted({r["outcome"] or "-" for r in rs})),
            _fmt(mmm([r["publish_s"] for r in rs])[1]), _fmt(_med(rs, "canary_live_s")[1]),
            _fmt(_med(rs, "analysis_done_s")[1]), _fmt(_med(rs, "analysis_s")[1]), _fmt(_med(rs, "wave_s")[1]),
            " / ".join(_fmt(x) for x in _med(rs, "all_live_s")),
            f"{int(mmm([r['total'] for r in rs])[1] or 0):,}", f"{int(mmm([r['uploaded'] for r in rs])[1] or 0):,}",
            f"{int(min(pulled)):,} - {int(max(pulled)):,}" if pulled else "-",
            "yes" if all(r["all_live"] for r in rs) else "NO",
            sum(r["ok"] for r in rs), sum(r["failed"] for r in rs), " ".join(res["uptime"])])
    b = BEFORE_SYNC
    table.append([f"{b['hosts']} (before: sync_all)", 3, "live (no canary, no analysis)", "0.20", "-", "-", "-",
                  "- (both at once)", f"{b['min']:.2f} / {b['median']:.2f} / {b['max']:.2f}", "325,795",
                  f"{b['uploaded']:,}", "(not recorded)", "yes", "-", b["failed"], "2.20 2.21 3.59"])
    by = {r["hosts"]: r for r in results}
    parts = []
    for n, res in sorted(by.items()):
        med = _med(res["runs"], "all_live_s")[1]
        parts.append(f"{n} host(s) {med:.1f} s" if med is not None else f"{n} host(s) did not finish")
    failed = sum(r["failed"] for res in results for r in res["runs"])
    served = sum(r["ok"] + r["failed"] for res in results for r in res["runs"])
    all_runs = [r for res in results for r in res["runs"]]
    canary_med, wave_med = _med(all_runs, "canary_live_s")[1], _med(all_runs, "wave_s")[1]
    pulled_all = [b for r in all_runs for b in r["pulled"].values()]
    headline = (f"Publish -> every host live through the agents and the canary machine (5 s analysis, waves of one "
                f"host): {', '.join(parts) or 'not measured'} (median); before, sync_all on 2 instances at once: "
                f"{b['median']:.2f} s with no canary and no analysis. "
                + (f"Canary live {canary_med:.1f} s after the publish, then {wave_med:.1f} s per further host. "
                   if canary_med is not None and wave_med is not None else "")
                + (f"Each host pulls the whole version ({int(max(pulled_all)):,} bytes) once; " if pulled_all else "")
                + f"{failed} failed of {served} requests through HAProxy during the rollouts.")
    body = [md_table(["hosts", "runs", "outcome", "publish s", "-> canary live s", "-> analysis done s",
                      "analysis s", "per wave s", "-> all live s (min / median / max)", "version bytes",
                      "bytes uploaded", "bytes pulled per host (min - max)", "all live",
                      "requests served during the rollouts", "failed", "load average at the end"], table),
            "Times are seconds from the start of the publish to the rollout's audit rows (`/v1/rollouts`), medians "
            "over the runs: canary live = `canary_live`, analysis done = `analysis_passed`, all live = `promoted` "
            "(every agent reports the version live); analysis = analysis done - canary live; per wave = (all live - "
            "analysis done) / (hosts - 1). Rollout config: "
            f"`control.rollout` {ROLLOUT}, `agent.interval_s` {AGENT_INTERVAL_S}: a tick and an agent pass each "
            "wait up to 1 s, the analysis 5 s by configuration; each promotion wave reloads one host (`wave_size` "
            "1), so all live ~ canary live + analysis + (hosts - 1) x one wave; `wave_size: k` divides the last "
            "term. Bytes pulled: the delta of each agent's `triton_hybrid_agent_pulled_bytes_total` over the "
            "rollout. The agent pulls every file of the new version, also those identical to files of the version "
            "it serves (the publisher copied them in S3 instead of uploading: bytes uploaded)."]
    body.append("The before row is the last run of the removed path, kept as measured (2026-11-22, full-profile "
                "export: a 325,795-byte ranker version, load average 2.2); the rows above ran at the load averages "
                "in their last column, so compare the shape (every instance at once vs canary, analysis, then one "
                "host per wave) more than the seconds.")
    if any(r["promoted_by_hand"] for res in results for r in res["runs"]):
        body.append("1 host: no other host of its site is a baseline, so the rollout first collects an analysis "
                    "window of the host's own stable version (`lone_instance_self_baseline`) before its canary "
                    "switch; the benchmark sends the operator's `POST /v1/rollouts/ranker/promote` as soon as the "
                    "rollout waits (analysis skipped), the way an operator rolls out to a single host at once.")
    errors = {k: v for res in results for k, v in res["errors"].items()}
    if errors:
        body.append(f"Load errors: {errors}")
    body += notes
    return Section(
        "rollout", "", headline=headline,
        what="Seconds from `publish` to the canary live, the analysis done and every host live, and the bytes each "
             "host pulls, with 1, 2 and 4 hosts, failed requests counted under a steady load through HAProxy; "
             "the removed sync path's figure as the before.",
        how="Per host count a stack of the benchmark's own (`control.local.stack.up` with the control daemon: local "
            "S3 endpoint, the repository published and seeded as desired stable versions, per host `agent --once` "
            "then Triton then the agent loop, each host's repository under the run dir; HAProxy; the daemon's "
            "rollout job). Hosts: 1 = onprem-1; 2 = onprem-1, onprem-2; 4 = onprem-1, onprem-2, cloud-1, cloud-2 "
            "(equal weights; a canary is judged against a stable host of its own site). Under a steady load "
            "(2 closed-loop tritonclient.http clients through HAProxy, `search_ranking` with held-out queries of the "
            f"export): a new `{MODEL}` version whose model.onnx has a new doc_string (every byte uploaded, same "
            "weights so the smoke checks pass), `publish_version(settings, repo, 'ranker', v)`, then nothing but "
            f"waiting on `/v1/rollouts/{MODEL}` until the rollout ends. {reps} rollout(s) per host count. All "
            "Tritons, agents, the daemon, HAProxy, moto and the load share this machine's 2 cores.",
        body=body)


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.2f}"
