"""Triton metrics text -> Totals -> Rates, on a recorded CPU page and a GPU page in Triton's format."""
from __future__ import annotations

import threading
import time
import time as _t
from dataclasses import replace
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
from http_fakes import QuietHandler

from control.config import InstanceConfig
from control.local.procs import free_port
from control.traffic.poller import Poller
from control.traffic.snapshot import InstanceState, Probe
from control.traffic.triton_metrics import MetricsError, parse, parse_dcgm, rates

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


# ---- the poller against a tiny real HTTP server (ready + /metrics under test control) -----------
class _Fake:
    def __init__(self):
        self.ready, self.metrics, self.delay = 200, (FIX / "triton_metrics_cpu.txt").read_text(), 0.0
        fake = self

        class H(QuietHandler):
            def do_GET(self):  # noqa: N802
                _t.sleep(fake.delay)
                code, body = (fake.ready, b"") if self.path == "/v2/health/ready" else (200, fake.metrics.encode())
                self.reply(body, code=code)

        self.srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.srv.server_address[1]
        threading.Thread(target=self.srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()


@pytest.fixture
def fake_instance():
    f = _Fake()
    inst = InstanceConfig(name="onprem-1", site="onprem", http_port=f.port, grpc_port=1, metrics_port=f.port)
    yield f, inst
    f.srv.shutdown()
    f.srv.server_close()


def test_poller_states(fake_instance):
    f, inst = fake_instance
    t = [1000.0]
    p = Poller([inst], timeout_s=0.3, clock=lambda: t[0])
    s = p.poll_once()["onprem-1"]
    assert s.state is InstanceState.UNKNOWN and "first scrape" in s.reason  # no rates yet
    t[0] += 1
    text = f.metrics
    f.metrics = text.replace("nv_inference_request_success{model=\"add_one\",version=\"1\"} 5",
                             "nv_inference_request_success{model=\"add_one\",version=\"1\"} 25").replace(
        "nv_inference_queue_duration_us{model=\"add_one\",version=\"1\"} 232",
        "nv_inference_queue_duration_us{model=\"add_one\",version=\"1\"} 200232")
    s = p.poll_once()["onprem-1"]
    assert s.state is InstanceState.HEALTHY
    assert s.request_rate == pytest.approx(20.0) and s.queue_ms == pytest.approx(10.0)
    assert s.cpu_util == pytest.approx(0.0603, abs=1e-4)
    # Garbage metrics: unknown, never healthy-and-idle; and the next good scrape has no rate yet.
    t[0] += 1
    f.metrics = "<html>oops</html>"
    s = p.poll_once()["onprem-1"]
    assert s.state is InstanceState.UNKNOWN and s.request_rate is None
    # Not ready: unhealthy.
    t[0] += 1
    f.ready = 503
    s = p.poll_once()["onprem-1"]
    assert s.state is InstanceState.UNHEALTHY and "503" in s.reason
    # Stale: the last snapshot ages into unknown.
    f.ready, f.metrics = 200, text
    p.poll_once()
    t[0] += 1
    p.poll_once()
    assert p.latest(t[0], 5.0)["onprem-1"].state is InstanceState.HEALTHY
    assert p.latest(t[0] + 6, 5.0)["onprem-1"].state is InstanceState.UNKNOWN


def test_poller_timeout_and_connection_refused(fake_instance):

    f, inst = fake_instance
    dead_port = free_port()
    dead = InstanceConfig(name="cloud-1", site="cloud", http_port=dead_port, grpc_port=1, metrics_port=dead_port)
    f.delay = 1.0
    p = Poller([inst, dead], timeout_s=0.2)
    t0 = time.monotonic()
    snaps = p.poll_once()
    took = time.monotonic() - t0
    # A probe that answers late is slow (degraded), not down; a refused one failed. Whether either
    # instance is down is judged over a window of probes (tests/test_policy.py, health).
    assert snaps["onprem-1"].state is InstanceState.DEGRADED and snaps["onprem-1"].probe is Probe.SLOW
    assert "Timeout" in snaps["onprem-1"].reason
    assert snaps["cloud-1"].state is InstanceState.UNHEALTHY and snaps["cloud-1"].probe is Probe.FAILED
    assert [s.probe for s in p.histories()["cloud-1"]] == [Probe.FAILED]
    assert took < 1.0  # instances are scraped concurrently, each bounded by its timeout
