"""Tiny HTTP stand-ins for things that are not under test (a recorded /metrics page, a Prometheus
query API answering recorded data): one quiet handler base with one way to answer."""
from __future__ import annotations

from http.server import BaseHTTPRequestHandler


class QuietHandler(BaseHTTPRequestHandler):
    def log_message(self, *a):  # test output stays readable
        pass

    def reply(self, body: bytes, content_type: str = "text/plain; version=0.0.4", code: int = 200) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
