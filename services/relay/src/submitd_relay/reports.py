"""Delivery status notifications: built by ``dsn``, completed and DKIM-signed by the rewriter like
any message the domain submits (the signing keys never leave the rewriter), then queued.

A report streams: with RET=FULL the original comes from the queue a chunk at a time, goes through
the rewriter's ``Rewrite`` stream, and what comes back is written into the Object Store as it
arrives. A rewriter that is unreachable (UNAVAILABLE) fails the report (the delivery is retried, and
the report's ``Nats-Msg-Id`` keeps it from being queued twice); a rewriter that refuses the
report (a local rule) or fails on it otherwise gets it queued unsigned, with a warning: a
bounce is never lost to signing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
from nats.js import JetStreamContext
from opentelemetry import propagate

from submitd.v1 import common_pb2, queue_pb2, rewriter_pb2, rewriter_pb2_grpc
from submitd_common import jetstream
from submitd_common.bodies import BodyWriter
from submitd_common.ids import new_queue_id

from . import dsn, metrics
from .model import Body
from .settings import Settings

log = logging.getLogger("submitd.relay")
PIECE = 256 << 10  # the frontend's streamed pieces: fewer, larger gRPC messages


class RewriterUnavailable(Exception):
    """The rewriter could not be reached or failed mid-stream: try the report again later."""


class Signer:
    """The rewriter's ``Rewrite`` stream for one report at a time."""

    def __init__(self, channel: grpc.aio.Channel, timeout: float) -> None:
        self.channel = channel
        self.stub = rewriter_pb2_grpc.RewriterStub(channel)
        self.timeout = timeout

    async def sign(
        self, envelope: common_pb2.Envelope, parts: AsyncIterator[bytes], out: Callable[[bytes], Awaitable[None]]
    ) -> tuple[common_pb2.Envelope, bytes] | None:
        """Send ``parts``; the completed message goes to ``out`` as it comes back. Returns the
        rewriter's envelope and the fields to put in front (DKIM-Signature), or None if the
        rewriter refused the message."""
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        call = self.stub.Rewrite(timeout=self.timeout, metadata=tuple(carrier.items()))

        async def send() -> None:
            await call.write(rewriter_pb2.RewriteRequest(envelope=envelope))
            pending = bytearray()
            async for part in parts:
                pending += part
                while len(pending) >= PIECE:
                    await call.write(rewriter_pb2.RewriteRequest(chunk=bytes(pending[:PIECE])))
                    del pending[:PIECE]
            if pending:
                await call.write(rewriter_pb2.RewriteRequest(chunk=bytes(pending)))
            await call.done_writing()

        async def receive() -> tuple[common_pb2.Envelope | None, bytes] | None:
            result, prefix = None, b""
            async for resp in call:
                kind = resp.WhichOneof("part")
                if kind == "reject":
                    log.warning("the rewriter refused a report: %d %s", resp.reject.code, resp.reject.text)
                    return None
                if kind == "envelope":
                    result = resp.envelope
                elif kind == "chunk":
                    await out(resp.chunk)
                elif kind == "prepend":
                    prefix = resp.prepend
            return result, prefix

        sender = asyncio.create_task(send())
        receiver = asyncio.create_task(receive())
        try:
            # Either side may fail first: reading the original from the queue (its error is
            # raised as it is), or the call.
            await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
            if sender.done() and sender.exception() is not None:
                raise sender.exception()
            got = await receiver  # a refusal may come before everything was sent
            if got is not None:
                await sender
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                raise RewriterUnavailable(f"{e.code()} {e.details()}") from e
            # Anything else (a rewriter bug on this report, a deadline on a huge one) would fail
            # the same way again: the report goes unsigned rather than never.
            log.warning("the rewriter failed a report (%s %s): it goes unsigned", e.code(), e.details())
            return None
        finally:
            call.cancel()
            for task in (sender, receiver):
                if not task.done():
                    task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        if got is None:
            return None
        result, prefix = got
        if result is None:
            raise RewriterUnavailable("the rewriter ended the stream without a message")
        return result, prefix


