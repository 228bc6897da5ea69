"""Per-model Triton numbers for the canary analysis (control/rollout/signals.py), on Triton 2.51's
own text format (labels `model`, `version`, and `reason` on failures)."""
from __future__ import annotations

import pytest

from control.rollout.signals import parse_models, window
from control.traffic.triton_metrics import MetricsError


def page(series: dict[int, tuple[float, float, float, float]]) -> str:
    """{version: (success, failure, duration_us, p99_us)} -> a Triton metrics page for model `m`."""
    lines = ["# HELP nv_inference_request_success x", "# TYPE nv_inference_request_success counter"]
    lines += [f'nv_inference_request_success{{model="m",version="{v}"}} {s[0]}' for v, s in series.items()]
    lines += ["# HELP nv_inference_request_failure x", "# TYPE nv_inference_request_failure counter"]
    for v, s in series.items():
        lines += [f'nv_inference_request_failure{{model="m",reason="BACKEND",version="{v}"}} {s[1]}',
                  f'nv_inference_request_failure{{model="m",reason="OTHER",version="{v}"}} 0']
    lines += ["# HELP nv_inference_request_duration_us x", "# TYPE nv_inference_request_duration_us counter"]
    lines += [f'nv_inference_request_duration_us{{model="m",version="{v}"}} {s[2]}' for v, s in series.items()]
    lines += ["# HELP nv_inference_request_summary_us x", "# TYPE nv_inference_request_summary_us summary"]
    for v, s in series.items():
        lines += [f'nv_inference_request_summary_us_count{{model="m",version="{v}"}} {s[0] + s[1]}',
                  f'nv_inference_request_summary_us_sum{{model="m",version="{v}"}} {s[2]}',
                  f'nv_inference_request_summary_us{{model="m",version="{v}",quantile="0.99"}} {s[3]}']
    return "\n".join(lines) + "\n"


def test_a_reload_does_not_mix_the_old_versions_series_into_the_new_one():
    """Right after the canary loads v2, Triton still lists v1's series (800 successes); one scrape
    later v1 is gone. v2 served 30 successes + 10 failures in between: exactly that is the window.
    (Summed over versions, the drop of v1 read as a counter reset and the window was wrong: on real
    Tritons it measured 0.27..0.95 for a model failing one request in four.)"""
    base = parse_models(page({1: (800, 0, 80_000, 900), 2: (2, 0, 200, 1000)}))
    later = parse_models(page({2: (32, 10, 4_200, 5000)}))
    w = window([(10.0, base["m"]), (12.0, later["m"])], since=10.0, instance="c", site="onprem", version=2)
    assert (w.requests, w.errors) == (40, 10) and w.error_ratio == 0.25
    assert w.p99_ms == 5.0 and w.mean_ms == pytest.approx(4_000 / 40 / 1000)


def test_failures_summed_over_reasons_and_resets_and_new_series():
    a = parse_models(page({3: (100, 5, 1000, 100)}))["m"]
    assert a.series(3)["3"]["failure"] == 5 and a.series(4) == {}
    b = parse_models(page({3: (10, 1, 100, 100)}))["m"]  # Triton restarted: counters from 0
    w = window([(0.0, a), (5.0, b)], since=0.0, instance="c", site="cloud", version=3)
    assert (w.requests, w.errors) == (11, 1)
    assert window([(0.0, a)], since=0.0, instance="c", site="cloud", version=3) is None  # one scrape: no interval
    assert window([(0.0, a), (5.0, b)], since=1.0, instance="c", site="cloud", version=3) is None


def test_garbage_is_refused():
    for text in (None, "", "not metrics {{{", "# only\nfoo 1\n"):
        with pytest.raises(MetricsError):
            parse_models(text)
