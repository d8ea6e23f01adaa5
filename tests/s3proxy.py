"""An S3 endpoint that misbehaves, on loopback: a plain HTTP proxy in front of the moto server of
s3server.py, in a thread of the test process. ``mode`` says how it misbehaves:

- ``"ignore-conditions"``: drops If-None-Match and If-Match from every PUT (a server that ignores them);
- ``"refuse-conditions"``: answers 501 NotImplemented to a PUT that carries one (a server that refuses them);
- ``"500"``: answers every request with HTTP 500 InternalError (a server in trouble).

Every process that should reach it needs ``env`` with AWS_ENDPOINT_URL pointing here (``proxy_env``).
"""

from __future__ import annotations

import http.client
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

CONDITIONS = ("If-None-Match", "If-Match")
ERROR = b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>{message}</Message></Error>"


def _handler(upstream: str, mode: str):
    host, port = urlparse(upstream).hostname, urlparse(upstream).port

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # one line per request otherwise
            pass

        def _answer(self, status: int, code: str, message: str) -> None:
            body = ERROR.replace(b"{code}", code.encode()).replace(b"{message}", message.encode())
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            if mode == "500":
                self._answer(500, "InternalError", "We encountered an internal error. Please try again.")
                return
            conditional = self.command == "PUT" and any(h in self.headers for h in CONDITIONS)
            if mode == "refuse-conditions" and conditional:
                self._answer(501, "NotImplemented", "A header you provided implies functionality that is not implemented")
                return
            headers = {k: v for k, v in self.headers.items()
                       if not (mode == "ignore-conditions" and self.command == "PUT" and k in CONDITIONS)}
            conn = http.client.HTTPConnection(host, port, timeout=60)
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                r = conn.getresponse()
                data = r.read()
            finally:
                conn.close()
            self.send_response(r.status)
            for k, v in r.getheaders():
                if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    return Handler


@contextmanager
def s3_proxy(upstream_env: dict, mode: str):
    """Yields the AWS_* variables of ``upstream_env`` with the endpoint moved to the proxy."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(upstream_env["AWS_ENDPOINT_URL"], mode))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield {**upstream_env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{server.server_address[1]}"}
    finally:
        server.shutdown()
        server.server_close()
