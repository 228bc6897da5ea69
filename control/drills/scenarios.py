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

import requests
from prometheus_client.parser import text_string_to_metric_families

from control.adapters import s3 as s3x
from control.adapters.haproxy_config import ALL_BACKENDS
from control.config import deep_merge
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
from control.mirror.publish import publish_version
from control.waiting import wait_until


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
    """Model-version drills on the issue-14 path: every instance is a host (its agent beside its
    Triton, fed from the S3 mirror); the drill only publishes (control/mirror/publish.py) and the
    control daemon's rollout job (control/rollout/controller.py) moves the version through canary ->
    analysis -> promotion waves, or rolls it back with a reason. The load calls the drill's `add_one`
    model, whose answers carry the version that served them.

    A canary is compared with a stable instance of its own site, so the drill stack gets a second
    instance in the site of the first one when no site has two (`baseline_instance`)."""
    target_site = "mirror"
    needs_control = True  # the daemon's RolloutJob ticks the rollout controller
    model = "add_one"
    fault_at, lift_at = 0.2, 0.55
    good_after_lift = 3
    bad_version = 2
    # control.rollout for drills: a rollout in seconds, not minutes (the defaults judge a canary for
    # 60 s). The daemon has no weight hook yet, so canary weights are not stepped (step 0). The
    # latency check only catches gross regressions here: add_one answers in ~1 ms, and one scheduling
    # hiccup of a shared 2-core box moved a 2-s mean by x5.67 and rolled a good version back
    # (measured); the error-rate check stays at its default.
    rollout = {"interval_s": 0.5, "analysis_window_s": 3.0, "min_requests": 20, "canary_instances": 1,
               "canary_step_weight": 0, "max_failed_checks": 3, "max_latency_ratio": 20.0, "wave_size": 1,
               "progress_deadline_s": 30.0, "status_stale_s": 10.0}
    agent_interval_s = 0.5         # agent.interval_s: each host reads the desired state this often
    rollout_timeout_s = 90.0       # publish -> rolled back / all live, before the drill gives up
    tail_s = 3.0

    def prepare(self, base, run_dir, repository, *, weights=None, with_control=None, **_):
        src = Path(run_dir) / "source-repo"
        src.mkdir(parents=True, exist_ok=True)
        if Path(repository).is_dir():
            shutil.copytree(repository, src, dirs_exist_ok=True, symlinks=True)
        if not (src / self.model / "1").is_dir():
            write_add_one_repository(src)
        base = baseline_instance(base)
        control = deep_merge(self.control_overrides(base, weights), {"rollout": self.rollout})
        settings = drill_settings(base, run_dir, weights=weights, control=control)
        settings = settings.model_copy(update={
            "s3": settings.s3.model_copy(update={"retry_attempts": 2, "retry_base_delay_s": 0.5}),
            "agent": settings.agent.model_copy(update={"interval_s": self.agent_interval_s})})
        env = DrillEnv(settings, src, with_control=self.needs_control if with_control is None else with_control)
        if not env.with_control:
            raise DrillSkip(f"{self.name} needs the control daemon: its rollout job moves the published version "
                            "(run without --no-control)")
        env.with_s3 = True
        env.spec = add_one_spec()
        return env

    def ready(self, env):
        """Every agent reports the seeded stable version live before the load starts."""
        want = {i.name for i in env.settings.instances}

        def all_live():
            st = _rollout_status(env, self.model)
            live = {n for n, s in st["instances"].items() if s.get("live") == st["stable"]}
            return st if st["stable"] is not None and want <= live else None
        st = wait_until(all_live, 60, f"every agent reporting {self.model}'s stable version live", interval=0.2)
        env.extra["initial"] = f"{self.model} stable v{st['stable']} live on {', '.join(sorted(want))}"
        env.extra["rollouts"] = {}
        env.notes.append(f"rollout config: control.rollout {self.rollout}; agent.interval_s {self.agent_interval_s}")

    # helpers
    def write_version(self, env, version: int, bad: bool = False) -> None:
        src = env.repository / self.model
        vdir = src / str(version)
        vdir.mkdir(parents=True, exist_ok=True)
        if bad:
            (vdir / "model.py").write_text(BAD_MODEL)
        else:
            # Same behaviour, new bytes (as a new version's weights would be): an agent must download
            # it, not hard-link the copy of v1 it holds already (control/agent/pull.py local_copies).
            (vdir / "model.py").write_text((src / "1" / "model.py").read_text() + f"\n# version {version}\n")

    def publish(self, env, version: int) -> None:
        """Publish `version` (raises PublishError when S3 refuses it); rollout times count from the
        start of the publish."""
        t = env.now()
        r = publish_version(env.settings, env.repository, self.model, version)
        env.mark("published", version=version, status=r.status, took_s=round(env.now() - t, 2))
        env.extra["rollouts"].setdefault(version, {})["published_t"] = round(t, 3)

    def await_rollout(self, env, version: int) -> dict:
        """Until the rollout of `version` ends (done, rolled back or stopped), read through the
        daemon's admin API (/v1/rollouts: desired state in S3 + the audit). Every audit row becomes a
        `rollout` event at its own time; what a canary's agent records as failed is kept. Returns the
        rollout's summary (env.extra["rollouts"][version])."""
        ro = env.extra["rollouts"].setdefault(version, {})
        seen = env.extra.setdefault("audit_ids", set())

        def poll():
            env.keep_load()  # the analysis judges the canary on live traffic
            st = _rollout_status(env, self.model)
            offset = time.time() - env.now()  # audit rows carry wall-clock time
            for row in st["history"]:
                if row["id"] in seen:
                    continue
                seen.add(row["id"])
                t = row["ts"] - offset
                env.events.append((t, "rollout", {"version": row["version"], "to": row["to_phase"],
                                                  "reason": row["reason"], "message": row["message"][:200]}))
                env.say(f"  t={t:6.2f}s rollout v{row['version']} {row['from_phase']} -> {row['to_phase']} "
                        f"({row['reason']}): {row['message'][:160]}")
                if row["version"] == version:
                    ro.setdefault(f"{row['to_phase']}_t", round(t, 3))
                    if row["to_phase"] in TERMINAL_PHASES:
                        ro.update(phase=row["to_phase"], reason=row["reason"], message=row["message"])
            for name, s in st["instances"].items():
                if s.get("target") == version and s.get("state") in ("failed", "refused"):
                    ro.setdefault("agent_failures", {})[name] = f"{s.get('kind')}: {s.get('error')}"
            rejected = st["rejected"].get(str(version)) or st["rejected"].get(version)
            if rejected:
                ro["rejected"] = rejected["reason"]
            ro["live_on"] = sorted(n for n, s in st["instances"].items() if s.get("live") == version)
            return ro if ro.get("phase") in TERMINAL_PHASES else None

        wait_until(poll, self.rollout_timeout_s, f"the rollout of {self.model} v{version} to end", interval=0.2)
        env.mark(f"rollout_{ro['phase']}", version=version, reason=ro["reason"],
                 took_s=round(env.now() - ro["published_t"], 2) if "published_t" in ro else None)
        return ro

    def lift(self, env):
        v = self.good_after_lift
        env.mark("lift", action=f"publish a good v{v}; the rollout takes it to every instance")
        self.write_version(env, v)
        self.publish(env, v)
        self.await_rollout(env, v)

    def after(self, env):
        env.events.sort(key=lambda e: e[0])

    def figures(self, a, env):
        ros = env.extra.get("rollouts", {})
        rollouts = {}
        for v, ro in sorted(ros.items()):
            pub = ro.get("published_t")

            def since(key, pub=pub, ro=ro):
                return None if pub is None or ro.get(key) is None else round(ro[key] - pub, 3)
            rollouts[str(v)] = {
                "phase": ro.get("phase"), "reason": ro.get("reason"), "message": ro.get("message"),
                "rejected": ro.get("rejected"), "agent_failures": ro.get("agent_failures", {}),
                "live_on": ro.get("live_on", []),
                "canary_live_s": since("analysis_t"), "analysis_done_s": since("promoting_t"),
                "all_live_s": since("done_t"), "rolled_back_s": since("rolled_back_t")}
        a["rollout"] = rollouts
        bad = rollouts.get(str(self.bad_version), {})
        a["detect_s"] = bad.get("rolled_back_s")
        a["recovery_s"] = a["detect_s"]  # the old version never stopped serving: recovered once rolled back
        good = str(self.good_after_lift)
        first_good = a["versions"].get(good, {}).get("first_t")
        a["after_lift"]["serving_s"] = None if first_good is None or a["lift_t"] is None else \
            round(first_good - a["lift_t"], 3)
        a["detect_what"] = f"publish of v{self.bad_version} -> rolled back"

    def _good_after_lift(self, a, env) -> dict:
        v = self.good_after_lift
        ro = a["rollout"].get(str(v), {})
        n = len(env.settings.instances)
        ok = ro.get("phase") == "done" and len(ro.get("live_on", [])) == n and a["after_lift"]["serving_s"] is not None
        return target(f"a good v{v} goes live on every instance after the lift", ok, ro.get("all_live_s"),
                      f"rollout done (publish -> all {n} live, s; live on {', '.join(ro.get('live_on', [])) or '-'}), "
                      f"clients answered by v{v}")

    def _never_served(self, a) -> dict:
        bad = str(self.bad_version)
        served_bad = a["versions"].get(bad, {}).get("count", 0)
        return target(f"v{bad} never answers a client", served_bad == 0, served_bad, f"0 answers from v{bad}")

    def _rolled_back(self, a, what: str, kinds: tuple[str, ...]) -> dict:
        ro = a["rollout"].get(str(self.bad_version), {})
        failures = ro.get("agent_failures", {})
        ok = (ro.get("phase") == "rolled_back" and bool(ro.get("rejected"))
              and any(f.split(":", 1)[0] in kinds for f in failures.values()))
        detail = "; ".join(f"{n}: {f[:120]}" for n, f in failures.items()) or "no agent failure seen"
        return target(what, ok, a["detect_s"],
                      f"rolled back with a reason (publish -> rolled back, s); canary agent: {detail}; "
                      f"rejected: {(ro.get('rejected') or '-')[:160]}")

    def targets(self, a, env):
        return [
            self._rolled_back(a, f"the canary's smoke check fails v{self.bad_version}; the rollout rolls it back",
                              ("smoke",)),
            self._never_served(a),
            target("zero failed requests", a["failures"]["total"] == 0, a["failures"]["total"], "0"),
            self._good_after_lift(a, env),
        ]


