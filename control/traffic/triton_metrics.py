"""Triton `/metrics` text -> numbers the policy can use.

Two steps, both pure:
  `parse(text)`            Prometheus text -> `Totals` (counters summed over models, gauges per host)
  `rates(prev, cur, dt)`   two `Totals` -> `Rates` (request rate, failure rate, mean queue time and
                           latency per request over the interval), from counter deltas.
Garbage (unparseable text, NaN, no Triton metric at all) raises `MetricsError`: the caller marks
the instance `unknown`, never healthy-and-idle. Parsing is prometheus_client's own text parser.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from prometheus_client.parser import text_string_to_metric_families


class MetricsError(ValueError):
    """The metrics text is missing, unparseable or not from a Triton server."""


# Counters summed over every model/version (Triton's names, DESIGN.md fact 8).
_COUNTERS = {
    "nv_inference_request_success": "success",
    "nv_inference_request_failure": "failure",
    "nv_inference_count": "inference_count",
    "nv_inference_exec_count": "exec_count",
    "nv_inference_request_duration_us": "request_duration_us",
    "nv_inference_queue_duration_us": "queue_duration_us",
    "nv_inference_compute_infer_duration_us": "compute_infer_duration_us",
}


@dataclass(frozen=True)
class Totals:
    """One scrape of one Triton: cumulative counters and instantaneous gauges."""

    success: float = 0.0
    failure: float = 0.0
    inference_count: float = 0.0
    exec_count: float = 0.0
    request_duration_us: float = 0.0
    queue_duration_us: float = 0.0
    compute_infer_duration_us: float = 0.0
    pending: float = 0.0
    cpu_util: float | None = None            # 0..1, host
    cpu_mem_used_bytes: float | None = None
    cpu_mem_total_bytes: float | None = None
    gpu_util: float | None = None            # 0..1, mean over the GPUs; None on a CPU host
    gpu_util_max: float | None = None
    gpu_count: int = 0
    gpu_mem_used_bytes: float | None = None  # summed over the GPUs
    gpu_mem_total_bytes: float | None = None
    gpu_power_w: float | None = None         # summed over the GPUs
    models: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["models"] = list(self.models)
        return d


@dataclass(frozen=True)
class Rates:
    """Per-second rates and per-request means over one interval between two scrapes."""

    interval_s: float
    request_rate: float      # (success + failure) / s
    success_rate: float
    failure_rate: float      # failures / s
    failure_ratio: float     # failures / requests (0 when no requests)
    queue_ms: float          # mean queue time per request (0 when no requests)
    latency_ms: float        # mean request duration per request (0 when no requests)
    reset: bool = False      # a counter went backwards (Triton restarted)


def _check(value: float, name: str) -> float:
    if math.isnan(value) or math.isinf(value):
        raise MetricsError(f"{name} is {value}")
    return value


def triton_samples(text: str | bytes | None):
    """(name, labels, value) of every `nv_*` sample of a Triton metrics page, with Triton's own names
    (prometheus_client's parser names counter samples `<family>_total`; Triton's text has no suffix).
    MetricsError for missing, empty or unparseable text, a NaN/inf value, or no nv_* metric at all."""
    if text is None:
        raise MetricsError("no metrics text")
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    if not text.strip():
        raise MetricsError("empty metrics text")
    seen = 0
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                name = s.name
                if name.endswith("_total") and family.type == "counter" and name[:-6] == family.name:
                    name = family.name
                if not name.startswith("nv_"):
                    continue
                seen += 1
                yield name, s.labels, _check(float(s.value), name)
    except MetricsError:
        raise
    except Exception as e:  # the parser raises ValueError/IndexError/... on garbage
        raise MetricsError(f"unparseable metrics text: {type(e).__name__}: {e}") from None
    if not seen:
        raise MetricsError("no Triton (nv_*) metric in the text")


def parse(text: str | bytes | None) -> Totals:
    """Parse a Triton metrics page; raise MetricsError for missing/garbage input."""
    counters = dict.fromkeys(_COUNTERS.values(), 0.0)
    pending = 0.0
    gauges: dict[str, float] = {}
    gpu: dict[str, dict[str, float]] = {}
    models: set[str] = set()
    for name, labels, value in triton_samples(text):
        if name in _COUNTERS:
            if value < 0:
                raise MetricsError(f"counter {name} is negative")
            counters[_COUNTERS[name]] += value
            if "model" in labels:
                models.add(labels["model"])
        elif name == "nv_inference_pending_request_count":
            pending += value
        elif name in ("nv_cpu_utilization", "nv_cpu_memory_used_bytes", "nv_cpu_memory_total_bytes"):
            gauges[name] = value
        elif name.startswith("nv_gpu_") and "gpu_uuid" in labels:
            gpu.setdefault(name, {})[labels["gpu_uuid"]] = value
    util = gpu.get("nv_gpu_utilization", {})
    cpu_util = gauges.get("nv_cpu_utilization")
    if cpu_util is not None and not 0.0 <= cpu_util <= 1.0 + 1e-9:
        raise MetricsError(f"nv_cpu_utilization out of range: {cpu_util}")
    if any(not 0.0 <= u <= 1.0 + 1e-9 for u in util.values()):
        raise MetricsError(f"nv_gpu_utilization out of range: {util}")

    def total(name: str) -> float | None:
        vals = gpu.get(name)
        return sum(vals.values()) if vals else None

    return Totals(
        **counters,
        pending=pending,
        cpu_util=cpu_util,
        cpu_mem_used_bytes=gauges.get("nv_cpu_memory_used_bytes"),
        cpu_mem_total_bytes=gauges.get("nv_cpu_memory_total_bytes"),
        gpu_util=(sum(util.values()) / len(util)) if util else None,
        gpu_util_max=max(util.values()) if util else None,
        gpu_count=len(util),
        gpu_mem_used_bytes=total("nv_gpu_memory_used_bytes"),
        gpu_mem_total_bytes=total("nv_gpu_memory_total_bytes"),
        gpu_power_w=total("nv_gpu_power_usage"),
        models=tuple(sorted(models)),
    )


def parse_dcgm(text: str | bytes) -> dict[str, float]:
    """The few fields we use from an NVIDIA DCGM exporter page: gpu_util (0..1, mean),
    gpu_mem_used_bytes, gpu_power_w (sums). Raises MetricsError on garbage."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    util, fb_used, power = [], [], []
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                v = _check(float(s.value), s.name)
                if s.name == "DCGM_FI_DEV_GPU_UTIL":
                    util.append(v / 100.0)
                elif s.name == "DCGM_FI_DEV_FB_USED":
                    fb_used.append(v * 1024 * 1024)  # MiB
                elif s.name == "DCGM_FI_DEV_POWER_USAGE":
                    power.append(v)
    except MetricsError:
        raise
    except Exception as e:
        raise MetricsError(f"unparseable DCGM text: {e}") from None
    if not util:
        raise MetricsError("no DCGM_FI_DEV_GPU_UTIL in the DCGM exporter text")
    out = {"gpu_util": sum(util) / len(util)}
    if fb_used:
        out["gpu_mem_used_bytes"] = sum(fb_used)
    if power:
        out["gpu_power_w"] = sum(power)
    return out


def counter_increase(cur: float, prev: float) -> tuple[float, bool]:
    # Prometheus semantics: a counter that went down was reset; its new value is the increase.
    return (cur, True) if cur < prev else (cur - prev, False)


def rates(prev: Totals, cur: Totals, interval_s: float) -> Rates:
    """Rates between two scrapes `interval_s` apart (must be > 0)."""
    if interval_s <= 0:
        raise ValueError(f"interval must be positive, got {interval_s}")
    d_ok, r1 = counter_increase(cur.success, prev.success)
    d_fail, r2 = counter_increase(cur.failure, prev.failure)
    d_req_us, r3 = counter_increase(cur.request_duration_us, prev.request_duration_us)
    d_q_us, r4 = counter_increase(cur.queue_duration_us, prev.queue_duration_us)
    n = d_ok + d_fail
    return Rates(
        interval_s=interval_s,
        request_rate=n / interval_s,
        success_rate=d_ok / interval_s,
        failure_rate=d_fail / interval_s,
        failure_ratio=(d_fail / n) if n else 0.0,
        queue_ms=(d_q_us / n / 1000.0) if n else 0.0,
        latency_ms=(d_req_us / n / 1000.0) if n else 0.0,
        reset=r1 or r2 or r3 or r4,
    )
