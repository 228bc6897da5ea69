"""The drill scenarios. Each one: `prepare` (settings and environment of its drill stack),
`ready` (a state to start from), `inject` (the fault; marks `fault`), `lift` (marks `lift`),
`targets` (pass/fail against the issue's targets, from the analysis).

Times are seconds since the load started; `env.mark()` records them for the report.
"""
from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

from control.adapters import s3 as s3x
from control.adapters.haproxy_config import ALL_BACKENDS
from control.drills import faults
from control.drills.netns import SiteNetns, available, netem_available
from control.drills.runner import (
    DrillEnv,
    DrillSkip,
    add_one_spec,
    drill_settings,
    ports_besides,
    write_add_one_repository,
)


def target(name: str, ok: bool, value, goal: str) -> dict:
    return {"name": name, "ok": bool(ok), "value": value, "goal": goal}


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.2f}s"


class Scenario:
    name = ""
    title = ""
    target_site = "onprem"       # the site the fault hits
    lift_fault = True            # the fault is lifted during the run
    client_timeout_s = 10.0
    needs_control = False
    tail_s = 2.0                    # load seconds at least after the lift returned
    fault_at: float | None = None   # fraction of the duration; None: run_drill's default
    lift_at: float | None = None
    recovery_goal_s: float | None = None

    def prepare(self, base, run_dir: Path, repository: Path, *, weights: dict[str, int] | None = None,
                with_control: bool | None = None, **_) -> DrillEnv:
        settings = drill_settings(base, run_dir, weights=weights, control=self.control_overrides(base, weights))
        return DrillEnv(settings, repository, with_control=self.needs_control if with_control is None else with_control)

    def env_in_netns(self, base, run_dir, repository, inst, weights, with_control):
        """A drill env whose instance `inst` listens in a network namespace of its own: (env, namespace)."""
        ns = SiteNetns().create()
        try:
            settings = drill_settings(base, run_dir, weights=weights, hosts={inst.name: ns.ns_ip},
                                      control=self.control_overrides(base, weights))
        except BaseException:
            ns.destroy()
            raise
        env = DrillEnv(settings, repository, with_control=self.needs_control if with_control is None else with_control)
        env.netns[inst.name] = ns
        return env, ns

    def control_overrides(self, base, weights: dict[str, int] | None = None) -> dict:
        # Steady home weights = the drill stack's instance weights, so the policy does not move
        # them on its own during a drill that is not about the policy.
        w = {i.name: (weights or {}).get(i.name, i.weight) for i in base.instances}
        on = sum(w[i.name] for i in base.instances if i.site == "onprem")
        tot = sum(w.values()) or 1
        return {"policy": {"home_onprem_weight": round(100 * on / tot)}}

    def ready(self, env: DrillEnv) -> None:
        pass

    def inject(self, env: DrillEnv) -> None:
        raise NotImplementedError

    def lift(self, env: DrillEnv) -> None:
        pass

    def after(self, env: DrillEnv) -> None:
        pass

    def cleanup(self, env: DrillEnv) -> None:
        pass

    def targets(self, a: dict, env: DrillEnv) -> list[dict]:
        return []

    def figures(self, a: dict, env: DrillEnv) -> None:
        """Scenario-specific figures, added to the analysis before the targets are checked."""
    # helpers
    def victim(self, env: DrillEnv):
        return env.instance(self.target_site)


class _OnpremDown(Scenario):
    """Shared targets of the scenarios that take the on-prem Triton away."""
    recovery_goal_s = 2.0

    def targets(self, a, env):
        f = a["failures"]
        return [
            target("detected", a["detect_s"] is not None, a["detect_s"], "HAProxy marks the server DOWN"),
            target("zero client-visible failures", f["total"] == 0, f["total"], "0 failed requests"),
            target("recovery time", a["recovery_s"] is not None and a["recovery_s"] <= self.recovery_goal_s,
                   a["recovery_s"], f"<= {self.recovery_goal_s:g}s"),
            target("back after lift", a["after_lift"]["serving_s"] is not None, a["after_lift"]["serving_s"],
                   "server UP and serving again"),
        ]


