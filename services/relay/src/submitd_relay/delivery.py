"""Delivery to the next hop: a smarthost, or each recipient domain's MX hosts.

Connections are pooled per host and reused for later messages; deliveries to one destination
(the smarthost, or one recipient domain) are limited to DESTINATION_CONCURRENCY at a time. One
SMTP transaction per message and destination, and an outcome for every recipient."""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiosmtplib
import dns.asyncresolver
import dns.exception
import dns.name
import dns.resolver
from opentelemetry import trace

from submitd.v1 import common_pb2

from .settings import Settings

log = logging.getLogger("submitd.relay")
tracer = trace.get_tracer("submitd.relay")
IDLE_SECONDS = 30.0  # an idle connection older than this is closed, not reused


class Body:
    """What is delivered: read as a stream (once per transaction), never held whole. The
    queue's bodies are read from JetStream as the next hop takes them (consumer.QueuedBody)."""

    size: int = 0
    eight_bit: bool = False  # BODY=8BITMIME is declared to the next hop (RFC 6152)

    def chunks(self) -> AsyncIterator[bytes]:
        raise NotImplementedError


@dataclass
class Outcome:
    delivered: list[str] = field(default_factory=list)
    temporary: dict[str, str] = field(default_factory=dict)  # recipient -> reply
    permanent: dict[str, str] = field(default_factory=dict)
    remote: dict[str, str] = field(default_factory=dict)  # recipient -> host that answered
    without_dsn: set[str] = field(default_factory=set)  # delivered to a next hop without DSN
    next_hop: str = ""

    def fail_all(self, recipients: list[str], code: int, text: str, host: str = "") -> None:
        target = self.permanent if 500 <= code < 600 else self.temporary
        for r in recipients:
            target[r] = f"{code} {text}".strip()
            if host:
                self.remote[r] = host

    def merge(self, other: "Outcome") -> None:
        self.delivered += other.delivered
        self.temporary |= other.temporary
        self.permanent |= other.permanent
        self.remote |= other.remote
        self.without_dsn |= other.without_dsn
        hops = [h for h in (*self.next_hop.split(","), other.next_hop) if h]
        self.next_hop = ",".join(dict.fromkeys(hops))


class NextHopError(Exception):
    """The connection failed; every recipient not yet accepted is deferred."""


class RouteError(Exception):
    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"{code} {text}")
        self.code = code
        self.text = text


@dataclass(frozen=True)
class Host:
    name: str  # for TLS and reports
    address: str  # what to connect to
    port: int


class MxResolver:
    """MX, then A/AAAA (RFC 5321 §5.1); a null MX (RFC 7505) refuses the domain at once."""

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.r = dns.asyncresolver.Resolver(configure=not settings.dns_nameservers)
        if settings.dns_nameservers:
            self.r.nameservers = list(settings.dns_nameservers)
            self.r.port = settings.dns_port
        self.r.lifetime = settings.dns_timeout

    async def hosts(self, domain: str) -> list[Host]:
        try:
            answer = await self.r.resolve(domain, "MX")
            records = list(answer)
            if any(rr.exchange == dns.name.root for rr in records):
                raise RouteError(556, f"5.1.10 Domain {domain} does not accept mail (null MX, RFC 7505)")
            # Lowest preference first; equal preferences in random order (RFC 5321 §5.1).
            records.sort(key=lambda rr: (rr.preference, random.random()))
            names = [rr.exchange.to_text(omit_final_dot=True) for rr in records]
        except dns.resolver.NXDOMAIN:
            raise RouteError(550, f"5.1.2 Domain {domain} does not exist") from None
        except dns.resolver.NoAnswer:
            names = [domain]  # no MX: the domain itself is the implicit MX
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as e:
            raise RouteError(451, f"4.4.3 DNS lookup of {domain} failed: {type(e).__name__}") from None
        except (dns.name.NameTooLong, dns.name.LabelTooLong, dns.name.EmptyLabel, dns.name.IDNAException) as e:
            raise RouteError(553, f"5.1.2 Invalid recipient domain {domain}: {type(e).__name__}") from None
        except dns.exception.DNSException as e:
            raise RouteError(451, f"4.4.3 DNS lookup of {domain} failed: {type(e).__name__}") from None
        hosts: list[Host] = []
        temporary = False
        for name in names:
            for rdtype in ("A", "AAAA"):
                try:
                    for rr in await self.r.resolve(name, rdtype):
                        hosts.append(Host(name, rr.address, self.s.mx_port))
                except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                    pass
                except dns.exception.DNSException:
                    temporary = True
        if not hosts:
            if temporary:
                raise RouteError(451, f"4.4.3 DNS lookup of the mail hosts of {domain} failed")
            raise RouteError(550, f"5.4.4 No address for the mail hosts of {domain}")
        return hosts


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


