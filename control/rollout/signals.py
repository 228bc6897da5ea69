"""Per-model numbers from a Triton `/metrics` page, and a metric window from two scrapes (pure).

control/traffic/triton_metrics.py sums the counters over every model (what the traffic policy
needs); a rollout judges ONE model, so here the same counters are kept per model:
`nv_inference_request_success|failure`, `nv_inference_request_duration_us`, and, when Triton runs
with `--metrics-config=summary_latencies=true`, the p99 of `nv_inference_request_summary_us`
(Triton's own sliding summary). Versions of one model are summed (counters) or the worst taken
(p99): during a reload both may show for a moment.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from control.rollout.analysis import MetricWindow
from control.traffic.triton_metrics import counter_increase, triton_samples

P99_QUANTILE = "0.99"


@dataclass(frozen=True)
class ModelSample:
    """One scrape, one model: cumulative counters and the latest p99 (µs), per version (Triton
    labels every series with the version; a reload ends one series and starts another at 0)."""

    versions: dict[str, dict[str, float | None]]  # version label -> {success, failure, duration_us, p99_us}

    def series(self, version: int | None) -> dict[str, dict[str, float | None]]:
        if version is None:
            return self.versions
        return {k: v for k, v in self.versions.items() if k == str(version)}


_FIELDS = {"nv_inference_request_success": "success", "nv_inference_request_failure": "failure",
           "nv_inference_request_duration_us": "duration_us"}


def parse_models(text: str | bytes | None) -> dict[str, ModelSample]:
    """{model: ModelSample} of one Triton metrics page; MetricsError for missing/garbage text."""
    acc: dict[str, dict[str, dict]] = {}
    for name, labels, value in triton_samples(text):
        model = labels.get("model")
        if model is None:
            continue
        d = acc.setdefault(model, {}).setdefault(
            labels.get("version", ""), {"success": 0.0, "failure": 0.0, "duration_us": 0.0, "p99_us": None})
        if name in _FIELDS:  # failure has a `reason` label in 2.51: summed over reasons
            d[_FIELDS[name]] += value
        elif name == "nv_inference_request_summary_us" and labels.get("quantile") == P99_QUANTILE:
            d["p99_us"] = value
    return {m: ModelSample(v) for m, v in acc.items()}


def _increase(cur: float, base: float | None) -> float:
    # A series absent at the base started after it (from 0); one that went down was reset.
    return counter_increase(cur, 0.0 if base is None else base)[0]


def window(samples: Sequence[tuple[float, ModelSample]], since: float, instance: str, site: str,
           version: int | None = None, until: float | None = None) -> MetricWindow | None:
    """The window from the first sample at or after `since` to the last one (at or before `until`
    when given; samples oldest first),
    counting only `version`'s series when given (the version the instance should be serving: a
    reload's old series must not leak into the new version's numbers). None with fewer than two
    samples: no interval to measure yet."""
    inside = [(t, s) for t, s in samples if t >= since and (until is None or t <= until)]
    if len(inside) < 2:
        return None
    a, b = inside[0][1].series(version), inside[-1][1].series(version)
    ok = fail = dur = 0.0
    p99s = []
    for label, cur in b.items():
        base = a.get(label, {})
        ok += _increase(cur["success"], base.get("success"))
        fail += _increase(cur["failure"], base.get("failure"))
        dur += _increase(cur["duration_us"], base.get("duration_us"))
        if cur["p99_us"] is not None:
            p99s.append(cur["p99_us"])
    n = ok + fail
    return MetricWindow(instance, site, requests=n, errors=fail,
                        p99_ms=max(p99s) / 1000.0 if p99s else None,
                        mean_ms=(dur / n / 1000.0) if n else None, version=version)