class Reports:
    def __init__(self, js: JetStreamContext, settings: Settings, signer: Signer | None) -> None:
        self.js = js
        self.s = settings
        self.signer = signer

    async def queue(self, qmsg: queue_pb2.QueuedMessage, body: Body | None, kind: str,
                    statuses: list[dsn.RecipientStatus]) -> str:
        """Queue a report on ``qmsg``; returns the report's queue id."""
        env = qmsg.envelope
        head = await jetstream.message_head(self.js, qmsg) if body is not None else b""
        report_id = new_queue_id()
        before, after = dsn.build_parts(
            kind=kind, envelope=env, report_id=report_id, header=dsn.header_section(head), statuses=statuses,
            reporting_mta=self.s.helo_name, from_address=self.s.bounce_from or f"MAILER-DAEMON@{self.s.helo_name}",
            arrival=qmsg.received_at_ms / 1000, will_retry_until=qmsg.received_at_ms / 1000 + self.s.max_lifetime,
        )
        full = body is not None and dsn.returns_full(kind, env)

        async def parts() -> AsyncIterator[bytes]:
            yield before
            tail = b"\r\n"
            if full:
                async for chunk in body.chunks():
                    yield chunk
                    tail = (tail + chunk[-2:])[-2:]  # a CRLF may straddle two chunks
            else:
                attached = dsn.header_section(head)
                yield attached
                tail = (tail + attached[-2:])[-2:]
            yield (b"" if tail == b"\r\n" else b"\r\n") + after

        # The same report for the same recipients has the same Nats-Msg-Id: queued once even
        # if this delivery is retried after a crash.
        digest = hashlib.sha256("\n".join(sorted(s.recipient.address for s in statuses)).encode()).hexdigest()[:16]
        msg_id = f"{env.queue_id}.dsn-{kind}.{digest}"
        large = full and body.size > self.s.inline_body_limit
        envelope = dsn.report_envelope(env, report_id, eight_bit=False)
        signed = await self.queue_written(envelope, parts, msg_id=msg_id, large=large,
                                          trace_context=dict(qmsg.trace_context))
        metrics.REPORTS.labels(kind).inc()
        log.info("DSN queued", extra={"fields": {"queue_id": env.queue_id, "action": kind, "report_queue_id": report_id,
                                                 "recipients": len(statuses), "signed": signed}})
        return report_id

    async def queue_written(self, envelope: common_pb2.Envelope, parts: Callable[[], AsyncIterator[bytes]], *,
                            msg_id: str, large: bool = False, trace_context: dict[str, str] | None = None) -> bool:
        """Queue a message the relay wrote itself (a DSN, a TLS report) as any other: completed
        and DKIM-signed by the rewriter where there is one, else as it is; in the Object Store if
        ``large``, else inline. ``parts()`` gives its content (called again if the rewriter
        refuses it); ``envelope.queue_id`` is its queue id; ``msg_id`` keeps a retry from
        queueing it twice. Returns whether it was signed."""
        # Its own object for each attempt: a retry after the entry was queued (deduplicated by
        # msg_id) must not rewrite the body the queued entry and its signatures describe.
        object_name = f"{msg_id}.{envelope.queue_id}"
        out = queue_pb2.QueuedMessage(received_at_ms=int(time.time() * 1000), trace_context=trace_context or {})
        signed = None
        if self.signer is not None:
            signed = await self._store(object_name, large, out, lambda sink: self.signer.sign(envelope, parts(), sink))
        if signed is None:
            metrics.UNSIGNED.inc()

            async def plain(sink):
                async for part in parts():
                    await sink(part)
                return envelope, b""

            signed = await self._store(object_name, large, out, plain)
        final_envelope, prefix, ascii_only = signed
        final_envelope.queue_id = envelope.queue_id
        final_envelope.body_type = "7BIT" if ascii_only else "8BITMIME"
        out.envelope.CopyFrom(final_envelope)
        out.prefix = prefix
        out.size += len(prefix)
        await jetstream.publish_entry(self.js, out, msg_id=msg_id, timeout=self.s.publish_timeout,
                                      headers=trace_context or {})
        return bool(prefix)

    async def _store(self, name: str, large: bool, out: queue_pb2.QueuedMessage, produce):
        """Run ``produce(sink)`` with the report's content going to the Object Store (``large``)
        or into ``out`` inline. Returns (envelope, prefix, all ASCII), or None if refused."""
        if large:
            writer = BodyWriter(self.js, jetstream.BODY_BUCKET, name, timeout=self.s.publish_timeout)
            try:
                result = await produce(writer.write)
                if result is None:
                    await writer.abort()
                    return None
                await writer.close()
            except BaseException:
                await writer.abort()
                raise
            out.object_name, out.size = name, writer.size
            return (*result, writer.ascii)
        buffer = bytearray()

        async def collect(data: bytes) -> None:
            buffer.extend(data)

        result = await produce(collect)
        if result is None:
            return None
        data = bytes(buffer)
        out.inline_body, out.size = data, len(data)
        return (*result, data.isascii())
