"""The local S3 endpoint: moto's standalone server (DESIGN.md fact 5), supervised like every other
component. It keeps objects in memory: `down` loses them and `up` publishes the repository again
from the build output on disk (the source of truth). Production points at AWS S3, MinIO or Ceph
RGW with `s3.endpoint_url` and `s3.start_local_server: false`."""
from __future__ import annotations

import sys
from pathlib import Path

from control.local.procs import (
    ComponentError,
    ManagedProcess,
    http_ok,
    port_in_use,
    start_process,
    wait_for_process,
)

NAME = "s3"


def moto_server_binary() -> Path:
    return Path(sys.executable).parent / "moto_server"


def start_s3_server(settings, name: str = NAME, timeout: float = 30.0) -> ManagedProcess:
    host, port = settings.s3.host, settings.s3.port
    if port_in_use(host, port):
        raise ComponentError(name, f"port {host}:{port} is already in use; free it or set s3.port in the config")
    proc = start_process(name, [str(moto_server_binary()), "-H", host, "-p", str(port)], settings.run_path)
    try:
        wait_for_process(lambda: http_ok(f"http://{host}:{port}/moto-api/"), proc, timeout, "answering HTTP")
    except ComponentError:
        proc.stop()
        raise
    return proc
