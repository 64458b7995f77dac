"""The frontend's calls out: the policy session stream, the rewriter and the queue."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

import grpc
from opentelemetry import trace
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS

from submitd.v1 import common_pb2, queue_pb2, rewriter_pb2, rewriter_pb2_grpc
from opentelemetry import propagate

from submitd_common import jetstream
from submitd_common.bodies import BodyWriter
from submitd_common.replies import reply
from submitd_common.telemetry import client_call, inject_context

from .mux import Streams, ready
from .withdrawals import Withdrawals

tracer = trace.get_tracer("submitd.frontend")

log = logging.getLogger("submitd.frontend")

CHUNK = 64 << 10  # a message up to this size goes whole (RewriteMany, inline queue entry)
# A streamed message crosses gRPC in pieces of this size: each message costs a fixed amount of
# CPU on both sides (about 50 µs), so fewer, larger ones; gRPC flow control still moves in 64 KiB.
STREAM_CHUNK = 256 << 10


class BackendUnavailable(Exception):
    """A dependency failed; the client gets a 4xx and may retry."""

    def __init__(self, smtp_reply: common_pb2.Reply) -> None:
        super().__init__(smtp_reply.text)
        self.reply = smtp_reply


POLICY_DOWN = reply(421, "4.3.2", "Service temporarily unavailable, try again later")
QUEUE_DOWN = reply(451, "4.3.0", "Queue temporarily unavailable, try again later")
QUEUE_FULL = reply(452, "4.3.1", "Insufficient system storage, try again later")
REWRITER_DOWN = reply(451, "4.3.0", "Message processing temporarily unavailable, try again later")


class Rewriter:
    """The rewriter: messages of up to 64 KiB (most) over shared RewriteMany streams, larger
    ones over a Rewrite stream of their own."""

    def __init__(self, stub: rewriter_pb2_grpc.RewriterStub, channel: grpc.aio.Channel, *, streams: int,
                 timeout: float, connect_timeout: float, max_age: float) -> None:
        self.stub = stub
        self.channel = channel
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.streams = Streams(
            "rewriter", channel, count=streams, connect_timeout=connect_timeout, max_age=max_age, open_call=stub.RewriteMany,
            batch=lambda items: rewriter_pb2.WholeBatch(items=items),
            replies=lambda batch: ((r.id, r.result) for r in batch.replies),
            error=lambda: BackendUnavailable(REWRITER_DOWN),
        )

    async def rewrite(
        self, envelope: common_pb2.Envelope, message: bytes
    ) -> tuple[common_pb2.Envelope | None, bytes | common_pb2.Reply]:
        """A whole message (of up to 64 KiB) through the rewriter. Returns (envelope, final
        bytes) or (None, reply)."""
        stream = await self.streams.get()
        request_id = next(self.streams.ids)
        with client_call(tracer, "/submitd.v1.Rewriter/RewriteMany"):
            item = rewriter_pb2.WholeItem(
                id=request_id, message=rewriter_pb2.WholeMessage(envelope=envelope, message=message),
                trace_context=inject_context(),
            )
            result = await stream.ask(item, request_id, self.timeout)
        if result.WhichOneof("result") == "reject":
            return None, result.reject
        if result.WhichOneof("result") != "accepted":
            raise BackendUnavailable(REWRITER_DOWN)
        return result.accepted.envelope, result.accepted.message

    async def close(self) -> None:
        await self.streams.close()


class StreamedMessage:
    """A message larger than one chunk, on its way while it arrives: streamed through a
    Rewrite call of its own, the rewriter's output written into the Object Store as it comes
    back. Every step waits for the next (gRPC flow control, at most a few chunks awaiting
    NATS's acknowledgement), so a slow rewriter or queue slows the reading of the client's
    socket and nothing grows. ``finish()`` returns what the queue entry needs."""

    def __init__(self, rewriter: Rewriter, queue: "QueueWriter", envelope: common_pb2.Envelope) -> None:
        self.rewriter = rewriter
        self.envelope = envelope
        self.writer = queue.body_writer(envelope.queue_id)
        self.span = tracer.start_span("submitd.v1.Rewriter/Rewrite", kind=trace.SpanKind.CLIENT, attributes={
            "rpc.system": "grpc", "rpc.service": "submitd.v1.Rewriter", "rpc.method": "Rewrite"})
        self.call = None
        self.receiving: asyncio.Task | None = None
        self.out_envelope: common_pb2.Envelope | None = None
        self.reject: common_pb2.Reply | None = None
        self.prefix = b""
        self.pending = bytearray()  # content not yet sent: less than one STREAM_CHUNK

    async def start(self, first: bytes) -> None:
        r = self.rewriter
        await ready(r.channel, r.connect_timeout, lambda: BackendUnavailable(REWRITER_DOWN))
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(self.span))
        self.call = r.stub.Rewrite(timeout=r.timeout, metadata=tuple(carrier.items()))
        self.receiving = asyncio.create_task(self._receive())
        await self._write(rewriter_pb2.RewriteRequest(envelope=self.envelope))
        await self.send(first)

    async def send(self, data: bytes) -> None:
        self.pending += data
        if len(self.pending) >= STREAM_CHUNK:
            await self._flush()

    async def _flush(self, final: bool = False) -> None:
        """Send whole STREAM_CHUNK pieces; the remainder waits for more, or goes if ``final``."""
        while len(self.pending) >= STREAM_CHUNK or (final and self.pending):
            piece = bytes(self.pending[:STREAM_CHUNK])
            del self.pending[:STREAM_CHUNK]
            await self._write(rewriter_pb2.RewriteRequest(chunk=piece))

    async def _write(self, request) -> None:
        if self.receiving.done():
            return  # refused (or failed) already: finish() says which
        write = asyncio.ensure_future(self.call.write(request))
        await asyncio.wait((write, self.receiving), return_when=asyncio.FIRST_COMPLETED)
        if not write.done():
            # The rewriter's side ended (a refusal, or its output could not be stored) while
            # this write waited for room that will never come: the call is over, and finish()
            # says why at once rather than at the call's deadline.
            self.call.cancel()
            write.cancel()
            with contextlib.suppress(BaseException):
                await write
            return
        try:
            write.result()
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as e:
            if not self.receiving.done():
                raise BackendUnavailable(REWRITER_DOWN) from e

    async def _receive(self) -> None:
        async for resp in self.call:
            kind = resp.WhichOneof("part")
            if kind == "chunk":
                await self.writer.write(resp.chunk)
            elif kind == "envelope":
                self.out_envelope = resp.envelope
            elif kind == "prepend":
                self.prefix = resp.prepend
            elif kind == "reject":
                self.reject = resp.reject
                return

    async def finish(self) -> tuple[common_pb2.Envelope | None, bytes | common_pb2.Reply]:
        """(envelope, prefix) with the body stored, or (None, the rewriter's refusal)."""
        try:
            await self._flush(final=True)
            if not self.receiving.done():
                with contextlib.suppress(grpc.aio.UsageError, asyncio.InvalidStateError, grpc.aio.AioRpcError):
                    await self.call.done_writing()
            await self.receiving
            if self.reject is not None:
                self.span.set_attribute("smtp.reply.code", self.reject.code)
                await self.abort()
                return None, self.reject
            if self.out_envelope is None:
                raise BackendUnavailable(REWRITER_DOWN)
            await self.writer.close()
        except grpc.aio.AioRpcError as e:
            log.warning("rewriter unavailable: %s %s", e.code(), e.details())
            await self.abort()
            raise BackendUnavailable(REWRITER_DOWN) from e
        except (nats.errors.Error, nats.js.errors.Error, asyncio.TimeoutError, OSError) as e:
            log.warning("queue unavailable while storing a body: %r", e)
            await self.abort()
            raise BackendUnavailable(QUEUE_DOWN) from e
        except BaseException:
            await self.abort()
            raise
        finally:
            self.span.end()
        return self.out_envelope, self.prefix

    async def abort(self) -> None:
        """Nothing of this message stays: the call is cancelled, the stored chunks removed."""
        if self.call is not None:
            self.call.cancel()
        if self.receiving is not None and not self.receiving.done():
            self.receiving.cancel()
            with contextlib.suppress(BaseException):
                await self.receiving
        await self.writer.abort()
        if self.span.is_recording():
            self.span.end()


class QueueWriter:
    """Publishes a final message to JetStream and returns only once the server stored it."""

    def __init__(self, nc: NATS, timeout: float) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        # Messages of up to one chunk (and what the rewriter adds) travel inside their queue
        # entry; larger ones were streamed into the Object Store (publish_stored).
        self.inline_limit = 256 << 10
        self.timeout = timeout
        self.withdrawals = Withdrawals(nc, timeout)

    @property
    def available(self) -> bool:
        return self.nc.is_connected

    def body_writer(self, queue_id: str) -> BodyWriter:
        return BodyWriter(self.js, jetstream.BODY_BUCKET, queue_id, timeout=self.timeout, abandon=self._abandon)

    async def _abandon(self, nuid: str) -> None:
        # The relay removes the chunks: this service may not purge anything (natsauth).
        await self.nc.publish(jetstream.ABANDONED_SUBJECT, json.dumps({"nuid": nuid}).encode())

    async def publish_stored(self, envelope: common_pb2.Envelope, prefix: bytes, writer: BodyWriter) -> None:
        """The queue entry of a message whose body ``writer`` stored in the Object Store."""
        if not (writer.ascii and prefix.isascii()):
            envelope.body_type = "8BITMIME"  # the relay declares it to the next hop (RFC 6152)
        qmsg = queue_pb2.QueuedMessage(envelope=envelope, received_at_ms=int(time.time() * 1000),
                                       size=len(prefix) + writer.size, prefix=prefix, object_name=writer.name)
        with self._span(envelope, qmsg.size):
            await self._send(qmsg, lambda: jetstream.publish_entry(
                self.js, qmsg, msg_id=envelope.queue_id, timeout=self.timeout, headers=dict(qmsg.trace_context),
                remove_body=False))

    async def publish(self, envelope: common_pb2.Envelope, body: bytes) -> None:
        if envelope.body_type != "8BITMIME" and not body.isascii():
            envelope.body_type = "8BITMIME"  # the relay declares it to the next hop (RFC 6152)
        qmsg = queue_pb2.QueuedMessage(envelope=envelope, received_at_ms=int(time.time() * 1000), size=len(body))
        with self._span(envelope, len(body)):
            await self._send(qmsg, lambda: jetstream.enqueue(
                self.js, qmsg, body, msg_id=envelope.queue_id, inline_limit=self.inline_limit, timeout=self.timeout,
                headers=dict(qmsg.trace_context)))

    def _span(self, envelope: common_pb2.Envelope, size: int):
        return tracer.start_as_current_span(
            f"{jetstream.SUBMIT_SUBJECT} publish",
            kind=trace.SpanKind.PRODUCER,
            attributes={
                "messaging.system": "nats",
                "messaging.operation.type": "publish",
                "messaging.destination.name": jetstream.SUBMIT_SUBJECT,
                "messaging.message.id": envelope.queue_id,
                "submitd.queue_id": envelope.queue_id,
                "messaging.message.body.size": size,
            },
        )

    async def _send(self, qmsg: queue_pb2.QueuedMessage, publish) -> None:
        # The relay continues this trace: every delivery attempt, however late, is a child
        # of this publish span.
        qmsg.trace_context.update(inject_context())
        try:
            await publish()
        except asyncio.CancelledError:
            self.withdrawals.add(qmsg.envelope.queue_id)  # the client went: it will send it again
            raise
        except nats.js.errors.APIError as e:
            text = (e.description or "").lower()
            if "maximum bytes" in text or "maximum messages" in text or "insufficient resources" in text:
                log.warning("queue full: %s", e.description)
                raise BackendUnavailable(QUEUE_FULL) from e
            log.warning("queue refused the message: %s", e)
            raise BackendUnavailable(QUEUE_DOWN) from e
        except (nats.errors.Error, asyncio.TimeoutError, OSError) as e:
            log.warning("queue unavailable: %r", e)
            # No answer is no refusal: the entry may be stored, and the client will send it again.
            self.withdrawals.add(qmsg.envelope.queue_id)
            raise BackendUnavailable(QUEUE_DOWN) from e