class OnpremCrash(_OnpremDown):
    name = "onprem-crash"
    title = "kill -9 of the on-prem Triton"

    def inject(self, env):
        proc = env.procs[self.victim(env).name]
        env.mark("fault", action=f"kill -9 process group {proc.pid}")
        faults.kill9(proc)
        env.extra["killed_t"] = env.mark("killed", action="the process group is gone")

    def figures(self, a, env):
        # Requests the victim had already received when it died are not re-sent: HAProxy cannot tell
        # them from a request that killed it (a query of death, issue 15), so `retry-on` has no
        # empty-response. Requests sent after the kill must all succeed (conn-failure redispatch).
        killed = env.extra.get("killed_t")
        failed = [r for r in env.records if not r.ok]
        a["lost_in_flight"] = sum(1 for r in failed if killed is not None and r.t_start <= killed)
        a["failed_after_kill"] = len(failed) - a["lost_in_flight"]

    def targets(self, a, env):
        out = [t for t in super().targets(a, env) if t["name"] != "zero client-visible failures"]
        return [
            target("zero failures among requests sent after the kill", a["failed_after_kill"] == 0,
                   a["failed_after_kill"], "0 (connection failures are redispatched)"),
            target("only requests in flight at the kill lost", a["lost_in_flight"] <= self.in_flight_budget(env),
                   a["lost_in_flight"], f"<= {self.in_flight_budget(env)} (never re-sent: could be a query of death)"),
            *out,
        ]

    @staticmethod
    def in_flight_budget(env) -> int:
        """Requests the victim can hold at the kill: rate x the slowest answer before it, at least one."""
        before = [r.latency_ms for r in env.records if r.ok and r.t_end < env.extra.get("killed_t", 0)]
        rate = len(env.records) / max(env.records[-1].t_sched, 1e-3) if env.records else 0
        return max(1, round(rate * (max(before, default=0) / 1000)) + 1)

    def lift(self, env):
        env.mark("lift", action="restart the on-prem Triton")
        env.start_triton(self.victim(env))
        env.mark("restarted", action="on-prem Triton ready")


class OnpremHang(_OnpremDown):
    name = "onprem-hang"
    title = "SIGSTOP of the on-prem Triton (alive but silent), then SIGCONT"

    def inject(self, env):
        proc = env.procs[self.victim(env).name]
        env.mark("fault", action=f"SIGSTOP process group {proc.pid}")
        faults.freeze(proc)

    def lift(self, env):
        env.mark("lift", action="SIGCONT")
        faults.thaw(env.procs[self.victim(env).name])

    def cleanup(self, env):
        proc = env.procs.get(self.victim(env).name)
        if proc is not None:
            faults.thaw(proc)


class OnpremPartition(_OnpremDown):
    name = "onprem-partition"
    title = "the on-prem site cut off the network (veth link down, then up)"

    def prepare(self, base, run_dir, repository, *, weights=None, with_control=None, **_):
        ok, why = available()
        if not ok:
            raise DrillSkip(f"cannot make network namespaces here: {why}")
        onprem = next(i for i in base.instances if i.site == "onprem")
        env, ns = self.env_in_netns(base, run_dir, repository, onprem, weights, with_control)
        env.notes.append(f"on-prem Triton in network namespace {ns.ns} at {ns.ns_ip} "
                         f"(veth {ns.veth_root} {ns.root_ip}/30 <-> {ns.veth_ns} {ns.ns_ip}/30)")
        return env

    def inject(self, env):
        ns = env.netns[self.victim(env).name]
        env.mark("fault", action=f"ip link set {ns.veth_ns} down (in {ns.ns})")
        ns.link_down()

    def lift(self, env):
        ns = env.netns[self.victim(env).name]
        env.mark("lift", action=f"ip link set {ns.veth_ns} up")
        ns.link_up()


