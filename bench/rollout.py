"""Section 5: rollout. publish -> live on every instance, with `control.mirror.publish.publish_version`
and `control.mirror.sync.sync_all`, while a steady load runs through HAProxy:
  - changed: a new version of `ranker` whose model file differs (bytes go up to S3);
  - unchanged content: a new version of `ranker` with the same files (server-side copies in S3,
    no bytes uploaded, still a load + smoke + go-live on every instance);
  - no-op: publishing the version that is already live again (nothing uploaded, nothing reloaded).
Repeated and alternated; min / median / max."""
from __future__ import annotations

import shutil
import threading
import time
import uuid
from pathlib import Path

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

MODEL = "ranker"


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


def next_version_dir(repo: Path, model: str, change: bool) -> int:
    """Copy the newest version of `model` to the next number; with `change`, the ONNX file gets a
    new doc_string (different bytes, same graph and weights, so the smoke answers stay right)."""
    versions = sorted(int(p.name) for p in (repo / model).iterdir() if p.is_dir() and p.name.isdigit())
    src, v = repo / model / str(versions[-1]), versions[-1] + 1
    dst = repo / model / str(v)
    shutil.copytree(src, dst)
    if change:
        import onnx  # noqa: PLC0415
        path = dst / "model.onnx"
        m = onnx.load(str(path))
        m.doc_string = f"bench rollout {uuid.uuid4().hex}"
        onnx.save(m, str(path))
    return v


def run(ctx: Ctx) -> Section:
    export = ctx.need_export()
    try:
        from control.mirror.publish import publish_version  # noqa: PLC0415
        from control.mirror.sync import sync_all  # noqa: PLC0415
    except ImportError as e:
        raise Missing(f"control.mirror.publish / control.mirror.sync are not importable ({e})") from None
    repo = ctx.work_dir / "rollout" / "repository"
    shutil.rmtree(repo, ignore_errors=True)
    shutil.copytree(ctx.repository("fp32"), repo)
    queries = load_queries(export, 16)
    reps = int(ctx.dur(3, 1))
    rows: dict[str, list[dict]] = {"changed": [], "unchanged content": [], "no-op (same version)": []}
    with bench_stack(ctx, "rollout-stack", repo,
                     instances=(("onprem-1", "onprem", 90, True), ("cloud-1", "cloud", 10, False))) as s:
        first = sync_all(s)
        not_live = {i: {m: d.get("status") for m, d in ms.items() if d.get("live") is None} for i, ms in first.items()}
        if any(not_live.values()):
            raise RuntimeError(f"the first sync left models not live: {not_live}")
        h = s.haproxy
        with SteadyLoad(triton_http_caller(f"{h.host}:{h.http_port}", queries), threads=2) as load:
            time.sleep(2)
            for k in range(reps):
                kinds = ["changed", "unchanged content", "no-op (same version)"]
                for kind in (kinds if k % 2 == 0 else kinds[1::-1] + kinds[2:]):
                    ok0, f0 = load.counts()
                    t0 = time.monotonic()
                    if kind == "no-op (same version)":
                        v = max(int(p.name) for p in (repo / MODEL).iterdir() if p.name.isdigit())
                        t0 = time.monotonic()
                        pub = publish_version(s, repo, MODEL, version=v)
                    else:
                        v = next_version_dir(repo, MODEL, change=(kind == "changed"))
                        t0 = time.monotonic()
                        pub = publish_version(s, repo, MODEL)
                    t_pub = time.monotonic()
                    out = sync_all(s, models=[MODEL])
                    t_live = time.monotonic()
                    live = {inst: ms.get(MODEL, {}).get("live") for inst, ms in out.items()}
                    statuses = {inst: ms.get(MODEL, {}).get("status") for inst, ms in out.items()}
                    time.sleep(0.5)
                    ok1, f1 = load.counts()
                    ctx.say(f"rollout: {kind} v{v}: publish {t_pub - t0:.2f}s, live {t_live - t0:.2f}s, {live}")
                    rows[kind].append({
                        "version": v, "status": pub.status, "uploaded": pub.uploaded_bytes, "copied": pub.copied_bytes,
                        "skipped": pub.skipped_bytes, "total": pub.bytes_total, "publish_s": t_pub - t0,
                        "live_s": t_live - t0, "all_live": all(x == v for x in live.values()),
                        "statuses": statuses, "ok": ok1 - ok0, "failed": f1 - f0})
            time.sleep(1)
        total_ok, total_failed, errors = load.ok, load.failed, dict(load.errors)
    table = []
    for kind, rs in rows.items():
        pmin, pmed, pmax = mmm([r["publish_s"] for r in rs])
        lmin, lmed, lmax = mmm([r["live_s"] for r in rs])
        table.append([kind, len(rs), f"{int(mmm([r['total'] for r in rs])[1] or 0):,}",
                      f"{int(mmm([r['uploaded'] for r in rs])[1] or 0):,}",
                      f"{int(mmm([r['copied'] for r in rs])[1] or 0):,}", pmed, lmin, lmed, lmax,
                      "yes" if all(r["all_live"] for r in rs) else "NO",
                      ", ".join(sorted({st for r in rs for st in r["statuses"].values() if st})),
                      sum(r["ok"] for r in rs), sum(r["failed"] for r in rs)])
    ch, un = table[0], table[1]
    headline = (f"Changed {MODEL}: {ch[3]} bytes uploaded, live on both instances in {ch[7]:.1f} s (median); "
                f"unchanged content: {un[3]} bytes uploaded, {un[7]:.1f} s; {total_failed} failed of "
                f"{total_ok + total_failed} requests through HAProxy during the rollouts.")
    body = [md_table(["rollout", "runs", "version bytes", "bytes uploaded (median)", "bytes copied in S3 (median)",
                      "publish s (median)", "publish -> live on both s min", "median", "max", "live everywhere",
                      "sync status", "requests served during it", "failed requests during it"], table),
            f"Whole phase: {total_ok} requests through HAProxy answered, {total_failed} failed."
            + (f" Errors: {errors}" if errors else "")]
    return Section(
        "rollout", "", headline=headline,
        what="Seconds from `publish` to live on every instance and the bytes uploaded, for a changed model and "
             "an unchanged one, with failed requests counted under a steady load through HAProxy.",
        how="A stack of the benchmark's own (`control.local.stack.up`, local S3 endpoint, two Tritons onprem-1/cloud-1 "
            "weights 90/10, HAProxy, no control daemon), first `sync_all` to mark the staged versions live. "
            "Then, under a steady load (2 closed-loop tritonclient.http clients through HAProxy, `search_ranking` "
            f"with held-out queries): `publish_version(settings, repo, '{MODEL}')` + `sync_all(settings, "
            f"models=['{MODEL}'])` for (a) changed: a new version whose model.onnx has a new doc_string (every "
            "byte uploaded; same weights so the smoke checks pass), (b) unchanged content: a new version with "
            "identical files (the publisher copies them server-side), (c) no-op: the live version published "
            f"again. Publish -> live = until `sync_all` returns with the version live on both instances (pull, "
            f"sha256 verify, candidate load + smoke, go-live, ready + smoke again). {reps} repetitions each, "
            "alternating. Failed requests: counted by the load while each rollout ran (plus 0.5 s after).",
        body=body)
