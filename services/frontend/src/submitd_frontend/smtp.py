"""The frontend's I/O layer: connections, deadlines, the data rate, TLS and draining.

aiosmtpd supplies the protocol object and PROXY header parsing, through the one adapter that
names every internal relied on (:mod:`.aiosmtpd_adapter`). The dialog is
:class:`~.session.Session`: this layer gives it what the socket gives and writes its replies;
nothing here decides what a command means.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import ssl
import time
import uuid
from dataclasses import dataclass

from aiosmtpd.proxy_protocol import get_proxy
from aiosmtpd.smtp import SMTP
from opentelemetry import trace

from submitd.v1 import policy_pb2

from . import metrics, replies
from .aiosmtpd_adapter import abandon_tls, aiosmtpd_state, start_tls
from .backends import Rewriter
from .policy_client import PolicyStreams
from .session import Session
from .settings import Settings
from .submission import SessionBackends

log = logging.getLogger("submitd.frontend")
tracer = trace.get_tracer("submitd.frontend")

READ_SIZE = 64 << 10  # octets taken off the socket at a time
CLOSE_GRACE = 5.0  # seconds a closing session's last replies may take to reach the client


@dataclass
class Backends:
    settings: Settings
    policy: PolicyStreams
    rewriter: Rewriter


class Sessions:
    """The live sessions of this frontend: for limits and for draining."""

    def __init__(self) -> None:
        self.active: set["SubmissionSMTP"] = set()
        self.per_client: dict[str, int] = {}
        self.draining = False

    def add(self, session: "SubmissionSMTP", client: str) -> None:
        self.active.add(session)
        self.per_client[client] = self.per_client.get(client, 0) + 1

    def remove(self, session: "SubmissionSMTP", client: str) -> None:
        if session not in self.active:
            return
        self.active.discard(session)
        left = self.per_client.get(client, 1) - 1
        if left:
            self.per_client[client] = left
        else:
            self.per_client.pop(client, None)


class Balancers:
    """The load balancers whose PROXY header is believed (PROXY_TRUSTED_NETWORKS)."""

    def __init__(self, networks: list[str]) -> None:
        self.networks = tuple(ipaddress.ip_network(n) for n in networks)

    def listed(self, peer: str) -> bool:
        try:
            address = ipaddress.ip_address(peer.partition("%")[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped  # a dual-stack listener's IPv4 peer
        return any(address in network for network in self.networks)


class SubmissionSMTP(SMTP):
    """One client connection: the :class:`~.session.Connection` its dialog runs on."""

    line_length_limit = READ_SIZE  # the reader's buffer (lines are checked by the dialog)

    def __init__(self, backends: Backends, sessions: Sessions, *, implicit_tls: bool, tls_context: ssl.SSLContext | None,
                 balancers: Balancers | None = None):
        """``balancers``: this listener takes a PROXY header, from them alone."""
        s = backends.settings
        aiosmtpd_state(
            self, hostname=s.hostname, ident="ESMTP submitd", tls_context=tls_context,
            data_size_limit=s.max_message_size,
            # aiosmtpd's idle timer is only a backstop; the deadlines are set by expect().
            timeout=s.command_timeout + s.data_read_timeout,
        )
        self.settings = s
        self.backends = backends
        self.sessions = sessions
        self.implicit_tls = implicit_tls
        self.balancers = balancers
        self.handshaking = False  # TLS not yet up: nothing may be written in the clear
        self._abort_handle: asyncio.TimerHandle | None = None  # close_transport's deadline
        self.dialog: Session | None = None
        self.session_id = uuid.uuid4().hex[:16]
        self.client_address = ""
        self._content = False  # reading message content (DATA or a BDAT chunk)
        self._content_started = self._deadline_moved = 0.0
        self._received = 0

    # -- the Connection a dialog runs on ---------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    @property
    def in_data(self) -> bool:
        """Until the reply to its content is written: the drain lets such a session finish."""
        return self.dialog is not None and self.dialog.state.in_data

    @property
    def tls_active(self) -> bool:
        return self._tls_protocol is not None

    def expect(self, content: bool) -> None:
        """A command line is read whole within COMMAND_TIMEOUT (a deadline, not an idle timer: a
        client dripping one byte at a time cannot hold the session); content within
        DATA_READ_TIMEOUT of each block, at MIN_DATA_RATE on average after DATA_RATE_GRACE."""
        self._content = content
        self._reset_timeout(self.settings.data_read_timeout if content else self.settings.command_timeout)
        if content:
            self._content_started = self._deadline_moved = time.monotonic()
            self._received = 0

    async def read(self) -> bytes:
        if self._content:
            now = time.monotonic()
            if now - self._deadline_moved > 0.5:
                # The idle deadline moves on at most twice a second, not for every read (a timer
                # handle each time): a client is cut within half a second of it.
                self._reset_timeout(self.settings.data_read_timeout)
                self._deadline_moved = now
                self._check_rate(now)
        data = await self._reader.read(READ_SIZE)
        self._received += len(data)
        return data

    def _check_rate(self, now: float) -> None:
        """A client slower than the minimum data rate is told 421 and the session ends here."""
        elapsed = now - self._content_started
        if elapsed > self.settings.data_rate_grace and self._received < self.settings.min_data_rate * elapsed:
            log.warning("data rate too low", extra={"fields": {"peer": self.client_address, "session": self.session_id}})
            self._writer.write(replies.DATA_TOO_SLOW.encode() + b"\r\n")
            metrics.count_reply(replies.DATA_TOO_SLOW)
            self.close_transport()
            raise ConnectionAbortedError("data rate too low")

    async def write(self, reply: str) -> None:
        self._writer.write(reply.encode() + b"\r\n")
        await self._writer.drain()

    def close(self) -> None:
        self.close_transport()

    def _tls_info(self) -> policy_pb2.TlsInfo:
        obj = self.transport.get_extra_info("ssl_object") if self.transport else None
        if obj is None:
            return policy_pb2.TlsInfo()
        return policy_pb2.TlsInfo(version=obj.version() or "", cipher=(obj.cipher() or ("",))[0])

    async def start_tls(self) -> policy_pb2.TlsInfo | None:
        """The TLS handshake (port 465's, or after STARTTLS) within TLS_HANDSHAKE_TIMEOUT; None
        if it failed or the connection was closed meanwhile."""
        self.handshaking = True
        try:
            await start_tls(self, self.tls_context, self.settings.tls_handshake_timeout)
        except (ConnectionError, OSError, asyncio.TimeoutError, ssl.SSLError) as e:
            log.info("TLS handshake failed", extra={"fields": {"peer": self.client_address, "error": repr(e)}})
            metrics.TLS_FAILURES.inc()
            # asyncio never calls connection_lost for a handshake that failed: nothing of this
            # session (its idle timer, its TLS layer) may outlive it.
            abandon_tls(self)
            return None
        finally:
            self.handshaking = False
        if self.closed:
            # Closed during the handshake (the drain, or a client gone): asyncio then wakes the
            # handshake's waiter without an error and never reports the connection lost to this
            # protocol, so the next read would wait for ever (it held whole drains): end here.
            return None
        info = self._tls_info()
        metrics.TLS.labels(info.version or "unknown").inc()
        return info

    # -- the connection's life -------------------------------------------------------------------

    async def _handle_client(self) -> None:
        assert self.session is not None
        peer = self.session.peer or ("", 0)
        sockname = self.transport.get_extra_info("sockname") if self.transport else None
        self.client_address = str(peer[0])
        if self.balancers is not None and not self.balancers.listed(self.client_address):
            # Anyone else's PROXY header would choose the client address that lockouts, limits and
            # TRUSTED_NETWORKS go by: nothing this peer sent is read, not even as a header.
            log.warning("connection to a PROXY port from outside PROXY_TRUSTED_NETWORKS: closed", extra={"fields": {
                "peer": self.client_address, "port": sockname[1] if sockname else 0}})
            metrics.PROXY_REFUSED.labels("untrusted_peer").inc()
            self.transport.abort()
            return
        with tracer.start_as_current_span(
            "smtp.session",
            kind=trace.SpanKind.SERVER,
            attributes={
                "network.peer.address": self.client_address,
                "network.peer.port": int(peer[1]) if len(peer) > 1 else 0,
                "server.port": sockname[1] if sockname else 0,
                "submitd.session_id": self.session_id,
                "smtp.implicit_tls": self.implicit_tls,
            },
        ) as span:
            proxy_address = ""
            if self.balancers is not None:
                try:
                    proxy = await asyncio.wait_for(get_proxy(self._reader), 10)
                except (asyncio.TimeoutError, ConnectionError, asyncio.IncompleteReadError):
                    proxy = None
                if proxy is None or not proxy.valid or proxy.src_addr is None:
                    log.warning("invalid or missing PROXY header", extra={"fields": {"peer": self.client_address}})
                    metrics.PROXY_REFUSED.labels("invalid_header").inc()
                    self.close_transport()
                    return
                proxy_address = str(proxy.src_addr)
                self.client_address = proxy_address
                span.set_attribute("client.address", proxy_address)
            self.sessions.add(self, self.client_address)
            metrics.SESSIONS.inc()
            metrics.SESSIONS_ACTIVE.inc()
            policy = None
            try:
                refusal = self._admission()
                if refusal:
                    if self.implicit_tls:  # a TLS client cannot read a reply in the clear
                        log.info("refused before TLS", extra={"fields": {"peer": self.client_address, "reply": refusal}})
                        self.transport.abort()
                        return
                    await self.write(refusal)
                    metrics.count_reply(refusal)
                    self.close_transport()
                    return
                if self.implicit_tls and await self.start_tls() is None:
                    return
                # Policy hears of the connection with the session's first question: a client
                # that connects and leaves, or never gets that far, costs policy nothing.
                policy = self.backends.policy.session(self.session_id)
                policy.note(connect=policy_pb2.Connect(
                    session_id=self.session_id, peer_address=str(peer[0]), peer_port=int(peer[1]) if len(peer) > 1 else 0,
                    local_port=sockname[1] if sockname else 0, implicit_tls=self.implicit_tls, tls=self._tls_info(),
                    proxy_address=proxy_address,
                ))
                self.dialog = Session(
                    self.settings, self, SessionBackends(self.backends, policy), tls=self.tls_active,
                    starttls=self.tls_context is not None and not self.implicit_tls,
                    client_address=self.client_address, session_id=self.session_id,
                    tls_info=self._tls_info() if self.tls_active else None,
                )
                await self.dialog.run()
            except (ConnectionError, EOFError):
                pass
            finally:
                metrics.SESSIONS_ACTIVE.dec()
                dialog = self.dialog
                if dialog is not None:
                    await dialog.end()
                self.sessions.remove(self, self.client_address)
                log.info("session closed", extra={"fields": {
                    "session": self.session_id, "peer": self.client_address,
                    "user": dialog.state.user if dialog else None, "tls": self.tls_active,
                    "queued": list(dialog.accepted) if dialog else [],
                    "queued_count": dialog.accepted_count if dialog else 0, "refused": dialog.refused if dialog else 0,
                    "errors": dialog.errors if dialog else 0,
                }})
                if policy is not None:
                    policy.close()
                if self.transport is not None:
                    self.close_transport()

    def _admission(self) -> str | None:
        if self.sessions.draining:
            return replies.DRAINING
        if len(self.sessions.active) > self.settings.max_sessions:
            return replies.TOO_MANY_SESSIONS
        if self.sessions.per_client.get(self.client_address, 0) > self.settings.max_connections_per_client:
            return replies.TOO_MANY_CONNECTIONS
        return None

    def _timeout_cb(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            try:
                self._writer.write(replies.TIMEOUT.encode() + b"\r\n")
            except Exception:
                pass
        log.info("session timed out", extra={"fields": {"peer": self.client_address, "session": self.session_id}})
        self.close_transport()

    def close_transport(self) -> None:
        """Close after what is written has gone; a client that does not read its replies
        (so that they never go), or a TLS client that never sends its close_notify (asyncio
        waits 30 s for it: a drain with such a session took 30 s instead of a moment), is cut
        CLOSE_GRACE seconds later."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return  # closed already (a TLS transport must not be asked again)
        transport.close()
        # Always (a STARTTLS handshake still running when the drain closed the session held it
        # too); cancelled when the connection ends, so a closed session is not kept alive by it.
        self._abort_handle = self.loop.call_later(CLOSE_GRACE, transport.abort)

    def connection_lost(self, error: Exception | None) -> None:
        if self._abort_handle is not None:
            self._abort_handle.cancel()
            self._abort_handle = None
        super().connection_lost(error)
