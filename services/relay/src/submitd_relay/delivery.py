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
from .outbound.connect import open_mx
from .outbound.plan import MAY, VERIFY, HostTls, TlsPlanner, TlsPolicyError
from .routes import Host, MxResolver, RouteError
from .settings import Settings
from .transaction import transaction

log = logging.getLogger("submitd.relay")
tracer = trace.get_tracer("submitd.relay")
IDLE_SECONDS = 30.0  # an idle connection older than this is closed, not reused


class NextHopPool:
    def __init__(self, settings: Settings, sts=None, reporting=None) -> None:
        self.s = settings
        self.idle: dict[tuple, list[tuple[aiosmtplib.SMTP, float]]] = defaultdict(list)
        self.slots: dict[str, asyncio.Semaphore] = {}
        self.smarthost = (
            Host(settings.next_hop_host, settings.next_hop_host, settings.next_hop_port)
            if settings.next_hop_host else None
        )
        self.resolver = None if self.smarthost else MxResolver(settings)
        self.planner = None if self.smarthost else TlsPlanner(settings, self.resolver, sts)
        self.reporting = reporting  # outbound.tlsrpt.TlsReporting: counts every TLS session's result
        self.name = f"{self.smarthost.name}:{self.smarthost.port}" if self.smarthost else "mx"
        # The smarthost's TLS, for REQUIRETLS: verified only if STARTTLS is required and checked.
        self.smarthost_tls = HostTls(
            VERIFY if settings.next_hop_tls == "required" and settings.next_hop_verify_tls else MAY, "smarthost")

    def _tls_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.s.next_hop_ca_file)
        if not self.s.next_hop_verify_tls:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    async def _connect(self, host: Host) -> aiosmtplib.SMTP:
        """The smarthost (MX hosts: outbound.connect.open_mx)."""
        start_tls = {"none": False, "opportunistic": None, "required": True}[self.s.next_hop_tls]
        login = bool(self.s.next_hop_username)

        def make(start_tls: bool | None) -> aiosmtplib.SMTP:
            return aiosmtplib.SMTP(
                hostname=host.address,
                port=host.port,
                local_hostname=self.s.helo_name,
                timeout=self.s.command_timeout,
                start_tls=start_tls,
                tls_context=self._tls_context() if start_tls is not False else None,
            )

        async def open(client: aiosmtplib.SMTP) -> aiosmtplib.SMTP:
            try:
                await asyncio.wait_for(client.connect(), self.s.connect_timeout)
                if login:
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
            if start_tls is not None or login:
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
            if self.smarthost:
                if envelope.require_tls and not self.smarthost_tls.verified:
                    raise TlsPolicyError(550, "5.7.10 REQUIRETLS: the smarthost's certificate is not verified "
                                         "(NEXT_HOP_TLS=required and NEXT_HOP_VERIFY_TLS are needed)")
                hosts = [(self.smarthost, self.smarthost_tls)]
            else:
                plan = await self.planner.plan(
                    destination, await self.resolver.hosts(destination),
                    require_tls=envelope.require_tls, tls_optional=envelope.tls_optional)
                self._report(plan.failures)
                hosts = plan.hosts
        except RouteError as e:
            outcome.fail_all(addresses, e.code, e.text)
            return outcome
        except TlsPolicyError as e:
            self._report([e.result] if e.result else [])
            outcome.fail_all(addresses, e.code, e.text)
            return outcome
        async with self._slot(destination):
            last: Exception | None = None
            for host, tls in hosts:
                try:
                    result = await self._on_host(host, tls, part, body)
                    result.next_hop = f"{host.name}:{host.port}"
                    return result
                except NextHopError as e:  # the next MX host, if there is one
                    last = e
                    log.info("next hop %s:%s failed: %s", host.name, host.port, e)
        where = hosts[-1][0].name
        if isinstance(last, TlsPolicyError):
            outcome.fail_all(addresses, last.code, last.text, where)
        else:
            outcome.fail_all(addresses, 451, f"4.4.1 next hop {where}: {last}", where)
        return outcome

    def _report(self, results) -> None:
        if self.reporting is not None:
            for r in results:
                self.reporting.record(r)

    def _take_idle(self, key: tuple) -> aiosmtplib.SMTP | None:
        idle = self.idle[key]
        while idle:
            client, since = idle.pop()
            if client.is_connected and time.monotonic() - since < IDLE_SECONDS:
                return client
            client.close()
        return None

    def _give_back(self, key: tuple, client: aiosmtplib.SMTP) -> None:
        idle = self.idle[key]
        if len(idle) >= self.s.destination_concurrency:
            client.close()
        else:
            idle.append((client, time.monotonic()))

    async def _on_host(self, host: Host, tls: HostTls, envelope: common_pb2.Envelope, body: Body) -> Outcome:
        # A connection is reused only under the TLS it was opened with: one verified for DANE
        # is not handed to a message whose destination asked for less, nor the other way round.
        key = (host, tls.pool_key)
        client = self._take_idle(key)
        reused = client is not None
        try:
            if client is None:
                client = await self._traced_connect(host, tls)
            self._check_requiretls(client, host, envelope)
            try:
                outcome = await self._traced_transaction(client, envelope, body, host)
            except aiosmtplib.SMTPServerDisconnected:
                if not reused:
                    raise
                # An idle connection the next hop had closed: once more on a new one.
                client.close()
                client = await self._traced_connect(host, tls)
                self._check_requiretls(client, host, envelope)
                outcome = await self._traced_transaction(client, envelope, body, host)
        except TlsPolicyError:
            if client is not None and client.is_connected and client.get_transport_info("ssl_object") is not None:
                self._give_back(key, client)  # a sound connection to a host without REQUIRETLS
            elif client is not None:
                client.close()
            raise
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
            self._give_back(key, client)
        return outcome

    @staticmethod
    def _check_requiretls(client: aiosmtplib.SMTP, host: Host, envelope: common_pb2.Envelope) -> None:
        """RFC 8689 §4.2.1: a REQUIRETLS message goes only to a next hop that offers REQUIRETLS
        (after TLS); none of the hosts does: 550 5.7.30."""
        if envelope.require_tls and not client.supports_extension("requiretls"):
            raise TlsPolicyError(550, f"5.7.30 REQUIRETLS support required: {host.name} does not offer REQUIRETLS")

    async def _traced_connect(self, host: Host, tls: HostTls) -> aiosmtplib.SMTP:
        """A new connection (TCP, STARTTLS, AUTH, EHLO): a span of its own, where a slow TLS
        handshake or a slow greeting shows, and which TLS policy applied and what it verified."""
        with tracer.start_as_current_span(
            "smtp.connect", kind=trace.SpanKind.CLIENT,
            attributes={"server.address": host.name, "server.port": host.port, "submitd.tls.policy": tls.label},
        ) as span:
            if self.smarthost:
                client, verified = await self._connect(host), ""
            else:
                try:
                    connected = await open_mx(host, tls, self.s)
                except TlsPolicyError as e:
                    self._report([e.result] if e.result else [])
                    span.set_attribute("submitd.tls.failure", e.text)
                    raise
                self._report([connected.result] if connected.result else [])
                client, verified = connected.client, connected.verified
            ssl_object = client.get_transport_info("ssl_object") if client.transport else None
            span.set_attribute("tls.protocol.version", ssl_object.version() if ssl_object else "")
            span.set_attribute("submitd.tls.verified", verified)
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
