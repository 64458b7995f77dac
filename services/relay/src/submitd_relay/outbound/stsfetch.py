"""The HTTPS half of MTA-STS (RFC 8461 §3.3): one GET of ``https://mta-sts.<domain>/.well-known/
mta-sts.txt`` with a verified certificate, no redirects and a size limit. The policy host's name
is resolved by the relay's own resolver (the one its MX lookups use), never the system's, and is
held to the same address rule as MX hosts."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable

import aiohttp
import dns.asyncresolver

from . import results
from .resolving import RelayResolver

log = logging.getLogger(__name__)

MAX_POLICY_BYTES = 64 * 1024  # §3.3's suggested limit
WELL_KNOWN = "/.well-known/mta-sts.txt"
CLOSE_WAIT = 2.0  # for the TLS goodbyes of fetches just made, at close (then cut)


class FetchFailed(Exception):
    """No usable policy came back; ``result_type`` is RFC 8460's name for why."""

    def __init__(self, result_type: str, detail: str) -> None:
        super().__init__(detail)
        self.result_type = result_type
        self.detail = detail


class PolicyFetcher:
    """Fetches policy texts; ``fetch`` raises FetchFailed for anything but a 200 text/plain answer
    from a host whose certificate chains to ``ca_file`` (or the system store) and names it."""

    def __init__(self, resolver: dns.asyncresolver.Resolver, reachable: Callable[[str], bool], *,
                 port: int = 443, ca_file: str | None = None, timeout: float = 10.0) -> None:
        self.resolver = RelayResolver(resolver, reachable)
        self.port = port
        self.timeout = timeout
        # Certificate and host name checked (RFC 8461 §3.3); loaded once, at start.
        self.tls = ssl.create_default_context(cafile=ca_file)
        self._session: aiohttp.ClientSession | None = None

    def url(self, domain: str) -> str:
        port = "" if self.port == 443 else f":{self.port}"
        return f"https://mta-sts.{domain}{port}{WELL_KNOWN}"

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = _Connector(resolver=self.resolver, ssl=self.tls, use_dns_cache=False,
                                   force_close=True)  # a fetch a day per domain: no idle sockets
            self._session = aiohttp.ClientSession(
                connector=connector, trust_env=False, cookie_jar=aiohttp.DummyCookieJar(),
                headers={"User-Agent": "submitd-relay (MTA-STS)"})
        return self._session

    async def fetch(self, domain: str) -> str:
        url = self.url(domain)
        try:
            # No redirects (§3.3) and no HTTP cache: aiohttp keeps none.
            async with self.session().get(url, allow_redirects=False,
                                          timeout=aiohttp.ClientTimeout(total=self.timeout)) as resp:
                try:
                    return await self._read(url, resp)
                except BaseException:
                    # Not a polite TLS shutdown with a host still sending what we refuse to read:
                    # the connection is closed (its socket with it) and never reused.
                    resp.close()
                    raise
        except aiohttp.ClientConnectorCertificateError as e:
            why = getattr(e.certificate_error, "verify_message", None) or e.certificate_error
            raise FetchFailed(results.STS_WEBPKI_INVALID, f"{url}: certificate not valid: {why}") from None
        except aiohttp.ClientConnectorDNSError as e:
            raise FetchFailed(results.STS_POLICY_FETCH_ERROR, f"{url}: {e.os_error}") from None
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise FetchFailed(results.STS_POLICY_FETCH_ERROR, f"{url}: {type(e).__name__} {e}".rstrip()) from None

    async def _read(self, url: str, resp: aiohttp.ClientResponse) -> str:
        if resp.status != 200:
            where = f" to {resp.headers.get('Location')}" if 300 <= resp.status < 400 else ""
            raise FetchFailed(results.STS_POLICY_FETCH_ERROR, f"{url}: HTTP {resp.status}{where}")
        if resp.content_type != "text/plain":  # §3.2; its parameters (charset) do not matter
            raise FetchFailed(results.STS_POLICY_INVALID, f"{url}: Content-Type {resp.content_type}, not text/plain")
        too_large = FetchFailed(results.STS_POLICY_FETCH_ERROR, f"{url}: larger than {MAX_POLICY_BYTES} bytes")
        if (resp.content_length or 0) > MAX_POLICY_BYTES:
            raise too_large
        body = bytearray()
        async for chunk in resp.content.iter_chunked(16384):
            body += chunk
            if len(body) > MAX_POLICY_BYTES:
                raise too_large
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError:
            raise FetchFailed(results.STS_POLICY_INVALID, f"{url}: not UTF-8") from None

    async def close(self) -> None:
        """Close the session, and wait (at most CLOSE_WAIT seconds) for the TLS goodbyes of
        connections still closing; any still open then are cut. A loop that ended first would
        leave their sockets open until garbage collection."""
        if self._session is None:
            return
        connector = self._session.connector  # (a _Connector: session() makes no other)
        await self._session.close()
        self._session = None
        await connector.closed_all(CLOSE_WAIT)


class _Connector(aiohttp.TCPConnector):
    """Remembers its connections while they are open: each is closed after its one answer
    (force_close), and a TLS close waits for the host's own close_notify (asyncio allows it
    30 s), so a connection may still be closing when the fetcher is; ``closed_all`` waits for
    those, then cuts them. (By id, not weakly: uvloop's transports take no weak references.)"""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.open: dict[int, tuple[asyncio.Future, asyncio.Transport | None]] = {}

    async def _create_connection(self, req, traces, timeout):
        proto = await super()._create_connection(req, traces, timeout)
        closed = proto.closed  # (resolved when the connection is lost)
        if closed is not None:
            key = id(proto)
            # The protocol lets go of its transport as soon as it is closed: kept here.
            self.open[key] = (closed, proto.transport)
            closed.add_done_callback(lambda done, key=key: self._lost(key, done))
        return proto

    def _lost(self, key: int, done: asyncio.Future) -> None:
        self.open.pop(key, None)
        if not done.cancelled():
            done.exception()  # (a connection lost with an error: nobody else asks)

    async def closed_all(self, timeout: float) -> None:
        if self.open:
            await asyncio.wait([closed for closed, _ in self.open.values()], timeout=timeout)
        for _, transport in list(self.open.values()):
            if transport is not None:
                transport.abort()
        self.open.clear()
        await asyncio.sleep(0)  # their sockets close now
