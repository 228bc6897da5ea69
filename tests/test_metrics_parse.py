"""Triton metrics text -> Totals -> Rates, on a recorded CPU page and a GPU page in Triton's format."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from control.metrics import MetricsError, parse, parse_dcgm, rates

FIX = Path(__file__).parent / "fixtures"


def test_recorded_cpu_page():
    t = parse((FIX / "triton_metrics_cpu.txt").read_text())
    assert t.success == 5 and t.failure == 0
    assert t.request_duration_us == 33946 and t.queue_duration_us == 232
    assert t.gpu_util is None and t.gpu_count == 0
    assert t.cpu_util == pytest.approx(0.0603, abs=1e-4)
    assert t.cpu_mem_total_bytes == 25276502016
    assert t.models == ("add_one",)


def test_gpu_page():
    t = parse((FIX / "triton_metrics_gpu.txt").read_text())
    assert t.gpu_count == 2
    assert t.gpu_util == pytest.approx(0.85) and t.gpu_util_max == pytest.approx(0.92)
    assert t.gpu_mem_used_bytes == 12884901888 + 4294967296
    assert t.gpu_power_w == pytest.approx(813.75)
    assert t.success == 200000 and t.failure == 15  # failures summed over reasons and models
    assert t.pending == 8
    assert t.models == ("query_intent", "ranker")


def test_rates_from_counter_deltas():
    a = parse((FIX / "triton_metrics_cpu.txt").read_text())
    b = replace(a, success=a.success + 100, failure=a.failure + 4, queue_duration_us=a.queue_duration_us + 520_000,
                request_duration_us=a.request_duration_us + 1_040_000)
    r = rates(a, b, 2.0)
    assert r.request_rate == pytest.approx(52.0)
    assert r.failure_rate == pytest.approx(2.0)
    assert r.failure_ratio == pytest.approx(4 / 104)
    assert r.queue_ms == pytest.approx(5.0)
    assert r.latency_ms == pytest.approx(10.0)
    assert not r.reset


def test_no_requests_means_zero_not_nan():
    a = parse((FIX / "triton_metrics_cpu.txt").read_text())
    r = rates(a, a, 1.0)
    assert r.request_rate == 0 and r.queue_ms == 0 and r.latency_ms == 0


def test_counter_reset_after_restart():
    a = parse((FIX / "triton_metrics_cpu.txt").read_text())
    b = replace(a, success=3, failure=0, request_duration_us=300, queue_duration_us=30)
    r = rates(a, b, 1.0)
    assert r.reset and r.request_rate == 3


@pytest.mark.parametrize("text", [
    None, "", "   \n", "<html>502 Bad Gateway</html>", "nv_cpu_utilization not-a-number",
    "# TYPE x counter\nx 1\n",                 # parses, but is not Triton
    "nv_cpu_utilization NaN\n", "nv_cpu_utilization 7.5\n",
    "nv_inference_request_success{model=\"m\" 3\n",
])
def test_garbage_is_an_error(text):
    with pytest.raises(MetricsError):
        parse(text)


def test_truncated_recorded_page_still_parses_or_errors_cleanly():
    text = (FIX / "triton_metrics_cpu.txt").read_text()
    for cut in range(0, len(text), 97):
        try:
            parse(text[:cut])
        except MetricsError:
            pass


def test_interval_must_be_positive():
    a = parse((FIX / "triton_metrics_cpu.txt").read_text())
    with pytest.raises(ValueError):
        rates(a, a, 0)


def test_dcgm_exporter_fields():
    text = ("# TYPE DCGM_FI_DEV_GPU_UTIL gauge\n"
            'DCGM_FI_DEV_GPU_UTIL{gpu="0",UUID="GPU-a"} 90\nDCGM_FI_DEV_GPU_UTIL{gpu="1",UUID="GPU-b"} 70\n'
            '# TYPE DCGM_FI_DEV_FB_USED gauge\nDCGM_FI_DEV_FB_USED{gpu="0"} 1024\n'
            '# TYPE DCGM_FI_DEV_POWER_USAGE gauge\nDCGM_FI_DEV_POWER_USAGE{gpu="0"} 300.5\n')
    d = parse_dcgm(text)
    assert d["gpu_util"] == pytest.approx(0.8)
    assert d["gpu_mem_used_bytes"] == 1024 * 1024 * 1024
    assert d["gpu_power_w"] == pytest.approx(300.5)
    with pytest.raises(MetricsError):
        parse_dcgm("up 1\n")