class CloudLatency(Scenario):
    name = "cloud-latency"
    title = "the cloud site behind an added network delay"
    target_site = "cloud"
    needs_control = True  # the policy must not move traffic onto the slow site
    delay_ms = 100.0
    share_tolerance = 0.05

    def prepare(self, base, run_dir, repository, *, weights=None, with_control=None, delay_ms=None, **_):
        self.delay_ms = float(delay_ms or self.delay_ms)
        cloud = next(i for i in base.instances if i.site == "cloud")
        ok, why = netem_available()
        if ok:
            env, ns = self.env_in_netns(base, run_dir, repository, cloud, weights, with_control)
            env.extra["delay_via"] = f"tc netem on {ns.veth_root} and {ns.veth_ns}"
        else:
            settings = drill_settings(base, run_dir, weights=weights, control=self.control_overrides(base, weights))
            env = DrillEnv(settings, repository, with_control=self.needs_control if with_control is None else with_control)
            env.listen_ports[cloud.name] = tuple(ports_besides(settings, 2))
            env.extra["delay_via"] = f"userspace delay proxy in front of the cloud Triton ({why})"
        env.notes.append(f"delay {self.delay_ms:g} ms round trip via {env.extra['delay_via']}")
        return env

    def _set(self, env, ms):
        cloud = self.victim(env)
        if cloud.name in env.netns:
            ns = env.netns[cloud.name]
            ns.add_delay(ms) if ms else ns.clear_delay()
        else:
            for p in env.proxies.get(cloud.name, []):
                p.set_delay(ms)

    def inject(self, env):
        env.mark("fault", action=f"+{self.delay_ms:g} ms to the cloud site")
        self._set(env, self.delay_ms)

    def lift(self, env):
        env.mark("lift", action="delay removed")
        self._set(env, 0)

    def targets(self, a, env):
        w = a["weights_before"] or {}
        cloud = self.victim(env).name
        tot = sum(w.values()) or 1
        weight_share = w.get(cloud, 0) / tot
        share = a["fault_window"]["site_share"].get("cloud")
        out = [
            target("zero client-visible failures", a["failures"]["total"] == 0, a["failures"]["total"], "0"),
            target("cloud share stays at or below its weight", share is not None and
                   share <= weight_share + self.share_tolerance, share,
                   f"<= {weight_share:.2f} + {self.share_tolerance}"),
            target("cloud weight not raised during the delay", not a["fault_window"]["cloud_weight_raised"],
                   a["fault_window"]["cloud_weight_max"], f"<= {w.get(cloud)} (weight before)"),
        ]
        return out


class HAProxyRestart(Scenario):
    name = "haproxy-restart"
    title = "the proxy restarts; weights restored from the control plane's state"
    target_site = "proxy"
    lift_fault = False
    needs_control = True
    decided = {"onprem": 70, "cloud": 30}

    def prepare(self, base, run_dir, repository, *, restart_mode: str = "graceful", **kw):
        env = super().prepare(base, run_dir, repository, **kw)
        if restart_mode not in ("graceful", "kill"):
            raise ValueError("restart_mode must be graceful or kill")
        env.extra["restart_mode"] = restart_mode
        return env

    def ready(self, env):
        """Weights that differ from haproxy.cfg's, so a restart visibly loses them."""
        inst = {env.instance("onprem").name: self.decided["onprem"], env.instance("cloud").name: self.decided["cloud"]}
        if env.with_control:
            env.control_api("POST", "/v1/weights", {"weights": self.decided, "ttl_s": 3600, "note": "drill"})
            env.extra["restorer"] = "control plane (daemon reconciles the observed HAProxy state)"
        else:
            rt = env.runtime()
            for be in ALL_BACKENDS:
                for name, w in inst.items():
                    rt.set_weight(be, name, w)
            env.extra["restorer"] = "drill (no control daemon in this run): re-applies the recorded weights"
        env.extra["decided"] = inst
        _wait_weights(env, inst, 15)

    def inject(self, env):
        proc = env.procs["haproxy"]
        mode = env.extra["restart_mode"]
        env.mark("fault", action=f"HAProxy restart ({mode})")
        if mode == "kill":
            faults.kill9(proc)
        else:
            proc.signal(signal.SIGUSR1)  # soft stop: listeners close, running requests finish
            deadline = time.monotonic() + 5
            while proc.alive and time.monotonic() < deadline:
                time.sleep(0.01)
        proc.stop(timeout=2)
        env.mark("haproxy_stopped")
        env.start_haproxy()
        env.mark("haproxy_ready", action="stats socket answers")
        if not env.with_control:
            rt = env.runtime()
            for be in ALL_BACKENDS:
                for name, w in env.extra["decided"].items():
                    rt.set_weight(be, name, w)
            env.mark("weights_reapplied", by="drill")

    def targets(self, a, env):
        r = a["restore"]
        goal = env.settings.control.poll_interval_s
        f = a["failures"]
        return [
            target("weights restored within one poll interval", r["restored_s"] is not None and r["restored_s"] <= goal,
                   r["restored_s"], f"<= {goal:g}s after HAProxy is back"),
            target("no failures outside the restart window", f["outside_restart_window"] == 0,
                   f["outside_restart_window"], "0 (failures inside the window are HAProxy's own, reported)"),
        ]


