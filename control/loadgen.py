"""A bounded load generator (tritonclient, HTTP or gRPC) for tests and drills.

Bounded in time (`duration_s`) and count (`max_requests`); loopback targets only unless
`allow_remote=True`. Counts successes and failures (by kind) and latency percentiles.

    python -m control.loadgen --url 127.0.0.1:8000 --model add_one --concurrency 4 --duration 10
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import socket
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

MAX_DURATION_S = 600.0
MAX_REQUESTS = 1_000_000


@dataclass
class LoadResult:
    url: str
    protocol: str
    model: str
    concurrency: int
    elapsed_s: float = 0.0
    success: int = 0
    failure: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    error_samples: dict[str, str] = field(default_factory=dict)   # first message per error kind
    latency_ms_p50: float | None = None
    latency_ms_p95: float | None = None
    latency_ms_p99: float | None = None

    @property
    def requests(self) -> int:
        return self.success + self.failure

    @property
    def rate(self) -> float:
        return self.requests / self.elapsed_s if self.elapsed_s else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "requests": self.requests, "rate": round(self.rate, 1)}


def _is_loopback(url: str) -> bool:
    host = url.split("://")[-1].rsplit(":", 1)[0].strip("[]")
    try:
        return all(ipaddress.ip_address(a[4][0]).is_loopback for a in socket.getaddrinfo(host, None))
    except (OSError, ValueError):
        return False


def _client(protocol: str, url: str):
    if protocol == "grpc":
        import tritonclient.grpc as m  # noqa: PLC0415
    else:
        import tritonclient.http as m  # noqa: PLC0415
    url = url.split("://")[-1]
    return m, m.InferenceServerClient(url=url)


def run_load(url: str, model: str, *, protocol: str = "http", concurrency: int = 1, duration_s: float = 5.0,
             max_requests: int = 10_000, input_name: str = "INPUT0", shape=(1, 4), datatype: str = "FP32",
             headers: dict[str, str] | None = None, stop: threading.Event | None = None,
             allow_remote: bool = False, rate_limit_rps: float | None = None) -> LoadResult:
    if protocol not in ("http", "grpc"):
        raise ValueError("protocol must be http or grpc")
    if not 0 < duration_s <= MAX_DURATION_S:
        raise ValueError(f"duration_s must be in (0, {MAX_DURATION_S}]")
    if not 0 < max_requests <= MAX_REQUESTS:
        raise ValueError(f"max_requests must be in (0, {MAX_REQUESTS}]")
    if not 1 <= concurrency <= 256:
        raise ValueError("concurrency must be 1..256")
    if not allow_remote and not _is_loopback(url):
        raise ValueError(f"{url} is not a loopback address (pass allow_remote=True for a drill)")
    stop = stop or threading.Event()
    if headers and protocol == "grpc":
        # gRPC metadata keys must be lowercase (HAProxy matches header names case-insensitively).
        headers = {k.lower(): v for k, v in headers.items()}
    res = LoadResult(url, protocol, model, concurrency)
    lock = threading.Lock()
    issued = [0]
    lat: list[float] = []
    errors: Counter = Counter()
    samples: dict[str, str] = {}
    data = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
    deadline = time.monotonic() + duration_s
    per_thread_interval = (concurrency / rate_limit_rps) if rate_limit_rps else 0.0

    def worker():
        m, client = _client(protocol, url)
        inp = m.InferInput(input_name, list(shape), datatype)
        inp.set_data_from_numpy(data)
        nxt = time.monotonic()
        try:
            while not stop.is_set() and time.monotonic() < deadline:
                with lock:
                    if issued[0] >= max_requests:
                        return
                    issued[0] += 1
                if per_thread_interval:
                    nxt += per_thread_interval
                    delay = nxt - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                t0 = time.perf_counter()
                try:
                    # A fresh dict each call: tritonclient.http adds Inference-Header-Content-Length
                    # (an int) to the dict it is given, which would leak into later (gRPC) calls.
                    client.infer(model, [inp], headers=dict(headers) if headers else None)
                    ok, err = True, None
                except Exception as e:  # noqa: BLE001 - counted by kind
                    ok, err = False, _error_kind(e)
                    samples.setdefault(err, f"{type(e).__name__}: {e}"[:300])
                dt = (time.perf_counter() - t0) * 1000
                with lock:
                    if ok:
                        res.success += 1
                        lat.append(dt)
                    else:
                        res.failure += 1
                        errors[err] += 1
        finally:
            try:
                client.close()
            except Exception:  # noqa: BLE001
                pass

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration_s + 30)
    res.elapsed_s = time.monotonic() - t0
    res.errors = dict(errors)
    res.error_samples = samples
    if lat:
        a = np.array(lat)
        res.latency_ms_p50, res.latency_ms_p95, res.latency_ms_p99 = (round(float(np.percentile(a, q)), 2)
                                                                      for q in (50, 95, 99))
    return res


def _error_kind(e: Exception) -> str:
    status = getattr(e, "status", None)
    try:
        s = status() if callable(status) else status
    except Exception:  # noqa: BLE001
        s = None
    msg = str(e)
    if s:
        return str(s)
    for code in ("503", "502", "504", "403", "400"):
        if code in msg:
            return code
    return type(e).__name__


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--protocol", choices=["http", "grpc"], default="http")
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--max-requests", type=int, default=10_000)
    ap.add_argument("--input", default="INPUT0")
    ap.add_argument("--shape", default="1,4")
    ap.add_argument("--header", action="append", default=[], help="NAME=VALUE")
    a = ap.parse_args(argv)
    headers = dict(h.split("=", 1) for h in a.header) or None
    r = run_load(a.url, a.model, protocol=a.protocol, concurrency=a.concurrency, duration_s=a.duration,
                 max_requests=a.max_requests, input_name=a.input, shape=tuple(int(x) for x in a.shape.split(",")),
                 headers=headers)
    print(json.dumps(r.to_dict(), indent=2))


if __name__ == "__main__":
    main()
