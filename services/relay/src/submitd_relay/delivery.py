"""Delivery to the next hop: a pool of reusable SMTP client connections, one transaction
per message, and an outcome for every recipient."""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass, field

import aiosmtplib

from submitd.v1 import common_pb2

from .settings import Settings

log = logging.getLogger("submitd.relay")


@dataclass
class Outcome:
    delivered: list[str] = field(default_factory=list)
    temporary: dict[str, str] = field(default_factory=dict)   # recipient -> reply
    permanent: dict[str, str] = field(default_factory=dict)
    next_hop: str = ""

    def fail_all(self, recipients: list[str], code: int, text: str) -> None:
        target = self.permanent if 500 <= code < 600 else self.temporary
        for r in recipients:
            target[r] = f"{code} {text}".strip()


class NextHopError(Exception):
    """The connection failed; every recipient not yet accepted is deferred."""


class NextHopPool:
    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.idle: list[aiosmtplib.SMTP] = []
        self.slots = asyncio.Semaphore(settings.connections)
        self.name = f"{settings.next_hop_host}:{settings.next_hop_port}"

    def _tls_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.s.next_hop_ca_file)
        if not self.s.next_hop_verify_tls:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    async def _connect(self) -> aiosmtplib.SMTP:
        start_tls = {"none": False, "opportunistic": None, "required": True}[self.s.next_hop_tls]
        client = aiosmtplib.SMTP(
            hostname=self.s.next_hop_host,
            port=self.s.next_hop_port,
            local_hostname=self.s.helo_name,
            timeout=self.s.command_timeout,
            start_tls=start_tls,
            tls_context=self._tls_context() if start_tls is not False else None,
        )
        await asyncio.wait_for(client.connect(), self.s.connect_timeout)
        if self.s.next_hop_username:
            await client.login(self.s.next_hop_username, self.s.next_hop_password or "")
        return client

    async def deliver(self, envelope: common_pb2.Envelope, body: bytes) -> Outcome:
        async with self.slots:
            reused = bool(self.idle)
            client = self.idle.pop() if reused else None
            try:
                if client is None or not client.is_connected:
                    client = await self._connect()
                try:
                    outcome = await transaction(client, envelope, body)
                except aiosmtplib.SMTPServerDisconnected:
                    if not reused:
                        raise
                    # An idle connection the next hop had closed: once more on a new one.
                    client.close()
                    client = await self._connect()
                    outcome = await transaction(client, envelope, body)
            except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError) as e:
                if client is not None:
                    client.close()
                if isinstance(e, aiosmtplib.SMTPResponseException) and e.code >= 500:
                    # The next hop refused us at connect, EHLO or AUTH: that is permanent for
                    # the connection, but the message may go through later or elsewhere.
                    raise NextHopError(f"{e.code} {e.message}") from e
                raise NextHopError(str(e) or type(e).__name__) from e
            except BaseException:
                if client is not None:
                    client.close()
                raise
            outcome.next_hop = self.name
            self.idle.append(client)
            return outcome

    async def close(self) -> None:
        for client in self.idle:
            try:
                await asyncio.wait_for(client.quit(), 2)
            except Exception:
                client.close()
        self.idle.clear()


async def transaction(client: aiosmtplib.SMTP, envelope: common_pb2.Envelope, body: bytes) -> Outcome:
    outcome = Outcome()
    recipients = [r.address for r in envelope.recipients]
    mail_options: list[str] = []
    if envelope.smtputf8:
        if not client.supports_extension("smtputf8"):
            outcome.fail_all(recipients, 550, "5.6.7 The next hop does not support SMTPUTF8")
            return outcome
        mail_options.append("SMTPUTF8")
    if envelope.body_type == "8BITMIME" and client.supports_extension("8bitmime"):
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
        outcome.fail_all(recipients, e.code, e.message)
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
            outcome.fail_all([r.address], e.code, e.message)
    if not accepted:
        await _rset(client)
        return outcome
    try:
        await client.data(body)
    except aiosmtplib.SMTPResponseException as e:
        outcome.fail_all(accepted, e.code, e.message)
        return outcome
    outcome.delivered = accepted
    return outcome


async def _rset(client: aiosmtplib.SMTP) -> None:
    try:
        await client.rset()
    except aiosmtplib.SMTPException:
        client.close()