class ControlCrash(Scenario):
    name = "control-crash"
    title = "kill -9 of the control plane in the middle of a weight shift, restart, reconcile"
    target_site = "control"
    needs_control = True
    fault_at, lift_at = 0.25, 0.4  # the daemon needs ~1-3 s to start, then one tick to reconcile
    shift_to = {"onprem": 40, "cloud": 60}
    down_s = 1.0

    def ready(self, env):
        inst = {i.name: i.weight for i in env.settings.instances}
        _wait_weights(env, inst, 15)

    def inject(self, env):
        on, cl = env.instance("onprem").name, env.instance("cloud").name
        old = {on: env.instance("onprem").weight, cl: env.instance("cloud").weight}
        env.control_api("POST", "/v1/weights", {"weights": self.shift_to, "ttl_s": 3600, "note": "drill shift"})
        env.extra["decided"] = {on: self.shift_to["onprem"], cl: self.shift_to["cloud"]}
        proc = env.procs["control"]
        env.mark("fault", action=f"weight shift {old} -> {env.extra['decided']} posted; kill -9 control pid {proc.pid}")
        faults.kill9(proc)
        # Whatever the daemon managed to apply before it died, leave HAProxy half-shifted: the gRPC
        # backend keeps the old weights (the daemon died between two backends).
        rt = env.runtime()
        state = {s.key: s.weight for s in rt.servers()}
        env.extra["at_kill"] = state
        for name, w in old.items():
            rt.set_weight(ALL_BACKENDS[1], name, w)
        env.mark("half_shifted", http={k: v for k, v in state.items() if k.startswith(ALL_BACKENDS[0])},
                 grpc_reset_to=old)

    def lift(self, env):
        env.mark("lift", action="restart the control plane")
        env.start_control()
        env.mark("control_ready", action="daemon exports metrics")

    def targets(self, a, env):
        r = a["restore"]
        goal = env.settings.control.poll_interval_s
        return [
            target("weights back to the decided values within one poll interval after the restart",
                   r["restored_s"] is not None and r["restored_s"] <= goal, r["restored_s"], f"<= {goal:g}s"),
            target("zero failed requests", a["failures"]["total"] == 0, a["failures"]["total"], "0"),
        ]


