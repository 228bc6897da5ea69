"""Fault injectors used by the scenarios. Each one does one thing and returns when it is done;
the scenario records the time. Processes are addressed through their pid files (control/local/procs.py),
never by name.
"""
from __future__ import annotations

import asyncio
import signal
import threading
import time

import numpy as np

from control.local.procs import ManagedProcess, load_managed


class FaultError(RuntimeError):
    pass


def managed(run_dir, name: str) -> ManagedProcess:
    p = load_managed(run_dir, name)
    if p is None or not p.alive:
        raise FaultError(f"{name} is not running (no live pid file in {run_dir}/pids)")
    return p


def kill9(proc: ManagedProcess) -> None:
    proc.signal(signal.SIGKILL)
    deadline = time.monotonic() + 5
    while proc.alive and time.monotonic() < deadline:
        time.sleep(0.01)


def freeze(proc: ManagedProcess) -> None:
    """SIGSTOP: the process keeps its sockets (the kernel still accepts connections) but answers nothing."""
    proc.signal(signal.SIGSTOP)


def thaw(proc: ManagedProcess) -> None:
    proc.signal(signal.SIGCONT)


class DelayProxy:
    """A TCP proxy that adds a settable delay to every chunk in both directions (delay_ms / 2 each
    way, order kept). The userspace stand-in for `tc netem delay` where the kernel has no
    sch_netem; a site sits behind it from the start, with delay 0 until the fault."""

    def __init__(self, listen_host: str, listen_port: int, target_host: str, target_port: int):
        self.listen = (listen_host, listen_port)
        self.target = (target_host, target_port)
        self.delay_ms = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def set_delay(self, ms: float) -> None:
        self.delay_ms = float(ms)

    async def _pipe(self, reader, writer):
        q: asyncio.Queue = asyncio.Queue()

        async def pump_in():
            try:
                while True:
                    data = await reader.read(65536)
                    if not data:
                        break
                    await q.put((time.monotonic() + self.delay_ms / 2000.0, data))
            except (ConnectionError, OSError):
                pass
            await q.put((0.0, None))

        async def pump_out():
            try:
                while True:
                    due, data = await q.get()
                    if data is None:
                        break
                    wait = due - time.monotonic()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                try:
                    writer.close()
                except Exception:  # noqa: BLE001
                    pass

        await asyncio.gather(pump_in(), pump_out())

    async def _handle(self, c_reader, c_writer):
        try:
            s_reader, s_writer = await asyncio.open_connection(*self.target)
        except OSError:
            c_writer.close()
            return
        await asyncio.gather(self._pipe(c_reader, s_writer), self._pipe(s_reader, c_writer))

    def _run(self):
        self._loop = asyncio.new_event_loop()
        try:
            self._server = self._loop.run_until_complete(asyncio.start_server(self._handle, *self.listen))
        except BaseException as e:  # noqa: BLE001
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()
        self._server.close()
        self._loop.run_until_complete(self._server.wait_closed())
        pending = [t for t in asyncio.all_tasks(self._loop) if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self._loop.close()

    def start(self) -> "DelayProxy":
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"delay-proxy-{self.listen[1]}")
        self._thread.start()
        self._ready.wait(10)
        if self._error:
            raise FaultError(f"delay proxy on {self.listen}: {self._error}")
        return self

    def stop(self) -> None:
        if self._loop and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread:
            self._thread.join(5)


# Query of death (issue 15) ----------------------------------------------------------------------------

QOD_DIM = 10**12  # declared elements of the inflated input: Triton 2.51's HTTP/JSON path allocates for it


def _inflate(inputs: list) -> str:
    """Declare [batch, QOD_DIM] on the input with the most elements, keeping its (small) data."""
    big = max(inputs, key=lambda i: int(np.prod(i.shape())))
    big.set_shape([big.shape()[0] if big.shape() else 1, QOD_DIM])
    return big.name()


def _grpc_detail(e: Exception) -> tuple[str, str]:
    status = getattr(e, "status", None)
    return str(status() if callable(status) else status or type(e).__name__), str(e).replace("\n", " ")[:240]


def query_of_death(http_url: str, grpc_url: str, spec, timeout_s: float = 10.0) -> list[dict]:
    """One request of each form (HTTP/JSON, HTTP binary tensors, gRPC), built from the load's own
    request with one input's declared shape inflated to QOD_DIM elements and its data unchanged.
    Returns one row per request: form, refused (a clean client error came back), status, detail."""
    import tritonclient.grpc as grpcclient  # noqa: PLC0415 - heavy import, only for this fault
    import tritonclient.http as httpclient  # noqa: PLC0415

    rows = []
    for form in ("http-json", "http-binary", "grpc"):
        module = grpcclient if form == "grpc" else httpclient
        inputs = spec.build(module)
        if form == "http-json":
            arrays = _spec_arrays(spec)
            for inp in inputs:  # the same data again, as JSON: the form that crashes Triton 2.51
                inp.set_data_from_numpy(arrays[inp.name()], binary_data=False)
        name = _inflate(inputs)
        client = None
        try:
            if form == "grpc":
                client = grpcclient.InferenceServerClient(grpc_url)
                client.infer(spec.model, inputs, client_timeout=timeout_s)
            else:
                client = httpclient.InferenceServerClient(http_url, connection_timeout=timeout_s,
                                                          network_timeout=timeout_s)
                client.infer(spec.model, inputs)
            rows.append({"form": form, "input": name, "refused": False, "status": "ok",
                         "detail": "accepted (the server answered a request declaring 10^12 elements)"})
        except Exception as e:  # noqa: BLE001 - the expected outcome is an error; which one is the figure
            status, detail = _grpc_detail(e)
            clean = status in ("400", "StatusCode.INVALID_ARGUMENT")
            rows.append({"form": form, "input": name, "refused": clean, "status": status, "detail": detail})
        finally:
            if client is not None:
                client.close()
    return rows


def _spec_arrays(spec) -> dict:
    """{input name: numpy array} of the spec's request: its builder run against a recorder that
    stands in for a tritonclient module (tritonclient keeps only serialized bytes)."""
    arrays = {}

    class _Recorder:
        def __init__(self, name, shape, datatype):
            self.name = name

        def set_data_from_numpy(self, arr, binary_data=True):
            arrays[self.name] = arr
            return self

    class _Module:
        InferInput = _Recorder

    spec.build(_Module)
    return arrays
