"""Shared pieces of the benchmark sections: the run context, the machine record, markdown tables,
one closed-loop load generator used for every serving path, and a stack of the benchmark's own
(free loopback ports, run dir under the work dir) started with `control.local.stack.up`."""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import requests

from bench import perf
from control.local.procs import free_port
from control.local.triton_server import start_triton
from model_repository.smoke import to_infer_inputs

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PY = ".venv/bin/python"


def rerun_cmd(key: str) -> str:
    return f"`{PY} -m bench.run --only {key}` (all sections: `make bench`)"


class Missing(Exception):
    """A prerequisite (module, export file, tool) is not there: the section says so instead of a number."""


@dataclass
class Section:
    key: str
    title: str
    what: str = ""
    how: str = ""
    body: list[str] = field(default_factory=list)      # markdown paragraphs and tables
    status: str = "measured"                            # measured | missing | error
    seconds: float = 0.0
    headline: str = ""                                  # one line: the figure to quote

    def markdown(self) -> str:
        out = [f"<!-- section:{self.key} -->", f"## {self.title}", ""]
        if self.headline:
            out += [f"**Headline.** {self.headline}", ""]
        if self.what:
            out += [f"**What.** {self.what}", ""]
        if self.how:
            out += [f"**How.** {self.how}", ""]
        out += [f"**Rerun only this section.** {rerun_cmd(self.key)}", ""]
        if self.status != "measured":
            out += [f"**Status: {self.status}.**", ""]
        for block in self.body:
            out += [block.rstrip(), ""]
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
        out += [f"_Section wall time: {self.seconds:.0f} s; measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
                f"load average at its end {load} on {os.cpu_count()} cores._",
                f"<!-- /section:{self.key} -->", ""]
        return "\n".join(out)


@dataclass
class Ctx:
    export_dir: Path | None
    work_dir: Path
    quick: bool = False
    say: Callable[[str], None] = print
    facts: dict = field(default_factory=dict)           # e.g. the Triton version, filled on the way
    _repos: dict = field(default_factory=dict)

    def dur(self, full: float, quick: float) -> float:
        return quick if self.quick else full

    def need_export(self) -> Path:
        if self.export_dir is None:
            raise Missing("no export found (artifacts/exports is empty): run `make models` or pass --export DIR")
        return self.export_dir

    def repository(self, name: str = "fp32", export_dir: Path | None = None, variant: str | None = None) -> Path:
        """A CPU-target Triton repository built from the export (once per run and name), serving
        `variant` (fp32 | int8 | student; default: the spec's, fp32)."""
        if name not in self._repos:
            try:
                from model_repository.build import build_repository  # noqa: PLC0415
            except ImportError as e:
                raise Missing(f"model_repository.build is not importable ({e})") from None
            out = self.work_dir / "repos" / name
            shutil.rmtree(out, ignore_errors=True)
            self.say(f"building the cpu repository '{name}' from {export_dir or self.need_export()}")
            kw = {"variant": variant} if variant else {}
            self._repos[name] = build_repository(export_dir or self.need_export(), out, "cpu", **kw).out_dir
        return self._repos[name]


# Formatting ---------------------------------------------------------------------------------------

def md_table(headers: list[str], rows: Iterable[Iterable]) -> str:
    def cell(v) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:,.2f}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def ratio(a, b) -> float | None:
    return None if a is None or b in (None, 0) else a / b


def fmt_ratio(a, b) -> str:
    r = ratio(a, b)
    return "-" if r is None else f"{r:.2f}x"


