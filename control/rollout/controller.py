"""The rollout loop: gather snapshots, call the pure `step`, write its decision to S3 desired state
with a conditional write, then hand weights to a hook, and record the transition (audit row in
SQLite, Prometheus counter, log line). Thin on purpose: every decision is in control/rollout/phases.py.

State lives in S3 (`models[m].canary.rollout`, `models[m].rejected`); a restarted controller, or
the standby site's, reads it back and carries on. The SQLite `rollouts` table is only the audit.

The daemon runs `RolloutController.tick()` every `control.rollout.interval_s`; the CLI and the admin
API call `command(model, Command(...))` and `status(model)`.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor

import requests
from prometheus_client import CollectorRegistry, Counter, Gauge

from control.adapters import s3 as s3x
from control.mirror.desired import (
    DesiredState,
    DesiredStore,
    InstanceStatus,
    ModelState,
    Read,
)
from control.mirror.publish import PublishedIndex, list_models
from control.rollout.analysis import MetricWindow
from control.rollout.audit import RolloutAudit
from control.rollout.phases import (
    Command,
    Inputs,
    Phase,
    RolloutState,
    SetCanaryWeight,
    Transition,
    apply,
    state_of,
    step,
)
from control.rollout.signals import ModelSample, parse_models, window
from control.traffic.triton_metrics import MetricsError

log = logging.getLogger("triton_hybrid.rollout")

# (model, since, statuses, now) -> {instance: MetricWindow} for that model
WindowSource = Callable[[str, float, Mapping[str, InstanceStatus], float], Mapping[str, MetricWindow]]
# (model, instance, site, since, until, version) -> the instance's window on `version` in [since, until]
BaselineSource = Callable[[str, str, str, float, float, int | None], MetricWindow | None]
# (model, instance, weight in % of the instance's own weight) -> None
WeightHook = Callable[[str, str, int], None]


class RolloutMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()
        p = "triton_hybrid_"
        self.transitions = Counter(p + "rollout_transitions", "Rollout transitions and events by reason",
                                   ["model", "from", "to", "reason"], registry=r)
        self.phase = Gauge(p + "rollout_phase", "1 for the model's current rollout phase", ["model", "phase"],
                           registry=r)
        self.failed_checks = Gauge(p + "rollout_failed_checks", "Failed analysis checks of the current rollout",
                                   ["model"], registry=r)
        self.errors = Counter(p + "rollout_errors", "Rollout ticks that failed (S3, fencing, hook)", ["model", "kind"],
                              registry=r)

    def set_phase(self, model: str, st: RolloutState | None) -> None:
        current = st.phase if st is not None and st.phase not in (Phase.DONE, Phase.ROLLED_BACK) else Phase.IDLE
        for ph in Phase:
            self.phase.labels(model, str(ph)).set(1 if ph == current else 0)
        self.failed_checks.labels(model).set(st.failed_checks if st is not None and current != Phase.IDLE else 0)


class MetricsCollector:
    """Scrapes each agent-registered instance's `metrics_url` (InstanceStatus.metrics_url) and keeps
    per-model samples long enough to cut analysis windows from them."""

    def __init__(self, timeout_s: float, keep_s: float, clock: Callable[[], float] = time.time):
        self.timeout_s, self.keep_s, self.clock = timeout_s, keep_s, clock
        self._samples: dict[str, deque[tuple[float, dict[str, ModelSample]]]] = {}
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="rollout-scrape")
        self._local = threading.local()
        self.errors: dict[str, str] = {}

    def _get(self, url: str) -> str:
        s = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = requests.Session()
        r = s.get(url, timeout=self.timeout_s)
        if r.status_code != 200:
            raise MetricsError(f"{url} answered {r.status_code}")
        return r.text

    def scrape(self, statuses: Mapping[str, InstanceStatus]) -> None:
        now = self.clock()
        targets = {n: st.metrics_url for n, st in statuses.items() if st.metrics_url}
        futures = {n: self._pool.submit(self._get, url) for n, url in targets.items()}
        for name, f in futures.items():
            try:
                parsed = parse_models(f.result(timeout=self.timeout_s * 2 + 1))
            except (requests.RequestException, MetricsError, TimeoutError) as e:
                self.errors[name] = f"{type(e).__name__}: {e}"
                continue
            self.errors.pop(name, None)
            q = self._samples.setdefault(name, deque())
            q.append((now, parsed))
            while q and q[0][0] < now - self.keep_s:
                q.popleft()
        for gone in set(self._samples) - set(statuses):
            del self._samples[gone]

    def windows(self, model: str, since: float, statuses: Mapping[str, InstanceStatus],
                now: float) -> dict[str, MetricWindow]:
        out = {}
        for name, q in self._samples.items():
            st = statuses.get(name)
            if st is None:
                continue
            series = [(t, s[model]) for t, s in q if model in s]
            w = window(series, since, name, st.site, (st.models.get(model) or {}).get("live"))
            if w is not None:
                out[name] = w
        return out

    def baseline(self, model: str, instance: str, site: str, since: float, until: float,
                 version: int | None) -> MetricWindow | None:
        """The instance's own window on `version` between `since` and `until` (a "self" baseline:
        the stable version it served before its canary switch)."""
        q = self._samples.get(instance) or ()
        series = [(t, s[model]) for t, s in q if model in s]
        return window(series, since, instance, site, version, until=until)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class RolloutController:
    """One rollout machine per model, driven by `tick()`; operator commands through `command()`."""

    def __init__(self, store: DesiredStore, cfg, *, published: Callable[[str], list[int]],
                 models: Callable[[], list[str]] | None = None, expected: Callable[[], list[str]] | None = None,
                 audit: RolloutAudit | None = None,
                 windows: WindowSource | None = None, collector: MetricsCollector | None = None,
                 baselines: BaselineSource | None = None,
                 weight_hook: WeightHook | None = None, registry: CollectorRegistry | None = None,
                 by: str = "rollout-controller", generation: Callable[[], int] | int = 0,
                 clock: Callable[[], float] = time.time):
        self.store, self.cfg, self.audit = store, cfg, audit
        self.published, self.list_models = published, models or (lambda: [])
        self.expected = expected or (lambda: [])
        self.collector = collector
        self.windows = windows or (collector.windows if collector is not None else None)
        self.baselines = baselines or (collector.baseline if collector is not None else None)
        self.weight_hook, self.by, self.clock = weight_hook, by, clock
        self._generation = generation
        self.metrics = RolloutMetrics(registry)
        self.lock = threading.Lock()
        self.last_problems: list[str] = []
        self.last_statuses: dict[str, InstanceStatus] = {}  # what the agents reported at the last tick
        self.last_desired: DesiredState | None = None        # the desired state the last tick left
        self._written: DesiredState | None = None  # what the last _run left in S3

    @property
    def generation(self) -> int:
        return self._generation() if callable(self._generation) else self._generation

    # ---- one pass ----------------------------------------------------------------------------------
    def tick(self) -> list[Transition]:
        """Decide and apply once for every model (in desired state or published); returns the
        transitions. A failure on one model is logged and counted; the others still run.
        With `enabled: false` it does nothing (operator commands still work)."""
        if not self.cfg.enabled:
            return []
        with self.lock:
            now = self.clock()
            statuses, self.last_problems = self.store.statuses()
            self.last_statuses = statuses
            for p in self.last_problems:
                log.warning("agent status skipped: %s", p)
            read = self.store.read()
            desired = read.state
            models = sorted(set(desired.models) | set(self.list_models()))
            states = {m: state_of(desired.models.get(m), now) for m in models}
            if self.collector is not None and statuses:
                # Every tick, not only during an analysis: a "self" baseline is the canary's own
                # history from before its switch, and a window needs two scrapes.
                self.collector.scrape(statuses)
            out = []
            for m in models:
                try:
                    t = self._run(m, now, statuses, states[m], (), current=read)
                    if read is not None and self._written is not read.state:
                        read = None  # S3 changed: the next model reads it again
                except Exception as e:  # noqa: BLE001 - one model's failure must not stop the others
                    read = None  # what S3 holds now is unknown: the next model reads it
                    self.metrics.errors.labels(m, type(e).__name__).inc()
                    log.error("rollout of %s: %s: %s", m, type(e).__name__, e)
                    continue
                if t is not None:
                    out.append(t)
            self.last_desired = self._written if self._written is not None else desired
            return out

    def canary_weights(self) -> dict[str, int]:
        """{instance: % of its own share} of the canaries whose traffic the rollouts manage now (the
        canary or analysis phase), per the desired state the last tick left. The whole truth, from
        S3: a restarted daemon gets the weights back, and a rollout ended from the CLI releases them."""
        d = self.last_desired
        out: dict[str, int] = {}
        for ms in (d.models.values() if d is not None else []):
            st = state_of(ms, self.clock())
            if st is not None and st.phase in (Phase.CANARY, Phase.ANALYSIS) and st.weight is not None:
                out |= {c: st.weight for c in st.canaries}
        return out

    def command(self, model: str, cmd: Command) -> Transition | None:
        """Apply one operator command through the machine (start, pause, resume, promote, abort,
        rollback). Raises phases.CommandError when it cannot apply; nothing is written then."""
        with self.lock:
            now = self.clock()
            return self._run(model, now, {}, None, (cmd,))

    def _run(self, model: str, now: float, statuses: Mapping[str, InstanceStatus], hint: RolloutState | None,
             commands: tuple, current: Read | None = None) -> Transition | None:
        published = tuple(self.published(model))
        windows: Mapping[str, MetricWindow] = {}
        baselines: dict[str, MetricWindow] = {}
        if not commands and hint is not None and hint.phase == Phase.ANALYSIS and self.windows is not None:
            since = max(now - self.cfg.analysis_window_s, hint.analysis_since or now)
            windows = self.windows(model, since, statuses, now)
            if hint.baseline == "self" and self.baselines is not None and hint.switched_at is not None:
                for c in hint.canaries:
                    site = statuses[c].site if c in statuses else "?"
                    w = self.baselines(model, c, site, hint.switched_at - self.cfg.analysis_window_s,
                                       hint.switched_at, hint.from_version)
                    if w is not None:
                        baselines[c] = w
        expected = tuple(self.expected())
        decided: dict = {}

        def change(d: DesiredState) -> DesiredState | None:
            # Re-run on every attempt: after a lost race the decision is made again on what S3 holds now.
            ms = d.models.get(model) or ModelState()
            st = state_of(d.models.get(model), now)
            new, actions, tr = step(st, Inputs(model, ms, statuses, windows, published, commands, expected,
                                               baselines), self.cfg, now)
            decided.update(old=st, new=new, actions=actions, transition=tr)
            if new == st and not actions:
                return None
            by = commands[0].by if commands else self.by
            return apply(d, model, new, actions, by, now)

        written = self.store.update(change, by=commands[0].by if commands else self.by,
                                    generation=self.generation, clock=lambda: now, current=current)
        self._written = written
        tr: Transition | None = decided.get("transition")
        hook_error = None
        for a in decided.get("actions", []):
            if isinstance(a, SetCanaryWeight) and self.weight_hook is not None:
                try:
                    self.weight_hook(model, a.instance, a.weight)
                except Exception as e:  # noqa: BLE001 - a weight is advisory; the rollout goes on
                    hook_error = f"weight {a.instance}={a.weight}%: {type(e).__name__}: {e}"
                    self.metrics.errors.labels(model, "weight_hook").inc()
                    log.error("rollout of %s: %s", model, hook_error)
        self.metrics.set_phase(model, decided.get("new"))
        if tr is not None:
            self.metrics.transitions.labels(model, str(tr.from_phase), str(tr.to_phase), str(tr.reason)).inc()
            if self.audit is not None:
                self.audit.record(tr, written.revision, hook_error)
            log.info("rollout %s v%d: %s -> %s (%s): %s", model, tr.version, tr.from_phase, tr.to_phase, tr.reason,
                     tr.message)
        return tr

    # ---- read side ----------------------------------------------------------------------------------
    def status(self, model: str | None = None, history: int = 10) -> dict:
        """{model: {...}}: stable, canary, the rollout's phase and reason, rejected versions with reasons
        (all from S3), what each agent reports for the model, and the last audit rows (if any)."""
        now = self.clock()
        first = self.store.read() if model is None else None
        models = [model] if model else sorted(first.state.models)
        # The audit rows before the desired state: a transition is written to S3 first and to the
        # audit after, so every row read here has its state in the read below (If-None-Match: a
        # 304 when nothing changed in between).
        histories = {m: self.audit.history(m, history) if self.audit is not None else [] for m in models}
        desired = self.store.read(first).state
        statuses, problems = self.store.statuses()
        out = {}
        for m in models:
            ms = desired.models.get(m) or ModelState()
            st = state_of(desired.models.get(m), now)
            out[m] = {
                "stable": ms.stable,
                "canary": ({"version": ms.canary.version, "instances": ms.canary.instances}
                           if ms.canary is not None else None),
                "phase": str(st.phase) if st is not None else str(Phase.IDLE),
                "rollout": st.model_dump(mode="json") if st is not None else None,
                "rejected": {v: r.model_dump() for v, r in sorted(ms.rejected.items())},
                "instances": {n: {"site": s.site, "age_s": round(now - s.at, 1), **(s.models.get(m) or {})}
                              for n, s in sorted(statuses.items())},
                "history": histories[m],
            }
        return {"revision": desired.revision, "models": out, "problems": problems}

    def close(self) -> None:
        if self.collector is not None:
            self.collector.close()
        if self.audit is not None:
            self.audit.close()


def from_settings(settings, *, registry: CollectorRegistry | None = None, weight_hook: WeightHook | None = None,
                  generation: Callable[[], int] | int = 0, by: str = "rollout-controller",
                  client=None, audit: bool = True, windows: WindowSource | None = None,
                  clock: Callable[[], float] = time.time) -> RolloutController:
    """The controller for a config: S3 desired state + published versions of the mirror, agents'
    metrics scraped at their registered metrics_url, audit in the control plane's SQLite."""
    cfg = settings.control.rollout
    client = client or s3x.make_client(settings.s3)
    store = DesiredStore(client, settings.s3)
    # History for the analysis window, and for a "self" baseline: the window before the switch,
    # which may have started a whole canary phase (up to the progress deadline) earlier.
    collector = None if windows is not None else MetricsCollector(
        cfg.scrape_timeout_s, keep_s=2 * cfg.analysis_window_s + cfg.progress_deadline_s + 3 * cfg.interval_s,
        clock=clock)
    return RolloutController(
        store, cfg, published=PublishedIndex(client, settings.s3),
        models=lambda: list_models(client, settings.s3),
        expected=lambda: [i.name for i in settings.instances if i.agent_reports],
        audit=RolloutAudit(settings.database_path) if audit else None, collector=collector, windows=windows,
        weight_hook=weight_hook, registry=registry, by=by, generation=generation, clock=clock)
