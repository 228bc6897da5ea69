"""A bounded load generator (tritonclient, HTTP or gRPC) for tests and drills.

Two modes, both bounded in time and count:
- `run_load`: closed loop at a fixed concurrency; counts successes and failures (by kind) and
  latency percentiles (loopback targets only unless `allow_remote=True`);
- `OpenLoopLoad`: a fixed request rate whatever the answers take, alternating HTTP and gRPC, one
  record per request (send/end time, protocol, error, answering model version) for the drills.

    python -m control.drills.load --url 127.0.0.1:8000 --model add_one --concurrency 4 --duration 10
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import requests

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



# Open-loop load (drills) -----------------------------------------------------------------------------------------

@dataclass
class RequestSpec:
    """What one inference request looks like: the model and a builder of its inputs for a
    tritonclient module (`tritonclient.http` or `tritonclient.grpc`)."""

    model: str
    build: Callable[[object], list]
    outputs: list[str] | None = None


_NP = {"TYPE_FP32": np.float32, "TYPE_FP16": np.float16, "TYPE_FP64": np.float64, "TYPE_INT64": np.int64,
       "TYPE_INT32": np.int32, "TYPE_INT8": np.int8, "TYPE_UINT8": np.uint8, "TYPE_BOOL": np.bool_,
       "TYPE_STRING": np.object_}
SAMPLE_QUERIES = [b"running shoes", b"wireless headphones", b"4k tv 55 inch", b"coffee grinder", b"kids bike"]


def auto_spec(http_url: str, model: str, timeout: float = 5.0) -> RequestSpec:
    """A request for any model, built from its config (`/v2/models/NAME/config`): dynamic dims
    become 1, strings are sample search queries, numbers are small positive values."""
    cfg = requests.get(f"{http_url}/v2/models/{model}/config", timeout=timeout).json()
    batched = int(cfg.get("max_batch_size", 0)) > 0
    arrays = []
    for i in cfg.get("input", []):
        dims = [int(d) for d in i.get("dims", [])]
        shape = ([1] if batched else []) + [1 if d < 0 else d for d in dims]
        dt = i.get("data_type", "TYPE_FP32")
        np_t = _NP.get(dt, np.float32)
        n = int(np.prod(shape)) if shape else 1
        if np_t is np.object_:
            arr = np.array([SAMPLE_QUERIES[k % len(SAMPLE_QUERIES)] for k in range(n)], dtype=np.object_)
        elif np_t is np.bool_:
            arr = np.ones(n, dtype=np.bool_)
        else:
            arr = (np.arange(n) % 7 + 1).astype(np_t)
        arrays.append((i["name"], shape, dt.replace("TYPE_", "").replace("STRING", "BYTES"), arr.reshape(shape)))

    def build(m):
        out = []
        for name, shape, dt, arr in arrays:
            inp = m.InferInput(name, shape, dt)
            inp.set_data_from_numpy(arr)
            out.append(inp)
        return out
    return RequestSpec(model, build)


# Load ---------------------------------------------------------------------------------------------

@dataclass
class Req:
    i: int
    proto: str
    t_sched: float     # seconds since load start
    t_start: float
    t_end: float
    ok: bool
    error: str = ""
    version: str = ""  # model version that answered (from the response)

    @property
    def latency_ms(self) -> float:
        return (self.t_end - self.t_start) * 1000


def _error_detail(e: Exception) -> str:
    status = getattr(e, "status", None)
    s = status() if callable(status) else status
    msg = str(e).replace("\n", " ")
    return f"{s or type(e).__name__}: {msg[:120]}"


class OpenLoopLoad:
    """Requests at a fixed rate, alternating HTTP and gRPC through HAProxy, whatever the answers
    take (open loop: a stalled backend shows up as late answers, not as fewer requests)."""

    def __init__(self, http_url: str, grpc_url: str, spec: RequestSpec, rate: float, duration_s: float,
                 timeout_s: float = 10.0, protocols: tuple[str, ...] = ("http", "grpc"), max_workers: int = 64,
                 clock_zero: float | None = None, open_ended: bool = False):
        """open_ended: keep the schedule open until finish() (the drill may extend the run)."""
        if not 0 < rate <= 1000:
            raise ValueError("rate must be in (0, 1000] requests/s")
        if not 0 < duration_s <= 3600:
            raise ValueError("duration must be in (0, 3600] s")
        self.http_url, self.grpc_url = http_url, grpc_url
        self.spec, self.rate, self.duration_s, self.timeout_s = spec, rate, duration_s, timeout_s
        self.protocols = protocols
        self.records: list[Req] = []
        self._lock = threading.Lock()
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="drill-load")
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._finished = threading.Event()
        if not open_ended:
            self._finished.set()
        self.t0 = clock_zero if clock_zero is not None else time.monotonic()

    def _client(self, proto: str):
        key = f"c_{proto}"
        c = getattr(self._local, key, None)
        if c is None:
            if proto == "grpc":
                import tritonclient.grpc as m  # noqa: PLC0415
                c = (m, m.InferenceServerClient(url=self.grpc_url))
            else:
                import tritonclient.http as m  # noqa: PLC0415
                c = (m, m.InferenceServerClient(url=self.http_url, connection_timeout=self.timeout_s,
                                                network_timeout=self.timeout_s))
            setattr(self._local, key, c)
        return c

    def _drop_client(self, proto: str) -> None:
        c = getattr(self._local, f"c_{proto}", None)
        setattr(self._local, f"c_{proto}", None)
        if c is not None:
            try:
                c[1].close()
            except Exception:  # noqa: BLE001
                pass

    def _one(self, i: int, proto: str, t_sched: float) -> None:
        start = time.monotonic()
        ok, err, version = True, "", ""
        try:
            m, client = self._client(proto)
            inputs = self.spec.build(m)
            if proto == "grpc":
                res = client.infer(self.spec.model, inputs, client_timeout=self.timeout_s)
                version = str(res.get_response().model_version)
            else:
                res = client.infer(self.spec.model, inputs)
                version = str((res.get_response() or {}).get("model_version", ""))
        except Exception as e:  # noqa: BLE001 - every failure is a data point
            ok, err = False, _error_detail(e)
            self._drop_client(proto)  # a broken connection must not poison the next request
        end = time.monotonic()
        with self._lock:
            self.records.append(Req(i, proto, t_sched, start - self.t0, end - self.t0, ok, err, version))

    def extend_to(self, duration_s: float) -> None:
        """Keep the load going until `duration_s` after its start (never shortens it)."""
        self.duration_s = max(self.duration_s, min(duration_s, 3600.0))

    def _schedule(self) -> None:
        i = 0
        while True:
            if i >= int(self.rate * self.duration_s):  # duration_s may grow (extend_to) until finish()
                if self._finished.is_set() or self._stop.is_set():
                    return
                time.sleep(0.01)
                continue
            due = self.t0 + i / self.rate
            while not self._stop.is_set():
                wait = due - time.monotonic()
                if wait <= 0:
                    break
                time.sleep(min(wait, 0.05))
            if self._stop.is_set():
                return
            self._pool.submit(self._one, i, self.protocols[i % len(self.protocols)], due - self.t0)
            i += 1

    def start(self) -> "OpenLoopLoad":
        self._thread = threading.Thread(target=self._schedule, daemon=True, name="drill-load-scheduler")
        self._thread.start()
        return self

    def finish(self) -> None:
        """No extension will come: stop after the current duration."""
        self._finished.set()

    def join(self) -> list[Req]:
        self._finished.set()
        if self._thread:
            self._thread.join()
        self._pool.shutdown(wait=True)
        with self._lock:
            return sorted(self.records, key=lambda r: r.i)

    def stop(self) -> None:
        self._stop.set()


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