def pct(values, q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else None


def mmm(values) -> tuple:
    """(min, median, max) of the non-None values, or Nones."""
    v = [float(x) for x in values if x is not None]
    if not v:
        return (None, None, None)
    return (min(v), float(np.median(v)), max(v))


# The machine --------------------------------------------------------------------------------------

def _cmd(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10, cwd=PROJECT_ROOT).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine() -> dict:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        kb = int(next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal")).split()[1])
        mem = f"{kb / 1024 / 1024:.1f} GiB"
    except (OSError, StopIteration, ValueError):
        pass

    def ver(pkg):
        try:
            return version(pkg)
        except PackageNotFoundError:
            return "not installed"
    commit = _cmd(["git", "rev-parse", "--short", "HEAD"])
    dirty = bool(_cmd(["git", "status", "--porcelain", "--untracked-files=no"]))
    haproxy = _cmd(["haproxy", "-v"]).splitlines()[:1] or _cmd(["/usr/sbin/haproxy", "-v"]).splitlines()[:1]
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "host": platform.node(),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory": mem,
        "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "nvidia-pytriton": ver("nvidia-pytriton"),
        "onnxruntime": ver("onnxruntime"),
        "tritonclient": ver("tritonclient"),
        "haproxy": haproxy[0] if haproxy else "?",
        "gpu": "none" if not shutil.which("nvidia-smi") else _cmd(["nvidia-smi", "-L"]).splitlines()[0],
        "git_commit": commit + (" (with uncommitted changes in tracked files)" if dirty else ""),
    }


# Requests -----------------------------------------------------------------------------------------

def load_queries(export_dir: Path, n: int = 16, max_candidates: int = 1000) -> list[dict]:
    """The first `n` held-out queries of the export: {"query", "candidate_ids"}; the same set for
    every serving path and perf_analyzer."""
    held = json.loads((Path(export_dir) / "heldout_queries.json").read_text())
    out = [{"query": h["query"], "candidate_ids": [int(c) for c in h["candidate_ids"]][:max_candidates]}
           for h in held if h.get("candidate_ids") and h.get("query")]
    if not out:
        raise Missing(f"{export_dir}/heldout_queries.json has no usable query")
    return out[:n]


def triton_inputs(module, q: dict, top_k: int = 10) -> list:
    """tritonclient.http/grpc InferInputs for one search_ranking request (batch dim 1)."""
    return to_infer_inputs({
        "QUERY": np.array([[q["query"].encode()]], dtype=object),
        "CANDIDATE_IDS": np.array([q["candidate_ids"]], dtype=np.int64),
        "TOP_K": np.array([[top_k]], dtype=np.int32),
    }, module)


def triton_http_caller(url: str, queries: list[dict], top_k: int = 10, model: str = "search_ranking"):
    """A factory of per-thread callers: each makes its own tritonclient.http client."""
    def make():
        import tritonclient.http as th  # noqa: PLC0415

        c = th.InferenceServerClient(url, connection_timeout=30, network_timeout=30)
        prepared = [triton_inputs(th, q, top_k) for q in queries]

        def call(i: int):
            r = c.infer(model, prepared[i % len(prepared)])
            if r.as_numpy("TOP_IDS") is None:
                raise RuntimeError("no TOP_IDS in the answer")
        return call
    return make


# The load generator -------------------------------------------------------------------------------

@dataclass
class LoadStats:
    concurrency: int
    seconds: float
    ok: int
    failed: int
    throughput: float
    p50_ms: float | None
    p99_ms: float | None
    errors: dict

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def drive(make_call: Callable[[], Callable[[int], object]], concurrency: int, duration_s: float,
          warmup_s: float = 1.0, max_requests: int = 500_000) -> LoadStats:
    """Closed loop: `concurrency` threads, each with its own caller from `make_call()`, call
    back-to-back for `warmup_s` (not counted) and then `duration_s` (counted). Bounded in time and
    count. Latency = wall time of one call, as the client sees it."""
    lock = threading.Lock()
    lat: list[float] = []
    errors: dict[str, int] = {}
    issued = [0]
    ready = threading.Barrier(concurrency + 1)
    times: dict[str, float] = {}

    def worker(w: int):
        try:
            call = make_call()
        except Exception as e:  # noqa: BLE001
            key = f"setup: {type(e).__name__}: {e}"[:200]
            with lock:
                errors[key] = errors.get(key, 0) + 1
            ready.wait()
            return
        ready.wait()
        t_start, t_end = times["start"], times["end"]
        i = w
        while True:
            t0 = time.perf_counter()
            if t0 >= t_end:
                break
            with lock:
                if issued[0] >= max_requests:
                    break
                issued[0] += 1
            ok = True
            try:
                call(i)
            except Exception as e:  # noqa: BLE001 - counted
                ok = False
                err = f"{type(e).__name__}: {e}"[:160]
            t1 = time.perf_counter()
            i += concurrency
            if t0 >= t_start and t1 <= t_end:
                with lock:
                    if ok:
                        lat.append((t1 - t0) * 1000)
                    else:
                        errors[err] = errors.get(err, 0) + 1

    threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(concurrency)]
    for t in threads:
        t.start()
    now = time.perf_counter()
    times["start"] = now + warmup_s
    times["end"] = now + warmup_s + duration_s
    ready.wait()
    for t in threads:
        t.join(warmup_s + duration_s + 60)
    failed = sum(errors.values())
    return LoadStats(concurrency, duration_s, len(lat), failed, len(lat) / duration_s,
                     pct(lat, 50), pct(lat, 99), errors)


# A stack of the benchmark's own -------------------------------------------------------------------

