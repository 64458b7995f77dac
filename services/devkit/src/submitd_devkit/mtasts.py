"""An HTTPS server on 127.0.0.1 for MTA-STS tests: it serves ``/.well-known/mta-sts.txt`` for any
``mta-sts.<domain>`` the test's DNS points at it (RFC 8461 §3.3), with a certificate from the
test's CA for the name the client asks for (SNI), and takes POSTs (TLS-RPT's https reports,
RFC 8460 §3) on any path.

    server = PolicyServer(ca).start()
    server.serve("example.net", "version: STSv1\\nmode: enforce\\nmx: mx.example.net\\nmax_age: 86400\\n")
    server.serve("bad.example", POLICY, certificate="untrusted")   # or "wrong-name"
    server.fetches["example.net"]; server.stop(); server.start()    # "policy server down", and back
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections import Counter
from dataclasses import dataclass, field

from aiohttp import web

from .certs import CertificateAuthority
from .ports import free_port

GOOD, WRONG_NAME, UNTRUSTED = "good", "wrong-name", "untrusted"


@dataclass
class Served:
    """What a domain's policy host answers."""

    text: str | None  # the body; None: 404
    content_type: str = "text/plain"
    status: int = 200
    location: str | None = None  # with a 3xx status: a redirect
    certificate: str = GOOD  # GOOD, WRONG_NAME (the test CA's, for another name) or UNTRUSTED (another CA's)
    chunked: bool = False  # no Content-Length: the body in chunks
    deaf_after: float = 0.0  # after answering, read nothing on that connection for this long (no TLS goodbye)


@dataclass(frozen=True)
class Posted:
    host: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


class PolicyServer:
    def __init__(self, ca: CertificateAuthority, port: int = 0) -> None:
        self.ca = ca
        self.untrusted_ca = CertificateAuthority(ca.directory / "untrusted-ca", name="a CA nobody trusts")
        self.port = port or free_port()
        self.served: dict[str, Served] = {}
        self.certificates: dict[str, str] = {}  # a host name (not a policy host) -> GOOD/WRONG_NAME/UNTRUSTED
        self.fetches: Counter[str] = Counter()  # policy GETs per domain
        self.posts: list[Posted] = []
        self.post_status = 200
        self._contexts: dict[tuple[str, str], ssl.SSLContext] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def serve(self, domain: str, text: str | None, **how) -> None:
        """Serve ``text`` as ``domain``'s policy from now on (``how``: Served's other fields)."""
        self.served[domain.lower()] = Served(text, **how)

    def url(self, domain: str) -> str:
        return f"https://mta-sts.{domain}:{self.port}/.well-known/mta-sts.txt"

    def report_url(self, host: str, path: str = "/tlsrpt") -> str:
        """An https ``rua`` (RFC 8460 §3) on this server: ``host`` must resolve to 127.0.0.1."""
        return f"https://{host}:{self.port}{path}"

    def start(self) -> "PolicyServer":
        """Listen (again, on the same port, after ``stop``)."""
        ready = threading.Event()
        failed: list[BaseException] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, args=(ready, failed), daemon=True, name="mta-sts")
        self._thread.start()
        if not ready.wait(10) or failed:
            raise RuntimeError(f"MTA-STS policy server did not start: {failed[:1]}")
        return self

    def stop(self) -> None:
        """Close the listener: clients then get "connection refused"."""
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop = self._thread = None

    # The server's own thread and loop

    def _run(self, ready: threading.Event, failed: list[BaseException]) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        app = web.Application()
        app.router.add_get("/.well-known/mta-sts.txt", self._policy)
        app.router.add_post("/{path:.*}", self._post)
        runner = web.AppRunner(app, access_log=None)
        try:
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, "127.0.0.1", self.port, ssl_context=self._tls("localhost", GOOD))
            loop.run_until_complete(site.start())
        except BaseException as e:
            failed.append(e)
            ready.set()
            loop.run_until_complete(runner.cleanup())
            loop.close()
            return
        ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(runner.cleanup())
            loop.close()

    def _tls(self, name: str, kind: str) -> ssl.SSLContext:
        context = self._contexts.get((name, kind))
        if context is None:
            if kind == WRONG_NAME:
                cert, key = self.ca.issue(f"wrong-name-{name}", dns_names=[f"not-{name}"])
            elif kind == UNTRUSTED:
                cert, key = self.untrusted_ca.issue(name, dns_names=[name])
            else:
                cert, key = self.ca.issue(f"https-{name}", dns_names=[name])
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(cert, key)
            context.sni_callback = self._sni
            self._contexts[(name, kind)] = context
        return context

    def _sni(self, connection, server_name: str | None, _context) -> None:
        if not server_name:
            return
        name = server_name.lower()
        if name in self.certificates:
            kind = self.certificates[name]
        else:
            served = self.served.get(name.removeprefix("mta-sts."))
            kind = served.certificate if served and name.startswith("mta-sts.") else GOOD
        connection.context = self._tls(name, kind)

    async def _policy(self, request: web.Request) -> web.Response:
        domain = request.host.rsplit(":", 1)[0].lower().removeprefix("mta-sts.")
        self.fetches[domain] += 1
        served = self.served.get(domain)
        if served is None or (served.text is None and served.location is None):
            return web.Response(status=404, text="no policy here\n")
        headers = {"Location": served.location} if served.location else {}
        headers["Content-Type"] = served.content_type
        body = (served.text or "").encode()
        if served.deaf_after:
            # The answer, written by hand; then a host that neither reads, nor answers the
            # client's close_notify, nor closes, for ``deaf_after`` seconds.
            transport = request.transport
            head = "".join(f"{k}: {v}\r\n" for k, v in {**headers, "Content-Length": len(body)}.items())
            transport.write(f"HTTP/1.1 {served.status} OK\r\n{head}\r\n".encode() + body)
            transport.pause_reading()
            await asyncio.sleep(served.deaf_after)
            transport.abort()
            raise asyncio.CancelledError  # (no answer of aiohttp's own)
        if not served.chunked:
            return web.Response(status=served.status, body=body, headers=headers)
        response = web.StreamResponse(status=served.status, headers=headers)
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, len(body), 4096):
            await response.write(body[start:start + 4096])
        await response.write_eof()
        return response

    async def _post(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.posts.append(Posted(request.host.rsplit(":", 1)[0], request.path, dict(request.headers), body))
        return web.Response(status=self.post_status)