class BadModel(_MirrorScenario):
    name = "bad-model"
    title = "a new version that loads but fails the smoke inference"

    def inject(self, env):
        self.write_version(env, 2, bad=True)
        env.mark("fault", action="publish v2 (loads, every inference fails)")
        self.publish(env, 2)
        self.await_rollout(env, 2)


class CorruptArtifact(_MirrorScenario):
    name = "corrupt-artifact"
    title = "a published object altered after publish"

    def inject(self, env):
        self.write_version(env, 2)
        # Altered milliseconds after the publish returns: before the canary's agent can pull it
        # (a rollout tick, then an agent pass, each every 0.5 s). Should the agent ever win that
        # race, v2 serves and the drill fails: `published` and `fault` times are in the events.
        self.publish(env, 2)
        client = s3x.make_client(env.settings.s3)
        bucket = env.settings.s3.bucket
        key = s3x.object_key(env.settings.s3, self.model, 2, "model.py")
        head = client.head_object(Bucket=bucket, Key=key)
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read() + b"\n# tampered after publish\n"
        env.mark("fault", action=f"overwrite s3://{bucket}/{key} keeping its metadata (sha256)")
        client.put_object(Bucket=bucket, Key=key, Body=body, Metadata=head.get("Metadata", {}),
                          ServerSideEncryption=env.settings.s3.sse)
        self.await_rollout(env, 2)

    def targets(self, a, env):
        return [
            self._rolled_back(a, "the canary's agent refuses the tampered v2 (size/sha256); the rollout rolls it back",
                              ("verify",)),
            self._never_served(a),
            target("zero failed requests", a["failures"]["total"] == 0, a["failures"]["total"], "0"),
            self._good_after_lift(a, env),
        ]