class QueryOfDeath(Scenario):
    """Requests that declare a huge shape with little data (HTTP/JSON, HTTP binary, gRPC), sent
    through HAProxy in the middle of steady load. Triton 2.51 aborts on the HTTP/JSON form
    (std::bad_alloc); the proxy's guard must refuse all three before they reach any Triton, and a
    request that crashed a server must never be re-sent to the next one."""
    name = "query-of-death"
    title = "requests declaring 10^12 elements with 4 values of data, mixed into steady load"
    target_site = "proxy"
    fault_at, lift_at = 0.3, 0.6
    rounds = 2

    def prepare(self, base, run_dir, repository, *, weights=None, with_control=None, guard: bool = True, **_):
        settings = drill_settings(base, run_dir, weights=weights, haproxy={"guard": guard},
                                  control=self.control_overrides(base, weights))
        env = DrillEnv(settings, repository, with_control=self.needs_control if with_control is None else with_control)
        env.extra["guard"] = guard
        if not guard:
            env.notes.append("the proxy's request guard is OFF in this run (haproxy.guard: false): what it prevents")
        return env

    def ready(self, env):
        env.extra["pids"] = {i.name: env.procs[i.name].pid for i in env.settings.instances}

    def inject(self, env):
        env.mark("fault", action=f"{self.rounds} x (HTTP/JSON, HTTP binary, gRPC) requests declaring "
                                 f"{faults.QOD_DIM:.0e} elements")
        rows = []
        for _ in range(self.rounds):
            rows += faults.query_of_death(*env.haproxy_url(), env.spec)
        env.extra["qod"] = rows
        env.mark("qod_answered", refused=sum(r["refused"] for r in rows), sent=len(rows),
                 first=rows[0]["detail"][:160] if rows else "")

    def _crashed(self, env) -> list[str]:
        """Instances whose Triton died or was replaced since the load started."""
        out = []
        for i in env.settings.instances:
            proc = env.procs.get(i.name)
            if proc is None or not proc.alive or proc.pid != env.extra["pids"][i.name]:
                out.append(i.name)
        return out

    def lift(self, env):
        crashed = self._crashed(env)
        env.extra["crashed"] = crashed
        env.mark("lift", crashed=crashed, action="restart the crashed Tritons" if crashed else "nothing crashed")
        for name in crashed:
            env.start_triton(env.settings.instance(name))
        if crashed:
            env.mark("restarted", instances=crashed)

    def figures(self, a, env):
        rows = env.extra.get("qod", [])
        a["query_of_death"] = {
            "sent": len(rows), "refused": sum(r["refused"] for r in rows),
            "by_form": {f: [r["status"] for r in rows if r["form"] == f] for f in ("http-json", "http-binary", "grpc")},
            "first_refusal": next((r["detail"] for r in rows if r["refused"]), None),
            "guard": env.extra.get("guard", True),
        }
        a["crashed_instances"] = sorted(set(env.extra.get("crashed", [])) | set(self._crashed_after_restart(env)))

    def _crashed_after_restart(self, env) -> list[str]:
        # Crashes after the lift (a restarted instance keeps its new pid: only a dead one counts).
        return [i.name for i in env.settings.instances if not (env.procs.get(i.name) and env.procs[i.name].alive)]

    def targets(self, a, env):
        q = a["query_of_death"]
        crashed = a["crashed_instances"]
        return [
            target("no Triton crashed", not crashed, len(crashed), f"0 (crashed: {', '.join(crashed) or 'none'})"),
            target("zero failed good requests", a["failures"]["total"] == 0, a["failures"]["total"], "0"),
            target("every query of death refused with a client error", q["sent"] > 0 and q["refused"] == q["sent"],
                   f"{q['refused']}/{q['sent']}", "HTTP 400 / gRPC INVALID_ARGUMENT naming the input and the limit"),
        ]


BAD_MODEL = '''import os, sys
sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Loads fine, fails every inference: the version the smoke check must stop (drill bad-model)."""
    def execute(self, requests):
        return [pb_utils.InferenceResponse(error=pb_utils.TritonError("broken on purpose (drill bad-model)"))
                for _ in requests]
'''


