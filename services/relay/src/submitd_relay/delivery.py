"""Delivery to the next hop: a smarthost, or each recipient domain's MX hosts.

Connections are pooled per host and reused for later messages; deliveries to one destination
(the smarthost, or one recipient domain) are limited to DESTINATION_CONCURRENCY at a time. One
SMTP transaction per message and destination, and an outcome for every recipient."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import defaultdict

import aiosmtplib
from opentelemetry import trace

from submitd.v1 import common_pb2

from .model import Body, NextHopError, Outcome
from .routes import Host, MxResolver, RouteError
from .settings import Settings
from .transaction import transaction

log = logging.getLogger("submitd.relay")
tracer = trace.get_tracer("submitd.relay")
IDLE_SECONDS = 30.0  # an idle connection older than this is closed, not reused


class NextHopPool:
    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.idle: dict[Host, list[tuple[aiosmtplib.SMTP, float]]] = defaultdict(list)
        self.slots: dict[str, asyncio.Semaphore] = {}
        self.smarthost = (
            Host(settings.next_hop_host, settings.next_hop_host, settings.next_hop_port)
            if settings.next_hop_host else None
        )
        self.resolver = None if self.smarthost else MxResolver(settings)
        self.name = f"{self.smarthost.name}:{self.smarthost.port}" if self.smarthost else "mx"

    def _tls_context(self, mx: bool) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=None if mx else self.s.next_hop_ca_file)
        if mx or not self.s.next_hop_verify_tls:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    async def _connect(self, host: Host) -> aiosmtplib.SMTP:
        mx = self.smarthost is None
        mode = self.s.mx_tls if mx else self.s.next_hop_tls
        start_tls = {"none": False, "opportunistic": None, "required": True}[mode]

        def make(start_tls: bool | None) -> aiosmtplib.SMTP:
            return aiosmtplib.SMTP(
                hostname=host.address,
                port=host.port,
                local_hostname=self.s.helo_name,
                timeout=self.s.command_timeout,
                start_tls=start_tls,
                tls_context=self._tls_context(mx) if start_tls is not False else None,
            )

        async def open(client: aiosmtplib.SMTP) -> aiosmtplib.SMTP:
            try:
                await asyncio.wait_for(client.connect(), self.s.connect_timeout)
                if not mx and self.s.next_hop_username:
                    if client.get_transport_info("ssl_object") is None:
                        # A next hop that offers no STARTTLS (or one that is stripped on the
                        # way) never gets the password in clear: the message waits.
                        raise aiosmtplib.SMTPException("no TLS: the smarthost password is not sent in clear")
                    await client.login(self.s.next_hop_username, self.s.next_hop_password or "")
                if not client.esmtp_extensions:
                    # After STARTTLS (or with no TLS at all) aiosmtplib has not asked EHLO yet:
                    # every extension would look absent, and an 8-bit message would bounce.
                    try:
                        await client.ehlo()
                    except aiosmtplib.SMTPHeloError:
                        await client.helo()
            except BaseException:
                client.close()
                raise
            return client

        client = make(start_tls)
        try:
            return await open(client)
        except (ssl.SSLError, aiosmtplib.SMTPServerDisconnected) as e:
            # Opportunistic TLS (RFC 7435) that fails falls back to a clear connection, as
            # other MTAs do, but never where a password would then cross in clear.
            if start_tls is not None or (not mx and self.s.next_hop_username):
                raise
            log.info("STARTTLS with %s:%s failed (%r): delivering without TLS", host.name, host.port, e)
            return await open(make(False))

    def _slot(self, destination: str) -> asyncio.Semaphore:
        if destination not in self.slots:
            self.slots[destination] = asyncio.Semaphore(self.s.destination_concurrency)
        return self.slots[destination]

    async def deliver(self, envelope: common_pb2.Envelope, body: Body) -> Outcome:
        """Deliver to every recipient of ``envelope``: one transaction per destination."""
        if self.smarthost:
            groups = {self.name: list(envelope.recipients)}
        else:
            groups = defaultdict(list)
            for r in envelope.recipients:
                groups[r.address.rpartition("@")[2].lower()].append(r)
        results = await asyncio.gather(
            *(self._deliver_to(d, rs, envelope, body) for d, rs in groups.items()), return_exceptions=True
        )
        outcome = Outcome()
        for (destination, recipients), result in zip(groups.items(), results):
            if isinstance(result, BaseException):
                if isinstance(result, asyncio.CancelledError):
                    raise result
                # One destination's trouble must not undo what the others delivered.
                log.error("delivery to %s failed: %r", destination, result)
                result = Outcome(next_hop=destination)
                result.fail_all([r.address for r in recipients], 451, f"4.3.0 Internal error delivering to {destination}")
            outcome.merge(result)
        return outcome

    async def _deliver_to(
        self, destination: str, recipients: list[common_pb2.Recipient], envelope: common_pb2.Envelope, body: Body
    ) -> Outcome:
        part = common_pb2.Envelope()
        part.CopyFrom(envelope)
        del part.recipients[:]
        part.recipients.extend(recipients)
        addresses = [r.address for r in recipients]
        outcome = Outcome(next_hop=destination)
        try:
            hosts = [self.smarthost] if self.smarthost else await self.resolver.hosts(destination)
        except RouteError as e:
            outcome.fail_all(addresses, e.code, e.text)
            return outcome
        async with self._slot(destination):
            last: Exception | None = None
            for host in hosts:
                try:
                    result = await self._on_host(host, part, body)
                    result.next_hop = f"{host.name}:{host.port}"
                    return result
                except NextHopError as e:  # the next MX host, if there is one
                    last = e
                    log.info("next hop %s:%s failed: %s", host.name, host.port, e)
        outcome.fail_all(addresses, 451, f"4.4.1 next hop {hosts[-1].name}: {last}", hosts[-1].name)
        return outcome

    def _take_idle(self, host: Host) -> aiosmtplib.SMTP | None:
        idle = self.idle[host]
        while idle:
            client, since = idle.pop()
            if client.is_connected and time.monotonic() - since < IDLE_SECONDS:
                return client
            client.close()
        return None

    def _give_back(self, host: Host, client: aiosmtplib.SMTP) -> None:
        idle = self.idle[host]
        if len(idle) >= self.s.destination_concurrency:
            client.close()
        else:
            idle.append((client, time.monotonic()))

    async def _on_host(self, host: Host, envelope: common_pb2.Envelope, body: Body) -> Outcome:
        client = self._take_idle(host)
        reused = client is not None
        try:
            if client is None:
                client = await self._traced_connect(host)
            try:
                outcome = await self._traced_transaction(client, envelope, body, host)
            except aiosmtplib.SMTPServerDisconnected:
                if not reused:
                    raise
                # An idle connection the next hop had closed: once more on a new one.
                client.close()
                client = await self._traced_connect(host)
                outcome = await self._traced_transaction(client, envelope, body, host)
        except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError) as e:
            if client is not None:
                client.close()
            if isinstance(e, aiosmtplib.SMTPResponseException):
                # Refused at connect, EHLO or AUTH: the message may go through later or elsewhere.
                raise NextHopError(f"{e.code} {e.message}") from e
            raise NextHopError(str(e) or type(e).__name__) from e
        except BaseException:
            if client is not None:
                client.close()
            raise
        if client.is_connected:
            self._give_back(host, client)
        return outcome

    async def _traced_connect(self, host: Host) -> aiosmtplib.SMTP:
        """A new connection (TCP, STARTTLS, AUTH, EHLO): a span of its own, where a slow TLS
        handshake or a slow greeting shows."""
        with tracer.start_as_current_span(
            "smtp.connect", kind=trace.SpanKind.CLIENT,
            attributes={"server.address": host.name, "server.port": host.port},
        ) as span:
            client = await self._connect(host)
            tls = client.get_transport_info("ssl_object") if client.transport else None
            span.set_attribute("tls.protocol.version", tls.version() if tls else "")
            return client

    async def _traced_transaction(
        self, client: aiosmtplib.SMTP, envelope: common_pb2.Envelope, body: Body, host: Host
    ) -> Outcome:
        with tracer.start_as_current_span(
            "smtp.transaction", kind=trace.SpanKind.CLIENT,
            attributes={"server.address": host.name, "server.port": host.port,
                        "smtp.recipients.count": len(envelope.recipients), "smtp.message.size": body.size},
        ) as span:
            outcome = await transaction(client, envelope, body, host.name)
            span.set_attribute("submitd.delivered", len(outcome.delivered))
            return outcome

    async def close(self) -> None:
        for idle in self.idle.values():
            for client, _ in idle:
                try:
                    await asyncio.wait_for(client.quit(), 2)
                except Exception:
                    client.close()
        self.idle.clear()