class S3Outage(_MirrorScenario):
    name = "s3-outage"
    title = "the S3 endpoint stops during a publish; agents and the rollout carry on after it"
    good_after_lift = 2
    bad_version = -1  # no bad version: the outage must not change what serves

    def inject(self, env):
        self.write_version(env, 2)
        before = {i.name: agent_metrics(i)["desired_errors"] for i in env.settings.instances}
        env.mark("fault", action="S3 endpoint stops (connections refused)")
        env.stop_s3_proxy()
        try:
            self.publish(env, 2)
            env.extra["publish_during_outage"] = "succeeded (unexpected)"
        except Exception as e:  # noqa: BLE001 - the expected outcome
            env.extra["publish_during_outage"] = f"refused: {type(e).__name__}: {str(e)[:160]}"
            env.mark("publish_refused", error=type(e).__name__)

        # Every agent notices (a desired-state read fails: converge_errors_total{kind="desired"}
        # rises) and keeps serving what is live.
        def all_noticed():
            env.keep_load()
            now = {i.name: agent_metrics(i) for i in env.settings.instances}
            if all(m["desired_errors"] > before[n] for n, m in now.items()):
                return {n: m["live"] for n, m in now.items()}
            return None
        live = wait_until(all_noticed, 30, "every agent counting a failed desired-state read", interval=0.2)
        env.extra["live_during_outage"] = live
        env.mark("agents_unreachable", live=live, action="every agent: desired state unreadable, nothing changed")

    def lift(self, env):
        env.mark("lift", action="S3 endpoint back; publish v2 again; the rollout takes it to every instance")
        env.start_s3_proxy()
        self.publish(env, 2)
        self.await_rollout(env, 2)

    def figures(self, a, env):
        super().figures(a, env)
        t = next((t for t, n, _ in env.events if n == "agents_unreachable"), None)
        a["detect_s"] = None if t is None or a["fault_t"] is None else round(t - a["fault_t"], 3)
        a["recovery_s"] = a["detect_s"]
        a["detect_what"] = "S3 stops -> every agent reports the desired state unreadable"

    def targets(self, a, env):
        lo, hi = a["fault_t"], a["lift_t"]
        during = {v: d for v, d in a["versions"].items() if d["first_t"] is not None and lo <= d["first_t"] <= hi}
        live = env.extra.get("live_during_outage") or {}
        return [
            target("publish during the outage refused", env.extra.get("publish_during_outage", "").startswith("refused"),
                   env.extra.get("publish_during_outage"), "PublishError, nothing half-published"),
            target("every agent sees the outage and keeps serving the live version",
                   a["detect_s"] is not None and bool(live) and all(v == 1 for v in live.values()), a["detect_s"],
                   f"desired state unreadable on every agent, v1 still live ({live})"),
            target("no new version starts serving during the outage", not during, sorted(during),
                   "no version first seen between fault and lift"),
            target("zero failed requests", a["failures"]["total"] == 0, a["failures"]["total"], "0"),
            self._good_after_lift(a, env),
        ]


