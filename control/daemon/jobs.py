"""What the daemon schedules: each job names its scheduled functions and their intervals."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol


@dataclass(frozen=True)
class Scheduled:
    id: str                       # the APScheduler job id, also the log name
    fn: Callable[[], object]
    interval_s: float


class Job(Protocol):
    name: str

    def schedule(self) -> list[Scheduled]: ...

    def close(self) -> None: ...


class DecisionJob:
    """What a deciding job (traffic, capacity) holds: the settings, the instance registry, the
    audit its decisions go to, the metrics it exports and the clock it decides with (injected)."""

    def __init__(self, settings, registry, audit, metrics, clock: Callable[[], float]):
        self.settings = settings
        self.registry = registry
        self.audit = audit
        self.metrics = metrics
        self.clock = clock
