"""The rollout job: every `control.rollout.interval_s` one tick of the rollout controller
(control/rollout/controller.py: S3 desired state, agent statuses, canary analysis, waves), then
what the agents report exported as metrics: the version live per instance and model, and how far
each is behind its desired version. The work is the controller's; this job only schedules and exports."""
from __future__ import annotations

import time

from control.daemon.jobs import Scheduled
from control.daemon.metrics import ControlMetrics
from control.daemon.registry import Registry
from control.leader.gate import Gate
from control.rollout.controller import RolloutController, from_settings


class RolloutJob:
    name = "rollout"

    def __init__(self, settings, metrics: ControlMetrics, clock=time.time,
                 controller: RolloutController | None = None, registry: Registry | None = None,
                 gate: Gate | None = None):
        self.settings = settings
        self.gate = gate or Gate()
        self.registry = registry
        self.metrics = metrics
        self.clock = clock
        # The registry's canary weights: a canary's HAProxy share follows the rollout (traffic job).
        # Every desired-state write carries the lease generation; standby: NotLeader, nothing written.
        self.controller = controller or from_settings(settings, registry=metrics.registry, clock=clock,
                                                      weight_hook=registry.set_canary_weight if registry else None,
                                                      generation=self.gate.fencing_token)
        self.last_tick: dict | None = None

    def schedule(self) -> list[Scheduled]:
        return [Scheduled("rollout", self.tick, self.settings.control.rollout.interval_s)]

    def tick(self) -> list:
        if not self.gate.acting():  # standby: the leader's rollouts are in S3 (GET /v1/rollouts reads them)
            self.last_tick = {"at": self.clock(), "transitions": [], "problems": [], "standby": True}
            return []
        transitions = self.controller.tick()
        now = self.clock()
        self.last_tick = {"at": now, "transitions": [t.to_dict() for t in transitions],
                          "problems": list(self.controller.last_problems)}
        self.metrics.last_rollout_tick.set(now)
        self.export(self.controller.last_statuses)
        if self.registry is not None and self.settings.control.rollout.enabled:
            self.registry.set_canary_weights(self.controller.canary_weights())
        return transitions

    def export(self, statuses) -> None:
        for name, st in statuses.items():
            for model, r in st.models.items():
                live, target = r.get("live"), r.get("target")
                self.metrics.live_version.labels(name, model).set(live if isinstance(live, int) else 0)
                if isinstance(target, int):
                    self.metrics.version_lag.labels(name, model).set(target - live if isinstance(live, int) else target)

    def close(self) -> None:
        self.controller.close()
