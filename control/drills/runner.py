"""The drill machinery: a stack of its own (Tritons, HAProxy, optionally the control daemon) on
free ports under a drill run dir, an open-loop client load through HAProxy (HTTP and gRPC,
alternating), and an observer that samples HAProxy's server states and weights, every Triton's
success counter for the model and (when running) the control plane's decided weights.

`run_drill(scenario, ...)` runs one scenario end to end: prepare -> start -> load -> inject at
`fault_at` -> lift at `lift_at` -> stop -> analyse -> report files. Everything it started is stopped
and every namespace it made is removed, also when the drill fails.

The drill load is control/drills/load.py's open-loop mode (`OpenLoopLoad`): one record per request
at a fixed rate, so a stalled server shows up as late answers instead of a lower request rate.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import requests
import yaml

from control.adapters.haproxy_runtime import HAProxyRuntime
from control.config import PROJECT_ROOT, Settings, deep_merge, plain_dump
from control.drills.faults import DelayProxy
from control.drills.load import OpenLoopLoad, RequestSpec
from control.drills.models import ADD_ONE, write_add_model
from control.drills.report import analyze, write_report
from control.local.admin_keys import ensure_admin_key
from control.local.agents import start_host
from control.local.haproxy import start_haproxy
from control.local.isolated import PortPool, isolated_settings
from control.local.procs import (
    ComponentError,
    ManagedProcess,
    http_ok,
    start_ready,
)
from control.local.s3_endpoint import start_s3_server
from control.local.stack import start_control_daemon
from control.local.triton_server import start_instance, triton_argv, triton_env

MODEL_ADD_ONE = ADD_ONE

# HAProxy settings a drill stack runs with (control/adapters/haproxy_config.py renders them): fast health
# checks, a short connect timeout, and a server timeout that turns a hung server's request into a
# retry on the other site (`retry-on response-timeout` + `option redispatch 1`).
DRILL_HAPROXY = {"health_interval_ms": 200, "health_fall": 2, "health_rise": 2, "timeout_connect_ms": 300,
                 "timeout_server_ms": 800, "retries": 3}


class DrillSkip(Exception):
    """The scenario cannot run on this machine (the message says why)."""


# Requests ---------------------------------------------------------------------------------------------

def add_one_spec() -> RequestSpec:
    data = np.arange(4, dtype=np.float32).reshape(1, 4)

    def build(m):
        inp = m.InferInput("INPUT0", [1, 4], "FP32")
        inp.set_data_from_numpy(data)
        return [inp]
    return RequestSpec(MODEL_ADD_ONE, build)



# Observer -----------------------------------------------------------------------------------------

_SUCCESS_RE = re.compile(r'^nv_inference_request_success\{([^}]*)\}\s+([0-9.eE+-]+)', re.M)


def model_success_count(text: str, model: str) -> float:
    total = 0.0
    for labels, value in _SUCCESS_RE.findall(text):
        if f'model="{model}"' in labels:
            total += float(value)
    return total


@dataclass
class Samples:
    haproxy: list[tuple[float, dict | None]] = field(default_factory=list)   # t, {backend/server: {up, weight, admin}}
    counts: list[tuple[float, dict]] = field(default_factory=list)           # t, {instance: count | None}
    decided: list[tuple[float, dict | None]] = field(default_factory=list)   # t, control plane's instance weights


class Observer:
    """Samples HAProxy (every `haproxy_every` s), the Tritons' counters and the control plane's
    decided weights (every `counts_every` s) until stopped."""
    def __init__(self, env: "DrillEnv", t0: float, haproxy_every: float = 0.05, counts_every: float = 0.25):
        self.env, self.t0 = env, t0
        self.haproxy_every, self.counts_every = haproxy_every, counts_every
        self.samples = Samples()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="drill-observe")

    def _haproxy_loop(self):
        rt = HAProxyRuntime.for_settings(self.env.settings, timeout_s=0.5)
        while not self._stop.is_set():
            t = time.monotonic() - self.t0
            try:
                state = {s.key: {"up": s.up, "weight": s.weight, "admin": s.admin} for s in rt.servers()}
            except Exception:  # noqa: BLE001 - HAProxy down (restart drill): a gap in the data
                state = None
            self.samples.haproxy.append((t, state))
            self._stop.wait(self.haproxy_every)

    def _count(self, inst) -> float | None:
        try:
            r = requests.get(inst.metrics_url, timeout=0.3)
            return model_success_count(r.text, self.env.spec.model) if r.ok else None
        except requests.RequestException:
            return None

    def _decided(self) -> dict | None:
        if not self.env.with_control:
            return None
        c = self.env.settings.control
        try:
            r = requests.get(f"http://{c.api_host}:{c.api_port}/v1/weights", timeout=0.3,
                             headers={"Authorization": f"Bearer {c.admin_token.get_secret_value()}"})
            return r.json() if r.ok else None
        except (requests.RequestException, ValueError):
            return None

    def _counts_loop(self):
        insts = self.env.settings.instances
        while not self._stop.is_set():
            t = time.monotonic() - self.t0
            futs = {i.name: self._pool.submit(self._count, i) for i in insts}
            dec = self._pool.submit(self._decided)
            counts = {}
            for name, f in futs.items():
                try:
                    counts[name] = f.result(timeout=1.0)
                except Exception:  # noqa: BLE001
                    counts[name] = None
            self.samples.counts.append((t, counts))
            try:
                self.samples.decided.append((t, dec.result(timeout=1.0)))
            except Exception:  # noqa: BLE001
                self.samples.decided.append((t, None))
            self._stop.wait(self.counts_every)

    def start(self) -> "Observer":
        for fn in (self._haproxy_loop, self._counts_loop):
            th = threading.Thread(target=fn, daemon=True, name=f"drill-{fn.__name__}")
            th.start()
            self._threads.append(th)
        return self

    def stop(self) -> Samples:
        self._stop.set()
        for th in self._threads:
            th.join(5)
        self._pool.shutdown(wait=False, cancel_futures=True)
        return self.samples


# The drill stack ----------------------------------------------------------------------------------

def ports_besides(settings: Settings, n: int) -> list[int]:
    """n free ports distinct from each other and from every port the settings name."""
    taken = {settings.s3.port, settings.haproxy.http_port, settings.haproxy.grpc_port, settings.haproxy.stats_port,
             settings.control.api_port, settings.control.metrics_port, settings.control.prometheus_port}
    for i in settings.instances:
        taken |= {i.http_port, i.grpc_port, i.metrics_port, i.agent_port}
    out: list[int] = []
    with PortPool() as pool:
        while len(out) < n:
            p = pool()
            if p not in taken:
                out.append(p)
    return out


def drill_settings(base: Settings, run_dir: Path, *, weights: dict[str, int] | None = None,
                   hosts: dict[str, str] | None = None, haproxy: dict | None = None,
                   control: dict | None = None) -> Settings:
    """A copy of `base` for a drill: every port free, run dir of its own, HAProxy drill tuning,
    optional per-instance weights and hosts (a site in a namespace listens on its veth address)."""
    data = plain_dump(base)
    for inst in data["instances"]:
        inst["managed"] = True
        if weights and inst["name"] in weights:
            inst["weight"] = weights[inst["name"]]
        if hosts and inst["name"] in hosts:
            inst["host"] = hosts[inst["name"]]
    haproxy = DRILL_HAPROXY | (haproxy or {})
    # The drills' own test model passes the proxy's allowlist like a served ensemble.
    haproxy["served_models"] = sorted({*haproxy.get("served_models", data["haproxy"]["served_models"]), MODEL_ADD_ONE})
    # util_signal none: both sites share this host's CPU.
    control = deep_merge({"policy": {"util_signal": "none"}}, control or {})
    return isolated_settings(run_dir, instances=None, base=data, write_file=False, source="",
                             haproxy=haproxy, control=control)


def write_settings_file(settings: Settings) -> Settings:
    """The drill settings as a YAML file (mode 600: it has the admin secrets), so a control daemon
    started as a child process reads the same config; returns the settings with `source` set."""
    path = settings.run_path / "drill-config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = plain_dump(settings)
    data.pop("source", None)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(data, f, sort_keys=False)
    return settings.model_copy(update={"source": str(path)})


@dataclass
class DrillEnv:
    """A running drill stack and what the scenario needs to break it."""
    settings: Settings
    repository: Path
    spec: RequestSpec | None = None
    spec_factory: Callable[["DrillEnv"], RequestSpec] | None = None
    with_control: bool = False
    netns: dict = field(default_factory=dict)          # instance name -> SiteNetns
    proxies: dict = field(default_factory=dict)        # instance name -> [DelayProxy, ...]
    listen_ports: dict = field(default_factory=dict)   # instance name -> (http, grpc) Triton really binds
    with_s3: bool = False                              # S3 mirror + an agent beside every Triton (version drills)
    s3_real_port: int | None = None                    # moto listens here; settings.s3.port is a proxy
    procs: dict = field(default_factory=dict)          # component name -> ManagedProcess
    events: list = field(default_factory=list)         # (t, name, details)
    t0: float = 0.0
    notes: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)          # scenario scratch space
    records: list = field(default_factory=list)        # the load's requests, for the scenario's figures
    load: OpenLoopLoad | None = None                   # the running load (a scenario may keep it going)
    say: Callable[[str], None] = lambda m: None

    def now(self) -> float:
        return time.monotonic() - self.t0

    def mark(self, name: str, **details) -> float:
        t = self.now()
        self.events.append((t, name, details))
        self.say(f"  t={t:6.2f}s {name} {details if details else ''}")
        return t

    def instance(self, site: str):
        return self.settings.site_instances(site)[0]

    def keep_load(self, for_s: float = 2.0) -> None:
        """Keep the load running at least `for_s` from now: a scenario waiting on something that
        needs traffic (a canary's analysis) calls it while it waits."""
        if self.load is not None:
            self.load.extend_to(self.now() + for_s)

    # Starting ------------------------------------------------------------------------------------
    def start_triton(self, inst) -> ManagedProcess:
        """A Triton on the drill's repository (traffic drills: the version path is not under test);
        version drills (`with_s3`) start hosts instead (`start_host`: agent + Triton, fed from S3)."""
        http_port, grpc_port = self.listen_ports.get(inst.name, (inst.http_port, inst.grpc_port))
        ns = self.netns.get(inst.name)
        if ns is None and (http_port, grpc_port) == (inst.http_port, inst.grpc_port):
            proc = start_instance(self.settings, inst, self.repository, ready_timeout=90)
        else:
            argv = triton_argv(self.repository, http_port, grpc_port, inst.metrics_port, self.settings.run_path,
                               admin_key=ensure_admin_key(self.settings, inst), host=inst.host,
                               extra_args=self.settings.triton.extra_args)
            prefix = ns.exec_prefix() if ns is not None else []
            proc = start_ready(inst.name, prefix + argv, self.settings.run_path,
                               lambda: http_ok(f"http://{inst.host}:{http_port}/v2/health/ready"), 90,
                               "ready (/v2/health/ready)", env=triton_env(),
                               secret_values=[ensure_admin_key(self.settings, inst)])
        self.procs[inst.name] = proc
        return proc

    def start_host(self, inst) -> None:
        """The instance's agent prepares the desired versions from S3, its Triton starts on them, the
        agent loop goes on beside it (control/local/agents.start_host, as `up` does)."""
        for proc in start_host(self.settings, inst, ready_timeout=90):
            self.procs[proc.name] = proc

    def start_haproxy(self) -> ManagedProcess:
        self.procs["haproxy"] = start_haproxy(self.settings)
        return self.procs["haproxy"]

    def start_s3(self) -> None:
        """moto on a port of its own behind a TCP proxy on `s3.port` (stopping the proxy is the
        outage: connections refused, the bucket's data kept), then publish + desired stable versions."""
        # boto3 only for the version drills
        from control.adapters import s3 as s3x  # noqa: PLC0415
        from control.mirror.desired import DesiredStore, seed_stable  # noqa: PLC0415
        from control.mirror.publish import publish_repository  # noqa: PLC0415
        self.s3_real_port = ports_besides(self.settings, 1)[0]
        real = self.settings.model_copy(update={"s3": self.settings.s3.model_copy(update={"port": self.s3_real_port})})
        self.procs["s3"] = start_s3_server(real)
        self.start_s3_proxy()
        client = s3x.make_client(self.settings.s3)
        published = publish_repository(self.settings, self.repository, progress=False, client=client)
        DesiredStore(client, self.settings.s3).update(
            seed_stable({r.model: r.version for r in published}), by="drill")

    def start_control_s3(self) -> None:
        """A bare S3 endpoint for a traffic drill's control plane: its operator state (overrides,
        drains) lives in the mirror (control/traffic/operator.py)."""
        from control.adapters import s3 as s3x  # noqa: PLC0415 - boto3 only for drills that need S3
        self.procs["s3"] = start_s3_server(self.settings)
        s3x.ensure_bucket(s3x.make_client(self.settings.s3), self.settings.s3)

    def start_s3_proxy(self) -> None:
        s3 = self.settings.s3
        self.proxies["s3"] = [DelayProxy(s3.host, s3.port, s3.host, self.s3_real_port).start()]

    def stop_s3_proxy(self) -> None:
        for p in self.proxies.pop("s3", []):
            p.stop()

    def start_control(self) -> ManagedProcess:
        self.procs["control"] = start_control_daemon(self.settings)
        return self.procs["control"]

    def start(self) -> None:
        if self.with_control:
            self.settings = write_settings_file(self.settings)
        if self.with_s3:
            self.start_s3()
        elif self.with_control:
            self.start_control_s3()
        for inst in self.settings.instances:
            for (port, real) in zip((inst.http_port, inst.grpc_port), self.listen_ports.get(inst.name, ())):
                if port != real:
                    self.proxies.setdefault(inst.name, []).append(DelayProxy(inst.host, port, inst.host, real).start())
            if self.with_s3:
                self.start_host(inst)
            else:
                self.start_triton(inst)
        self.start_haproxy()
        if self.with_control:
            self.start_control()
        if self.spec is None:
            self.spec = self.spec_factory(self) if self.spec_factory else add_one_spec()

    def stop(self) -> None:
        for name in list(self.procs)[::-1]:
            try:
                self.procs.pop(name).stop(timeout=10)
            except Exception as e:  # noqa: BLE001 - keep cleaning up
                self.notes.append(f"stopping {name}: {e}")
        for plist in self.proxies.values():
            for p in plist:
                p.stop()
        self.proxies.clear()
        for ns in self.netns.values():
            ns.destroy()
        self.netns.clear()

    # Views ----------------------------------------------------------------------------------------
    def haproxy_url(self) -> tuple[str, str]:
        h = self.settings.haproxy
        return f"{h.host}:{h.http_port}", f"{h.host}:{h.grpc_port}"

    def control_api(self, method: str, path: str, body: dict | None = None, timeout: float = 3.0) -> dict:
        c = self.settings.control
        r = requests.request(method, f"http://{c.api_host}:{c.api_port}{path}", json=body, timeout=timeout,
                             headers={"Authorization": f"Bearer {c.admin_token.get_secret_value()}"})
        r.raise_for_status()
        return r.json()

    def runtime(self):
        return HAProxyRuntime.for_settings(self.settings)


# Running one drill --------------------------------------------------------------------------------

def warm_up(env: DrillEnv, n: int = 6, timeout: float = 30.0) -> None:
    """A few requests over both protocols until they succeed (first-request costs out of the data)."""
    load = OpenLoopLoad(*env.haproxy_url(), env.spec, rate=20, duration_s=n / 20)
    deadline = time.monotonic() + timeout
    while True:
        load.start()
        recs = load.join()
        if recs and all(r.ok for r in recs):
            return
        if time.monotonic() > deadline:
            errs = sorted({r.error for r in recs if not r.ok})
            raise ComponentError("drill", f"the stack does not answer {env.spec.model} before the fault: {errs[:3]}")
        time.sleep(0.5)
        load = OpenLoopLoad(*env.haproxy_url(), env.spec, rate=20, duration_s=n / 20)


def default_reports_dir(settings: Settings | None = None) -> Path:
    return PROJECT_ROOT / "reports" / "drills"


def run_drill(scenario, base: Settings, repository: str | Path, *, duration_s: float = 30.0, rate: float = 50.0,
              spec_factory: Callable[[DrillEnv], RequestSpec] | None = None, run_root: Path | None = None,
              reports_dir: Path | None = None, fault_at: float = 0.3, lift_at: float = 0.6,
              say: Callable[[str], None] = lambda m: None, write: bool = True, **options) -> dict:
    """Run `scenario` (a scenarios.Scenario) once; return the report dict (also written to disk).
    A scenario that cannot run here returns a report with status "skipped" and the reason."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    run_root = Path(run_root or base.run_path / "drills")
    run_dir = run_root / f"{scenario.name}-{stamp[9:]}-{os.getpid()}"
    if len(str(run_dir / "haproxy.sock")) > 90:  # HAProxy refuses unix socket paths over 97 chars
        run_dir = Path(tempfile.mkdtemp(prefix=f"thd-{scenario.name}-"))
    reports_dir = Path(reports_dir or default_reports_dir(base))
    out_dir = reports_dir / f"{stamp}-{scenario.name}"
    meta = {"scenario": scenario.name, "title": scenario.title, "started_utc": stamp, "duration_s": duration_s,
            "rate": rate, "options": {k: v for k, v in options.items() if isinstance(v, (int, float, str, bool))}}
    env = None
    load = None
    try:
        try:
            env = scenario.prepare(base, run_dir, Path(repository), **options)
        except DrillSkip as e:
            say(f"{scenario.name}: skipped: {e}")
            report = {**meta, "status": "skipped", "skip_reason": str(e), "passed": None}
            if write:
                write_report(report, None, out_dir)
            return report
        for attempt in range(3):
            env.say = say
            env.spec_factory = spec_factory or env.spec_factory
            say(f"{scenario.name}: starting a drill stack in {env.settings.run_path}")
            try:
                env.start()
                break
            except ComponentError as e:
                # Another process on this host took one of our free ports between the pick and
                # the bind: pick new ports and start again.
                if "already in use" not in str(e) or attempt == 2:
                    raise
                say(f"{scenario.name}: {str(e).splitlines()[0]}; retrying on other ports")
                scenario.cleanup(env)
                env.stop()
                env = scenario.prepare(base, Path(f"{run_dir}-{attempt + 1}"), Path(repository), **options)
        scenario.ready(env)
        warm_up(env)
        env.t0 = time.monotonic()
        observer = Observer(env, env.t0).start()
        load = OpenLoopLoad(*env.haproxy_url(), env.spec, rate=rate, duration_s=duration_s, clock_zero=env.t0,
                            timeout_s=scenario.client_timeout_s, open_ended=True).start()
        say(f"{scenario.name}: load {rate:g} req/s for {duration_s:g}s (HTTP + gRPC through HAProxy), "
            f"model {env.spec.model}")
        env.load = load
        env.mark("load_start")
        fault_at = scenario.fault_at if scenario.fault_at is not None else fault_at
        lift_at = scenario.lift_at if scenario.lift_at is not None else lift_at
        _sleep_until(env, duration_s * fault_at)
        scenario.inject(env)
        if scenario.lift_fault:
            _sleep_until(env, duration_s * lift_at)
            scenario.lift(env)
        # A slow lift (a sync rolling a version out) still gets `tail_s` of load after it.
        end = max(duration_s, env.now() + scenario.tail_s)
        load.extend_to(end)
        load.finish()
        meta["actual_duration_s"] = round(end, 2)
        _sleep_until(env, end)
        records = load.join()
        env.mark("load_end")
        time.sleep(0.3)
        samples = observer.stop()
        env.records = records
        scenario.after(env)
        report = analyze(meta, env, records, samples, scenario)
        report["status"] = "passed" if report["passed"] else "failed"
        if write:
            write_report(report, (records, samples), out_dir)
            report["report_dir"] = str(out_dir)
        return report
    finally:
        if load is not None:
            load.stop()
        if env is not None:
            scenario.cleanup(env)
            env.stop()


def _sleep_until(env: DrillEnv, t: float) -> None:
    while True:
        left = t - env.now()
        if left <= 0:
            return
        time.sleep(min(left, 0.05))


def dump_json(obj) -> str:
    return json.dumps(obj, indent=2, default=str)


def write_add_one_repository(root: str | Path) -> Path:
    """A one-model repository (`add_one`, Python backend) for drills without the ensemble."""
    write_add_model(root, 1, 1.0, MODEL_ADD_ONE)
    return Path(root)
