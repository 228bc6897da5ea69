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

from prometheus_client.parser import text_string_to_metric_families

from control.rollout.analysis import MetricWindow
from control.traffic.triton_metrics import MetricsError

P99_QUANTILE = "0.99"


@dataclass(frozen=True)
class ModelSample:
    """One scrape, one model: cumulative counters and the latest p99 (µs)."""

    success: float = 0.0
    failure: float = 0.0
    duration_us: float = 0.0
    p99_us: float | None = None


_FIELDS = {"nv_inference_request_success": "success", "nv_inference_request_failure": "failure",
           "nv_inference_request_duration_us": "duration_us"}


def parse_models(text: str | bytes | None) -> dict[str, ModelSample]:
    """{model: ModelSample} of one Triton metrics page; MetricsError for missing/garbage text."""
    if text is None:
        raise MetricsError("no metrics text")
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    acc: dict[str, dict] = {}
    seen = 0
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                name = s.name
                # prometheus_client names counter samples `<family>_total`; Triton's text has no suffix
                if family.type == "counter" and name == family.name + "_total":
                    name = family.name
                if not name.startswith("nv_"):
                    continue
                seen += 1
                model = s.labels.get("model")
                if model is None:
                    continue
                value = float(s.value)
                if value != value or value in (float("inf"), float("-inf")):
                    raise MetricsError(f"{name} of {model} is {value}")
                d = acc.setdefault(model, {"success": 0.0, "failure": 0.0, "duration_us": 0.0, "p99_us": None})
                if name in _FIELDS:
                    d[_FIELDS[name]] += value
                elif name == "nv_inference_request_summary_us" and s.labels.get("quantile") == P99_QUANTILE:
                    d["p99_us"] = value if d["p99_us"] is None else max(d["p99_us"], value)
    except MetricsError:
        raise
    except Exception as e:  # the parser raises ValueError/IndexError/... on garbage
        raise MetricsError(f"unparseable metrics text: {type(e).__name__}: {e}") from None
    if not seen:
        raise MetricsError("no Triton (nv_*) metric in the text")
    return {m: ModelSample(**d) for m, d in acc.items()}


def _delta(cur: float, base: float) -> float:
    return cur if cur < base else cur - base  # a counter that went down was reset (Triton restarted)


def window(samples: Sequence[tuple[float, ModelSample]], since: float, instance: str, site: str,
           version: int | None = None) -> MetricWindow | None:
    """The window from the first sample at or after `since` to the last one (samples oldest first).
    None with fewer than two such samples: no interval to measure yet."""
    inside = [(t, s) for t, s in samples if t >= since]
    if len(inside) < 2:
        return None
    (_, a), (_, b) = inside[0], inside[-1]
    ok, fail = _delta(b.success, a.success), _delta(b.failure, a.failure)
    n = ok + fail
    dur = _delta(b.duration_us, a.duration_us)
    return MetricWindow(instance, site, requests=n, errors=fail,
                        p99_ms=b.p99_us / 1000.0 if b.p99_us is not None else None,
                        mean_ms=(dur / n / 1000.0) if n else None, version=version)
