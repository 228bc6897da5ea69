"""The instance registry the daemon's jobs share: which instances exist (mutable at run time: the
scaler adds and removes cloud instances), which ones the scaler is draining before removal, and the
traffic share of canary instances during a rollout's analysis.

Every change is pushed to the listeners (the poller, the weight actuator) through one method,
`set_instances(instances)`; nobody is probed for attributes.
"""
from __future__ import annotations

import logging
import threading
from typing import Protocol

from control.config import InstanceConfig

log = logging.getLogger("triton_hybrid.control")


class RegistryListener(Protocol):
    def set_instances(self, instances: list[InstanceConfig]) -> None: ...


class Registry:
    def __init__(self, settings):
        self.settings = settings
        self._lock = threading.Lock()
        self._listeners: list[RegistryListener] = []
        self._draining: set[str] = set()
        self._canary: dict[str, int] = {}

    @property
    def instances(self) -> list[InstanceConfig]:
        return list(self.settings.instances)

    def subscribe(self, listener: RegistryListener) -> None:
        self._listeners.append(listener)

    def _publish(self) -> None:
        insts = list(self.settings.instances)
        for listener in self._listeners:
            listener.set_instances(insts)

    def add_instance(self, inst: InstanceConfig) -> None:
        """Register an instance at run time (ready, verified and in HAProxy already): the next
        tick polls it and gives it its share of its site's weight."""
        with self._lock:
            if any(i.name == inst.name for i in self.settings.instances):
                raise ValueError(f"instance {inst.name} is already registered")
            # A new list, never an in-place change: the sync job may be iterating the old one.
            self.settings.instances = [*self.settings.instances, inst]
            self._publish()
        log.info("registered instance %s (%s) at %s", inst.name, inst.site, inst.http_url)

    def remove_instance(self, name: str) -> None:
        with self._lock:
            self.settings.instances = [i for i in self.settings.instances if i.name != name]
            self._draining.discard(name)
            self._canary.pop(name, None)
            self._publish()
        log.info("removed instance %s from the registry", name)

    def begin_drain(self, name: str) -> None:
        with self._lock:
            self._draining.add(name)

    def end_drain(self, name: str) -> None:
        with self._lock:
            self._draining.discard(name)

    def draining(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._draining)

    def set_canary_weight(self, model: str, name: str, weight: int) -> None:
        """The rollout's weight hook: a canary instance gets `weight` % of its own share of its
        site's weight (100: back to its full share). The traffic job applies it at its next tick."""
        with self._lock:
            if weight >= 100:
                self._canary.pop(name, None)
            else:
                self._canary[name] = max(0, int(weight))
        log.info("canary weight of %s (rollout of %s): %d%%", name, model, weight)

    def set_canary_weights(self, weights: dict[str, int]) -> None:
        """Reconcile with what the rollouts in S3 say ({instance: %}): a restarted daemon gets the
        weights back; a rollout ended from the CLI (whose controller has no hook into this daemon)
        releases its canary."""
        with self._lock:
            new = {n: max(0, int(w)) for n, w in weights.items() if w < 100}
            if new != self._canary:
                log.info("canary weights %s -> %s", self._canary, new)
            self._canary = new

    def canary_weights(self) -> dict[str, int]:
        with self._lock:
            return dict(self._canary)