TERMINAL_PHASES = ("done", "rolled_back", "stopped")


def baseline_instance(base):
    """`base` with a second instance in the first instance's site when no site has two (a canary is
    judged against a stable instance of its own site). Its ports are placeholders: drill_settings
    gives every instance free ones."""
    sites = [i.site for i in base.instances]
    if any(sites.count(s) >= 2 for s in sites):
        return base
    first = base.instances[0]
    n = 2
    while any(i.name == f"{first.site}-{n}" for i in base.instances):
        n += 1
    twin = first.model_copy(update={"name": f"{first.site}-{n}"})
    return base.model_copy(update={"instances": [*base.instances, twin]})


def agent_metrics(inst, model: str = "add_one") -> dict:
    """From the instance agent's /metrics: failed desired-state reads so far, the model's live
    version (0: none) and the bytes it pulled from S3."""
    r = requests.get(f"{inst.agent_url}/metrics", timeout=2.0)
    r.raise_for_status()
    out = {"desired_errors": 0.0, "live": 0, "pulled_bytes": 0.0}
    for fam in text_string_to_metric_families(r.text):
        for smp in fam.samples:
            if smp.name == "triton_hybrid_agent_converge_errors_total" and smp.labels.get("kind") == "desired":
                out["desired_errors"] = smp.value
            elif smp.name == "triton_hybrid_agent_model_live_version" and smp.labels.get("model") == model:
                out["live"] = int(smp.value)
            elif smp.name == "triton_hybrid_agent_pulled_bytes_total":
                out["pulled_bytes"] = smp.value
    return out


def _rollout_status(env, model: str) -> dict:
    """The daemon's view of one model (GET /v1/rollouts/<model>): stable, canary, phase, rejected
    versions, every agent's report, the last audit rows."""
    return env.control_api("GET", f"/v1/rollouts/{model}")["models"][model]


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