class _MirrorScenario(Scenario):
    """S3 publish/sync drills: the stack is fed from S3 (publish -> verified pull -> candidate
    load + smoke -> go live, control/mirror/publish.py + control/mirror/sync.py) and the load calls the drill's
    `add_one` model, whose answers carry the version that served them."""
    target_site = "mirror"
    model = "add_one"
    fault_at, lift_at = 0.2, 0.55
    good_after_lift = 3

    def prepare(self, base, run_dir, repository, *, weights=None, with_control=None, **_):
        src = Path(run_dir) / "source-repo"
        src.mkdir(parents=True, exist_ok=True)
        if Path(repository).is_dir():
            shutil.copytree(repository, src, dirs_exist_ok=True, symlinks=True)
        if not (src / self.model / "1").is_dir():
            write_add_one_repository(src)
        settings = drill_settings(base, run_dir, weights=weights, control=self.control_overrides(base, weights))
        settings = settings.model_copy(update={"s3": settings.s3.model_copy(
            update={"retry_attempts": 2, "retry_base_delay_s": 0.5})})
        env = DrillEnv(settings, src, with_control=self.needs_control if with_control is None else with_control)
        env.with_s3 = True
        env.spec = add_one_spec()
        return env

    def ready(self, env):
        from control.mirror.sync import sync_all  # noqa: PLC0415
        out = sync_all(env.settings, force=True)
        env.extra["initial_sync"] = _summary(out, self.model)

    # helpers
    def write_version(self, env, version: int, bad: bool = False) -> None:
        src = env.repository / self.model
        vdir = src / str(version)
        vdir.mkdir(parents=True, exist_ok=True)
        if bad:
            (vdir / "model.py").write_text(BAD_MODEL)
        else:
            shutil.copy(src / "1" / "model.py", vdir / "model.py")

    def publish(self, env, version: int) -> None:
        from control.mirror.publish import publish_version  # noqa: PLC0415
        r = publish_version(env.settings, env.repository, self.model, version)
        env.mark("published", version=version, status=r.status)

    def sync(self, env, label: str = "sync") -> dict:
        from control.mirror.sync import sync_all  # noqa: PLC0415
        t = env.now()
        out = _summary(sync_all(env.settings, force=True), self.model)
        env.mark(label, took_s=round(env.now() - t, 2), outcome=out)
        return out

    def lift(self, env):
        env.mark("lift", action=f"publish a good v{self.good_after_lift} and sync")
        self.write_version(env, self.good_after_lift)
        self.publish(env, self.good_after_lift)
        self.sync(env, "sync_after_lift")

    def figures(self, a, env):
        refused = next((t for t, n, d in env.events if n == "sync" and _all_refused(d.get("outcome"))), None)
        fault = a["fault_t"]
        a["detect_s"] = None if refused is None or fault is None else round(refused - fault, 3)
        a["recovery_s"] = a["detect_s"]  # the old version never stopped serving: recovered once refused
        good = str(self.good_after_lift)
        first_good = a["versions"].get(good, {}).get("first_t")
        a["after_lift"]["serving_s"] = None if first_good is None or a["lift_t"] is None else \
            round(first_good - a["lift_t"], 3)

    def targets(self, a, env):
        bad = str(self.bad_version)
        served_bad = a["versions"].get(bad, {}).get("count", 0)
        return [
            target("the bad version was refused by sync on every instance", a["detect_s"] is not None,
                   a["detect_s"], "sync outcome failed/skipped, the old version stays live"),
            target("the serving version never changes to the bad one", served_bad == 0, served_bad,
                   f"0 answers from v{bad}"),
            target("zero failed requests", a["failures"]["total"] == 0, a["failures"]["total"], "0"),
            target(f"a good v{self.good_after_lift} goes live after the lift", a["after_lift"]["serving_s"] is not None,
                   a["after_lift"]["serving_s"], f"clients answered by v{self.good_after_lift}"),
        ]

    bad_version = 2


class BadModel(_MirrorScenario):
    name = "bad-model"
    title = "a new version that loads but fails the smoke inference"

    def inject(self, env):
        self.write_version(env, 2, bad=True)
        env.mark("fault", action="publish v2 (loads, every inference fails)")
        self.publish(env, 2)
        self.sync(env)