@contextmanager
def bench_stack(ctx: Ctx, name: str, repository: Path, instances=(("onprem-1", "onprem", 100, True),),
                with_control: bool = False, **sections):
    """`control.local.stack.up(settings, with_control=...)` on free loopback ports with the given
    repository (`sections`: config overrides, e.g. control={...}); everything stopped (by its pid
    files) on the way out."""
    try:
        from control.config import deep_merge  # noqa: PLC0415
        from control.local import stack  # noqa: PLC0415
        from control.local.isolated import isolated_settings as make_settings  # noqa: PLC0415
    except ImportError as e:
        raise Missing(f"the stack helpers are not importable ({e})") from None
    run_dir = ctx.work_dir / name / "run"
    shutil.rmtree(run_dir.parent, ignore_errors=True)
    run_dir.mkdir(parents=True)
    settings = make_settings(run_dir, instances=instances, **deep_merge(
        {"models": {"repository_dir": str(repository)}, "control": {"start_daemon": with_control}}, sections))
    ctx.say(f"[{name}] starting a stack: {', '.join(i[0] for i in instances)} + HAProxy"
            + (" + the control daemon" if with_control else ""))
    st = stack.up(settings, with_control=with_control)
    try:
        _record_triton_version(ctx, settings.instances[0].http_url)
        yield settings
    finally:
        st.stop()
        stack.down(settings)


def _record_triton_version(ctx: Ctx, http_url: str) -> None:
    if "triton" in ctx.facts:
        return
    try:
        import requests  # noqa: PLC0415
        ctx.facts["triton"] = requests.get(f"{http_url}/v2", timeout=3).json().get("version", "?")
    except Exception:  # noqa: BLE001
        pass


@contextmanager
def single_triton(ctx: Ctx, name: str, repository: Path):
    """One Triton (no HAProxy) on free ports; yields (http host:port, grpc host:port)."""
    run_dir = ctx.work_dir / name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    http, grpc, metrics = free_port(), free_port(), free_port()
    proc = start_triton(name, repository, http, grpc, metrics, run_dir, ready_timeout=180)
    try:
        _record_triton_version(ctx, f"http://127.0.0.1:{http}")
        yield f"127.0.0.1:{http}", f"127.0.0.1:{grpc}"
    finally:
        proc.stop()


def perf_available() -> Path:
    """perf_analyzer (bench/perf.py installs it into .tools/ on first use), or Missing with the reason."""
    try:
        return perf.install()
    except perf.PerfError as e:
        raise Missing(str(e)) from None


# Where a request's time goes inside Triton ---------------------------------------------------------

STAT_KEYS = ("success", "queue", "compute_input", "compute_infer", "compute_output")


def triton_model_stats(http: str) -> dict[str, dict]:
    """Triton's per-model statistics (`GET /v2/models/stats`, cumulative since load), summed over the
    loaded versions: {model: {"requests", "executions", "inferences", "<stat>_ns" for STAT_KEYS}}."""
    body = requests.get(f"http://{http}/v2/models/stats", timeout=10).json()
    out: dict[str, dict] = {}
    for m in body.get("model_stats", []):
        s = m.get("inference_stats", {})
        row = out.setdefault(m["name"], {"requests": 0, "executions": 0, "inferences": 0,
                                         **{f"{k}_ns": 0 for k in STAT_KEYS}})
        row["requests"] += int(s.get("success", {}).get("count", 0))
        row["executions"] += int(m.get("execution_count", 0))
        row["inferences"] += int(m.get("inference_count", 0))
        for k in STAT_KEYS:
            row[f"{k}_ns"] += int(s.get(k, {}).get("ns", 0))
    return out


def ensemble_steps(http: str, ensemble: str = "search_ranking") -> list[str]:

    cfg = requests.get(f"http://{http}/v2/models/{ensemble}/config", timeout=10).json()
    return [s["model_name"] for s in cfg.get("ensemble_scheduling", {}).get("step", [])]


def stats_breakdown(before: dict, after: dict, steps: list[str], ensemble: str = "search_ranking") -> list[list]:
    """Rows [model, requests, requests per execution, queue us, compute input us, compute infer us,
    compute output us, total us] per request, averaged over the requests served between the two
    snapshots; the steps in ensemble order, then the ensemble itself (its total is the server-side
    time of a whole request) and what the ensemble adds on top of its steps (scheduling, tensor
    hand-over between steps)."""
    def delta(name):
        a, b = after.get(name, {}), before.get(name, {})
        return {k: a.get(k, 0) - b.get(k, 0) for k in a}

    rows, step_total = [], 0.0
    for name in steps + [ensemble]:
        d = delta(name)
        n = d.get("requests", 0)
        if not n:
            rows.append([name, 0, None, None, None, None, None, None])
            continue
        per = {k: d[f"{k}_ns"] / n / 1000 for k in STAT_KEYS}
        if name != ensemble:
            step_total += per["success"]
            rows.append([name, n, n / max(d["executions"], 1), per["queue"], per["compute_input"],
                         per["compute_infer"], per["compute_output"], per["success"]])
        else:
            rows.append([f"{name} (whole request, server side)", n, None, None, None, None, None, per["success"]])
            rows.append(["ensemble overhead (whole - sum of steps)", None, None, None, None, None, None,
                         per["success"] - step_total])
    return rows


BREAKDOWN_HEADERS = ["step", "requests", "requests / execution", "queue us", "compute input us",
                     "compute infer us", "compute output us", "total us / request"]
