"""The mirror job: `control.mirror.sync.sync_all(settings)` every control.sync_interval_s, and the
live version / lag per instance and model as metrics. (The host agent replaces this job.)"""
from __future__ import annotations

import time

from control.daemon.jobs import Scheduled
from control.daemon.metrics import ControlMetrics
from control.mirror import sync as mirror_sync


class MirrorJob:
    name = "mirror"

    def __init__(self, settings, metrics: ControlMetrics, clock=time.time):
        self.settings = settings
        self.metrics = metrics
        self.clock = clock
        self.last_sync: dict | None = None

    def schedule(self) -> list[Scheduled]:
        return [Scheduled("sync", self.sync, self.settings.control.sync_interval_s)]

    def sync(self) -> dict[str, dict[str, dict]]:
        result = mirror_sync.sync_all(self.settings)
        now = self.clock()
        self.last_sync = {"at": now, "result": result}
        self.metrics.last_sync.set(now)
        for inst, models in result.items():
            for model, v in models.items():
                live, pub = v.get("live"), v.get("published")
                if isinstance(live, int):
                    self.metrics.live_version.labels(inst, model).set(live)
                    if isinstance(pub, int):
                        self.metrics.sync_lag.labels(inst, model).set(pub - live)
        return result

    def close(self) -> None:
        pass
