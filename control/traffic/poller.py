"""Scrape every instance concurrently: readiness (`GET /v2/health/ready`) and Triton `/metrics`
(optionally a DCGM exporter), into `InstanceSnapshot`s. One `poll_once()` per scheduler tick;
each instance has its own timeout, so one slow site never delays the other.

A snapshot is one scrape's view: a readiness probe that timed out is `slow` (state degraded), one
refused or answered non-200 is `failed` (state unhealthy). Whether the instance is *down* is judged
over the last `history` snapshots (`histories()`) by control/traffic/health.py, not here."""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import requests

from control.traffic.snapshot import InstanceSnapshot, InstanceState, Probe
from control.traffic.triton_metrics import (
    MetricsError,
    Totals,
    parse,
    parse_dcgm,
    rates,
)

log = logging.getLogger(__name__)


class Poller:
    def __init__(self, instances, timeout_s: float = 0.8, dcgm_urls: dict[str, str] | None = None,
                 clock: Callable[[], float] = time.time,
                 on_result: Callable[[InstanceSnapshot, bool, float], None] | None = None, history: int = 5):
        self.instances = list(instances)
        self.timeout_s = timeout_s
        self.dcgm_urls = dict(dcgm_urls or {})
        self.clock = clock
        self.on_result = on_result  # (snapshot, scrape_error, seconds) -> None, for metrics
        self._prev: dict[str, tuple[float, Totals]] = {}
        self._history: dict[str, deque[InstanceSnapshot]] = {}
        self.history_size = max(1, history)
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(self.instances) * 2), thread_name_prefix="poll")
        self._local = threading.local()

    def _session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = requests.Session()
        return s

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def forget(self, name: str) -> None:
        """Drop what we know of a removed instance."""
        with self._lock:
            self._history.pop(name, None)
        self._prev.pop(name, None)

    def set_instances(self, instances) -> None:
        """The registry changed (control/daemon/registry.py): poll these from the next round on,
        and forget what we knew of the removed ones."""
        gone = {i.name for i in self.instances} - {i.name for i in instances}
        self.instances = list(instances)
        for name in gone:
            self.forget(name)

    def latest(self, now: float | None = None, stale_after_s: float | None = None) -> dict[str, InstanceSnapshot]:
        with self._lock:
            # the newest of each history: one store, so the latest and the history never disagree
            snaps = {k: v[-1] for k, v in self._history.items() if v}
        if now is not None and stale_after_s is not None:
            snaps = {k: v.aged(now, stale_after_s) for k, v in snaps.items()}
        return snaps

    def histories(self) -> dict[str, list[InstanceSnapshot]]:
        """The last `history` snapshots of every instance, oldest first."""
        with self._lock:
            return {k: list(v) for k, v in self._history.items()}

    def poll_once(self) -> dict[str, InstanceSnapshot]:
        instances = list(self.instances)
        futures = {i.name: self._pool.submit(self._poll_instance, i) for i in instances}
        out = {}
        for name, f in futures.items():
            try:
                out[name] = f.result(timeout=self.timeout_s * 3 + 1)
            except Exception as e:  # noqa: BLE001 - a poll bug must not stop the loop
                inst = next(i for i in instances if i.name == name)
                out[name] = InstanceSnapshot(name, inst.site, self.clock(), InstanceState.UNKNOWN,
                                             reason=f"poller error: {e}", capacity=inst.capacity,
                                             sensitive_ok=inst.sensitive_ok)
        with self._lock:
            for name, snap in out.items():
                self._history.setdefault(name, deque(maxlen=self.history_size)).append(snap)
        return out

    def _poll_instance(self, inst) -> InstanceSnapshot:
        t0 = time.monotonic()
        taken = self.clock()
        base = dict(name=inst.name, site=inst.site, taken_at=taken, capacity=inst.capacity,
                    sensitive_ok=inst.sensitive_ok)
        sess = self._session()
        # Readiness and metrics in parallel would double the threads; sequential is ~2 ms locally.
        try:
            r = sess.get(f"{inst.http_url}/v2/health/ready", timeout=self.timeout_s)
            ready = r.status_code == 200
            probe = Probe.OK if ready else Probe.FAILED
            ready_reason = "" if ready else f"/v2/health/ready answered {r.status_code}"
        except requests.Timeout as e:  # before ConnectionError: ConnectTimeout is both
            ready, probe = False, Probe.SLOW
            ready_reason = f"/v2/health/ready no answer within {self.timeout_s:g}s ({type(e).__name__})"
        except requests.RequestException as e:
            ready, probe, ready_reason = False, Probe.FAILED, f"/v2/health/ready failed: {type(e).__name__}"
        scrape_error = False
        totals = None
        reason = ""
        try:
            m = sess.get(inst.metrics_url, timeout=self.timeout_s)
            if m.status_code != 200:
                raise MetricsError(f"/metrics answered {m.status_code}")
            totals = parse(m.text)
        except (requests.RequestException, MetricsError) as e:
            scrape_error = True
            reason = f"metrics: {e}" if isinstance(e, MetricsError) else f"metrics: {type(e).__name__}"
        dcgm = {}
        if inst.name in self.dcgm_urls:
            try:
                d = sess.get(self.dcgm_urls[inst.name], timeout=self.timeout_s)
                dcgm = parse_dcgm(d.text)
            except (requests.RequestException, MetricsError) as e:
                log.debug("dcgm scrape of %s failed: %s", inst.name, e)
        elapsed = time.monotonic() - t0
        fields = {}
        if totals is not None:
            fields = dict(gpu_util=dcgm.get("gpu_util", totals.gpu_util),
                          gpu_mem_used_bytes=dcgm.get("gpu_mem_used_bytes", totals.gpu_mem_used_bytes),
                          gpu_mem_total_bytes=totals.gpu_mem_total_bytes,
                          power_w=dcgm.get("gpu_power_w", totals.gpu_power_w),
                          cpu_util=totals.cpu_util, pending=totals.pending)
            prev = self._prev.get(inst.name)
            self._prev[inst.name] = (taken, totals)
            if prev is not None and taken > prev[0]:
                rt = rates(prev[1], totals, taken - prev[0])
                fields.update(request_rate=rt.request_rate, failure_rate=rt.failure_rate,
                              queue_ms=rt.queue_ms, latency_ms=rt.latency_ms)
        else:
            self._prev.pop(inst.name, None)
        if not ready:
            state = InstanceState.DEGRADED if probe is Probe.SLOW else InstanceState.UNHEALTHY
            reason = ready_reason
        elif totals is None:
            state = InstanceState.UNKNOWN
        elif "queue_ms" not in fields:
            state, reason = InstanceState.UNKNOWN, "first scrape: no rates yet"
        else:
            state = InstanceState.HEALTHY
        snap = InstanceSnapshot(**base, state=state, reason=reason, ready=ready, scrape_ms=elapsed * 1000, probe=probe,
                                **fields)
        if self.on_result:
            try:
                self.on_result(snap, scrape_error or not ready, elapsed)
            except Exception:  # noqa: BLE001
                log.exception("poll metrics callback failed")
        return snap
