"""The instance registry the daemon's jobs share: which instances exist (mutable at run time: the
scaler adds and removes cloud instances) and which ones the scaler is draining before removal.

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