class CorruptArtifact(_MirrorScenario):
    name = "corrupt-artifact"
    title = "a published object altered after publish"

    def inject(self, env):
        self.write_version(env, 2)
        self.publish(env, 2)
        client = s3x.make_client(env.settings.s3)
        bucket = env.settings.s3.bucket
        key = s3x.object_key(env.settings.s3, self.model, 2, "model.py")
        head = client.head_object(Bucket=bucket, Key=key)
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read() + b"\n# tampered after publish\n"
        env.mark("fault", action=f"overwrite s3://{bucket}/{key} keeping its metadata (sha256)")
        client.put_object(Bucket=bucket, Key=key, Body=body, Metadata=head.get("Metadata", {}),
                          ServerSideEncryption=env.settings.s3.sse)
        self.sync(env)


class S3Outage(_MirrorScenario):
    name = "s3-outage"
    title = "the S3 endpoint stops during a publish and sync"
    good_after_lift = 2
    bad_version = -1  # no bad version: the outage must not change what serves

    def inject(self, env):
        self.write_version(env, 2)
        env.mark("fault", action="S3 endpoint stops (connections refused)")
        env.stop_s3_proxy()
        try:
            self.publish(env, 2)
            env.extra["publish_during_outage"] = "succeeded (unexpected)"
        except Exception as e:  # noqa: BLE001 - the expected outcome
            env.extra["publish_during_outage"] = f"refused: {type(e).__name__}: {str(e)[:160]}"
            env.mark("publish_refused", error=type(e).__name__)
        self.sync(env)

    def lift(self, env):
        env.mark("lift", action="S3 endpoint back; publish v2 again and sync")
        env.start_s3_proxy()
        self.publish(env, 2)
        self.sync(env, "sync_after_lift")

    def targets(self, a, env):
        lo, hi = a["fault_t"], a["lift_t"]
        during = {v: d for v, d in a["versions"].items() if d["first_t"] is not None and lo <= d["first_t"] <= hi}
        return [
            target("publish during the outage refused", env.extra.get("publish_during_outage", "").startswith("refused"),
                   env.extra.get("publish_during_outage"), "PublishError, nothing half-published"),
            target("sync during the outage changes nothing", a["detect_s"] is not None, a["detect_s"],
                   "sync skipped (unreachable), the live version keeps serving"),
            target("no new version starts serving during the outage", not during, sorted(during),
                   "no version first seen between fault and lift"),
            target("zero failed requests", a["failures"]["total"] == 0, a["failures"]["total"], "0"),
            target("v2 goes live after the lift", a["after_lift"]["serving_s"] is not None,
                   a["after_lift"]["serving_s"], "clients answered by v2"),
        ]


def _summary(out: dict, model: str) -> dict:
    """sync_all's answer reduced to {instance: "status vN (reason)"} for the events table."""
    res = {}
    for inst, models in (out or {}).items():
        star = models.get("*") or {}
        d = star if star.get("status") == "skipped" else (models.get(model) or star)
        reason = (d.get("reason") or "")[:100]
        res[inst] = f"{d.get('status')} v{d.get('version')} live=v{d.get('live')}" + (f" ({reason})" if reason else "")
    return res


def _all_refused(outcome) -> bool:
    if not isinstance(outcome, dict) or not outcome:
        return False
    return all(str(v).startswith(("failed", "skipped")) for v in outcome.values())


def _wait_weights(env, want: dict[str, int], timeout: float) -> None:
    rt = env.runtime()
    deadline = time.monotonic() + timeout
    while True:
        try:
            st = {(s.backend, s.server): s.weight for s in rt.servers()}
            if all(st.get((be, n)) == w for be in ALL_BACKENDS for n, w in want.items()):
                return
        except Exception:  # noqa: BLE001
            st = {}
        if time.monotonic() > deadline:
            raise RuntimeError(f"HAProxy weights did not reach {want} within {timeout:g}s (now {st})")
        time.sleep(0.1)


SCENARIOS: dict[str, type[Scenario]] = {s.name: s for s in (
    OnpremCrash, OnpremHang, OnpremPartition, CloudLatency, S3Outage, BadModel, CorruptArtifact, ControlCrash,
    HAProxyRestart, QueryOfDeath)}


def get(name: str) -> Scenario:
    try:
        return SCENARIOS[name]()
    except KeyError:
        raise KeyError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}") from None
