"""A small HTTPS server on a loopback address for tests: it records every POST (a TLS report,
RFC 8460 §5.4) and answers GETs from a table, with the certificate the test gives it.

    server = HttpsServer(issued.server_context(), host="127.0.0.5").start()
    ...
    server.posts[0].body, server.posts[0].headers["Content-Type"]
"""

from __future__ import annotations

import ssl
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .ports import free_port


@dataclass
class Posted:
    path: str
    headers: dict[str, str]
    body: bytes


class HttpsServer:
    def __init__(self, context: ssl.SSLContext, *, host: str = "127.0.0.1", port: int = 0,
                 pages: dict[str, bytes] | None = None, post_status: int = 200) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.pages = dict(pages or {})
        self.post_status = post_status  # what every POST is answered
        self.posts: list[Posted] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                page = server.pages.get(self.path)
                self._answer(200 if page is not None else 404, page or b"not found\n")

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with server.lock:
                    server.posts.append(Posted(self.path, dict(self.headers.items()), body))
                self._answer(server.post_status, b"")

            def _answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args) -> None:
                pass

        self._server = ThreadingHTTPServer((host, self.port), Handler, bind_and_activate=True)
        self._server.daemon_threads = True
        # The handshake happens at accept: a client that refuses the certificate ends there.
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True, name="https")

    def start(self) -> "HttpsServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(2)