async def transaction(client: aiosmtplib.SMTP, envelope: common_pb2.Envelope, body: Body, host: str = "") -> Outcome:
    outcome = Outcome()
    recipients = [r.address for r in envelope.recipients]
    mail_options: list[str] = []
    if envelope.smtputf8:
        if not client.supports_extension("smtputf8"):
            outcome.fail_all(
                recipients, 553, "5.6.7 The message needs SMTPUTF8 (RFC 6531) and the next hop does not support it", host
            )
            return outcome
        mail_options.append("SMTPUTF8")
    if envelope.body_type == "8BITMIME" or body.eight_bit:
        if not client.supports_extension("8bitmime"):
            # RFC 6152 §3: an 8-bit message must not go to a server without 8BITMIME.
            outcome.fail_all(
                recipients, 554, "5.6.3 Conversion required but not supported: the message is 8-bit and "
                "the next hop does not offer 8BITMIME", host,
            )
            return outcome
        mail_options.append("BODY=8BITMIME")
    dsn = client.supports_extension("dsn")
    if dsn and envelope.dsn_ret:
        mail_options.append(f"RET={envelope.dsn_ret}")
    if dsn and envelope.dsn_envid:
        mail_options.append(f"ENVID={envelope.dsn_envid}")
    encoding = "utf-8" if envelope.smtputf8 else "ascii"
    try:
        await client.mail(envelope.return_path, options=mail_options, encoding=encoding)
    except aiosmtplib.SMTPResponseException as e:
        outcome.fail_all(recipients, e.code, e.message, host)
        await _rset(client)
        return outcome
    accepted: list[str] = []
    for r in envelope.recipients:
        options = []
        if dsn and r.notify:
            options.append(f"NOTIFY={r.notify}")
        if dsn and r.orcpt:
            options.append(f"ORCPT={r.orcpt}")
        try:
            await client.rcpt(r.address, options=options, encoding=encoding)
            accepted.append(r.address)
        except aiosmtplib.SMTPResponseException as e:
            outcome.fail_all([r.address], e.code, e.message, host)
    if not accepted:
        await _rset(client)
        return outcome
    try:
        await send_data(client, body.chunks(), client.timeout)
    except aiosmtplib.SMTPResponseException as e:
        outcome.fail_all(accepted, e.code, e.message, host)
        return outcome
    outcome.delivered = accepted
    for r in accepted:
        outcome.remote[r] = host
    if not dsn:
        outcome.without_dsn.update(accepted)
    return outcome


async def send_data(client: aiosmtplib.SMTP, chunks: AsyncIterator[bytes], timeout: float | None) -> None:
    """DATA with the message streamed to the next hop as it is read: dot-stuffed on the way
    (RFC 5321 §4.5.2), each write waiting until the connection takes it.

    aiosmtplib's ``data()`` takes the message whole; this does what it does, a chunk at a time,
    through the parts of its protocol object named in AIOSMTPLIB_INTERNALS (checked by
    tests/test_relay_adapter.py)."""
    protocol = client.protocol
    if protocol is None:
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    try:
        async with protocol._command_lock:
            protocol._response_pending = True
            protocol.write(b"DATA\r\n")
            start = await protocol.read_response(timeout=timeout)
            if start.code != 354:
                raise aiosmtplib.SMTPDataError(start.code, start.message)
            tail = b"\r\n"  # the last two octets sent: a CRLF before the first line
            async for chunk in chunks:
                if not chunk:
                    continue
                stuffed = chunk.replace(b"\r\n.", b"\r\n..")
                # A line start that the chunk boundary hides from replace():
                if tail == b"\r\n" and chunk[:1] == b".":
                    stuffed = b"." + stuffed
                elif tail[-1:] == b"\r" and chunk[:2] == b"\n.":
                    stuffed = b"\n." + stuffed[1:]
                protocol.write(stuffed)
                await asyncio.wait_for(protocol._drain_helper(), timeout)
                tail = (tail + chunk[-2:])[-2:]  # not the whole chunk copied for two octets
            protocol._response_pending = True
            protocol.write(b".\r\n" if tail == b"\r\n" else b"\r\n.\r\n")
            response = await protocol.read_response(timeout=timeout)
            if response.code != 250:
                raise aiosmtplib.SMTPDataError(response.code, response.message)
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, asyncio.TimeoutError, ConnectionError) as e:
        client.close()
        if isinstance(e, aiosmtplib.SMTPServerDisconnected):
            raise
        raise aiosmtplib.SMTPServerDisconnected(str(e) or type(e).__name__) from e
    except aiosmtplib.SMTPResponseException:
        raise  # the next hop's answer: the connection goes on
    except BaseException:
        client.close()  # stopped partway through the content: the next hop drops what it got
        raise


# What send_data uses of aiosmtplib's protocol object.
AIOSMTPLIB_INTERNALS = ("_command_lock", "_response_pending", "write", "read_response", "_drain_helper")


async def _rset(client: aiosmtplib.SMTP) -> None:
    try:
        await client.rset()
    except aiosmtplib.SMTPException:
        client.close()
