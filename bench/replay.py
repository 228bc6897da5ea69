"""Lightweight stand-ins for Triton instances: one asyncio process listening on 2 x N loopback
ports, answering `GET /v2/health/ready` with 200 on the "HTTP" port and `GET /metrics` on the
"metrics" port with a recorded Triton metrics text (tests/fixtures/triton_metrics_cpu.txt) whose
counters grow with every scrape (so the poller computes non-zero rates, as against a live Triton).
HTTP/1.1 keep-alive, like Triton.

    python -m bench.replay --instances 100 [--metrics FILE]
    -> prints one JSON line [[http_port, metrics_port], ...] and serves until stdin closes.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
from pathlib import Path

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "triton_metrics_cpu.txt"
# Counters that grow per scrape; gauges (pending, utilization, memory) stay as recorded.
COUNTER = re.compile(r"^(nv_inference_(?:request_success|request_failure|count|exec_count|request_duration_us|"
                     r"queue_duration_us|compute_input_duration_us|compute_infer_duration_us|"
                     r"compute_output_duration_us)\{[^}]*\})\s+([0-9.eE+-]+)$")


class MetricsText:
    def __init__(self, text: str):
        self.lines = []
        for line in text.splitlines():
            m = COUNTER.match(line)
            self.lines.append((m.group(1), float(m.group(2))) if m else (line, None))

    def render(self, scrape: int) -> bytes:
        out = []
        for head, value in self.lines:
            out.append(head if value is None else f"{head} {value * (scrape + 1):g}")
        return ("\n".join(out) + "\n").encode()


async def _serve_conn(reader, writer, kind: str, text: MetricsText, counter: list[int]):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            line = head.split(b"\r\n", 1)[0].decode(errors="replace")
            parts = line.split()
            path = parts[1] if len(parts) > 1 else "/"
            length = 0
            for h in head.split(b"\r\n")[1:]:
                if h.lower().startswith(b"content-length:"):
                    length = int(h.split(b":", 1)[1])
            if length:
                await reader.readexactly(length)
            if kind == "http" and path.startswith("/v2/health/"):
                status, body, ctype = "200 OK", b"", "text/plain"
            elif kind == "metrics" and path.startswith("/metrics"):
                counter[0] += 1
                status, body, ctype = "200 OK", text.render(counter[0]), "text/plain; charset=utf-8"
            else:
                status, body, ctype = "404 Not Found", b"", "text/plain"
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                         + body)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()


async def main_async(n: int, metrics_file: Path) -> None:
    text = MetricsText(metrics_file.read_text())
    ports = []
    servers = []
    for _ in range(n):
        counter = [0]
        pair = []
        for kind in ("http", "metrics"):
            srv = await asyncio.start_server(
                lambda r, w, kind=kind, counter=counter: _serve_conn(r, w, kind, text, counter), "127.0.0.1", 0)
            servers.append(srv)
            pair.append(srv.sockets[0].getsockname()[1])
        ports.append(pair)
    print(json.dumps(ports), flush=True)
    loop = asyncio.get_running_loop()
    # Serve until the parent closes our stdin (or dies).
    await loop.run_in_executor(None, sys.stdin.read)
    os._exit(0)  # no teardown of hundreds of open connections


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", type=int, required=True)
    ap.add_argument("--metrics", type=Path, default=FIXTURE)
    a = ap.parse_args(argv)
    asyncio.run(main_async(a.instances, a.metrics))


if __name__ == "__main__":
    main()
