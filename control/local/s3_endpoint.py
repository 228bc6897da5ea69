"""The local S3 endpoint: moto's standalone server (DESIGN.md fact 5), supervised like every other
component. It keeps objects in memory: `down` loses them and `up` publishes the repository again
from the build output on disk (the source of truth). Production points at AWS S3, MinIO or Ceph
RGW with `s3.endpoint_url` and `s3.start_local_server: false`."""
from __future__ import annotations

import sys
from pathlib import Path

from control.local.procs import ManagedProcess, http_ok, require_free_ports, start_ready

NAME = "s3"


def moto_server_binary() -> Path:
    return Path(sys.executable).parent / "moto_server"


def start_s3_server(settings, name: str = NAME, timeout: float = 30.0) -> ManagedProcess:
    host, port = settings.s3.host, settings.s3.port
    require_free_ports(name, [("s3.port", host, port)])
    return start_ready(name, [str(moto_server_binary()), "-H", host, "-p", str(port)], settings.run_path,
                       lambda: http_ok(f"http://{host}:{port}/moto-api/"), timeout, "answering HTTP")
