"""One SMTP transaction with the next hop over an open aiosmtplib connection: MAIL with the
extensions the message needs (SMTPUTF8, 8BITMIME, DSN), each RCPT, and DATA streamed."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import aiosmtplib

from submitd.v1 import common_pb2

from . import metrics
from .model import Body, Outcome
from .outgoing import LineCheck, Unsendable, check_envelope

log = logging.getLogger("submitd.relay")


async def transaction(client: aiosmtplib.SMTP, envelope: common_pb2.Envelope, body: Body, host: str = "") -> Outcome:
    outcome = Outcome()
    recipients = [r.address for r in envelope.recipients]
    try:
        check_envelope(envelope)
    except Unsendable as e:
        return _unsendable(outcome, recipients, envelope, e, host)
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
    if envelope.require_tls:
        mail_options.append("REQUIRETLS")  # the next hop offers it: delivery checked that
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
    except Unsendable as e:  # the connection was cut before the end of the data: nothing arrived
        return _unsendable(outcome, accepted, envelope, e, host)
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
            check = LineCheck()
            async for chunk in chunks:
                if not chunk:
                    continue
                check.feed(chunk)
                stuffed = chunk.replace(b"\r\n.", b"\r\n..")
                # A line start that the chunk boundary hides from replace():
                if tail == b"\r\n" and chunk[:1] == b".":
                    stuffed = b"." + stuffed
                elif tail[-1:] == b"\r" and chunk[:2] == b"\n.":
                    stuffed = b"\n." + stuffed[1:]
                protocol.write(stuffed)
                await asyncio.wait_for(protocol._drain_helper(), timeout)
                tail = (tail + chunk[-2:])[-2:]  # not the whole chunk copied for two octets
            check.finish()
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


def _unsendable(outcome: Outcome, recipients: list[str], envelope: common_pb2.Envelope, error: Unsendable,
                host: str) -> Outcome:
    metrics.UNSENDABLE.inc()
    log.error("message not sent: it breaks SMTP's line rules", extra={"fields": {
        "queue_id": envelope.queue_id, "reason": str(error), "next_hop": host}})
    outcome.fail_all(recipients, 554, f"5.6.0 Not sent: {error} (a local error; nothing reached the next hop)", host)
    return outcome
