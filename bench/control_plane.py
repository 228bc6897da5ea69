"""Section 6: CPU time of one control-plane tick (poll every instance + decide + split + audit)
with 1, 10 and 100 instances. The instances are lightweight replay servers (bench/replay.py, a
separate process) serving a recorded Triton metrics text, so only the control plane's own cost is
measured. The daemon's own code does the work: `control.daemon.controller.Controller` (poller + policy +
dry-run actuator + SQLite audit)."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np

from bench.common import PROJECT_ROOT, Ctx, Missing, Section, md_table, pct
from control.config import load_config
from control.local.procs import free_port

COUNTS = (1, 10, 100)


def _settings(ctx: Ctx, n: int, ports: list[list[int]]):

    run_dir = ctx.work_dir / f"control-{n}"
    run_dir.mkdir(parents=True, exist_ok=True)
    instances = []
    for k, (http, metrics) in enumerate(ports):
        site = "onprem" if k % 2 == 0 else "cloud"
        instances.append({"name": f"{site}-{k}", "site": site, "http_port": http, "grpc_port": free_port(),
                          "metrics_port": metrics, "weight": 50, "managed": False, "sensitive_ok": site == "onprem"})
    return load_config(environ={}, overrides={
        "run_dir": str(run_dir), "instances": instances,
        "s3": {"port": free_port()},
        "haproxy": {"http_port": free_port(), "grpc_port": free_port(), "stats_port": free_port()},
        "control": {"api_port": free_port(), "metrics_port": free_port(), "actuators": ["dry-run"],
                    "start_daemon": False}})


def measure(ctx: Ctx, n: int, ticks: int) -> dict:
    try:
        from control.daemon.controller import Controller  # noqa: PLC0415
        from control.traffic.snapshot import InstanceState  # noqa: PLC0415
    except ImportError as e:
        raise Missing(f"control.daemon.controller / control.traffic.poller are not importable ({e})") from None
    replay = subprocess.Popen([sys.executable, "-m", "bench.replay", "--instances", str(n)], cwd=PROJECT_ROOT,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        ports = json.loads(replay.stdout.readline())
        settings = _settings(ctx, n, ports)
        interval = settings.control.poll_interval_s
        ctl = Controller(settings)
        try:
            poll_cpu, poll_wall, tick_cpu, tick_wall, healthy = [], [], [], [], []
            next_at = time.monotonic()
            for t in range(ticks + 2):   # two ticks of warm-up: connections, the first rates
                c0, w0 = time.process_time(), time.perf_counter()
                snaps = ctl.poll()
                c1, w1 = time.process_time(), time.perf_counter()
                d = ctl.tick()
                c2, w2 = time.process_time(), time.perf_counter()
                if t >= 2:
                    poll_cpu.append((c1 - c0) * 1000)
                    poll_wall.append((w1 - w0) * 1000)
                    tick_cpu.append((c2 - c1) * 1000)
                    tick_wall.append((w2 - w1) * 1000)
                    healthy.append(sum(1 for s in snaps.values() if s.state is InstanceState.HEALTHY))
                next_at += interval
                time.sleep(max(0.0, next_at - time.monotonic()))
            last_reason = d.reason
        finally:
            ctl.poller.close()
    finally:
        replay.stdin.close()
        try:
            replay.wait(timeout=10)
        except subprocess.TimeoutExpired:
            replay.kill()
    total_cpu = [a + b for a, b in zip(poll_cpu, tick_cpu)]
    total_wall = [a + b for a, b in zip(poll_wall, tick_wall)]
    return {"n": n, "ticks": ticks, "interval_s": interval,
            "poll_cpu_ms": float(np.median(poll_cpu)), "decide_cpu_ms": float(np.median(tick_cpu)),
            "cpu_ms": float(np.median(total_cpu)), "cpu_p99_ms": pct(total_cpu, 99),
            "wall_ms": float(np.median(total_wall)), "wall_max_ms": max(total_wall),
            "poll_wall_max_ms": max(poll_wall),
            "healthy_min": min(healthy), "reason": last_reason,
            "inside": max(total_wall) < interval * 1000}


def run(ctx: Ctx) -> Section:
    ticks = int(ctx.dur(20, 3))
    rows = []
    for n in COUNTS:
        ctx.say(f"control plane: {n} instances, {ticks} ticks")
        rows.append(measure(ctx, n, ticks))
    base = rows[0]
    table = md_table(
        ["instances", "ticks", "CPU ms / tick (poll + decide)", "of which poll", "of which decide+split+audit",
         "CPU p99 ms", "CPU vs 1 instance", "wall ms / tick (median)", "wall ms (max)", "interval ms",
         "max wall inside the interval", "instances healthy (min over ticks)"],
        [[r["n"], r["ticks"], r["cpu_ms"], r["poll_cpu_ms"], r["decide_cpu_ms"], r["cpu_p99_ms"],
          f"{r['cpu_ms'] / base['cpu_ms']:.1f}x" if base["cpu_ms"] else "-", r["wall_ms"], r["wall_max_ms"],
          r["interval_s"] * 1000, "yes" if r["inside"] else "NO", f"{r['healthy_min']}/{r['n']}"] for r in rows])
    big = rows[-1]
    summary = (f"At {big['n']} instances one tick costs {big['cpu_ms']:.1f} ms of CPU (median) and takes "
               f"{big['wall_ms']:.0f} ms of wall time (max {big['wall_max_ms']:.0f} ms) against a "
               f"{big['interval_s'] * 1000:.0f} ms poll interval: the poll "
               + ("finishes inside its interval." if big["inside"] else "does NOT finish inside its interval."))
    return Section(
        "control", "", headline=summary,
        what="CPU time (all threads of the control-plane process, `time.process_time()`) and wall time of one "
             "poll + decide tick of the daemon's own code with 1, 10 and 100 instances; whether the tick "
             "finishes inside the poll interval at 100.",
        how=f"{' / '.join(str(c) for c in COUNTS)} replay servers (`bench/replay.py`, one asyncio process, a port "
            "pair per instance) answer `/v2/health/ready` and serve `tests/fixtures/triton_metrics_cpu.txt` at "
            "`/metrics` with counters growing per scrape. `control.daemon.controller.Controller` with the dry-run actuator "
            "runs `poll()` (concurrent scrape of every instance + parse + rates) then `tick()` (policy `decide`, "
            f"`split` by capacity, SQLite audit row, own metrics), {ticks} ticks paced at the configured "
            "`poll_interval_s` after 2 warm-up ticks. The replay servers' own CPU is not counted.",
        body=[table, summary])
