"""The frontend's calls out: the policy session stream and the rewriter, which completes, signs
and queues each message. The frontend holds no NATS credentials: its message crosses gRPC once."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from opentelemetry import propagate, trace

from submitd.v1 import common_pb2, rewriter_pb2, rewriter_pb2_grpc
from submitd_common import grpcutil
from submitd_common.replies import reply
from submitd_common.telemetry import client_call, inject_context

from .mux import Streams, ready

tracer = trace.get_tracer("submitd.frontend")

log = logging.getLogger("submitd.frontend")

CHUNK = 64 << 10  # a message up to this size goes whole (a SubmitMany item, an inline queue entry)
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
REWRITER_DOWN = reply(451, "4.3.0", "Message processing temporarily unavailable, try again later")


class Rewriter:
    """The rewriter: messages of up to 64 KiB (most) over shared SubmitMany streams, larger
    ones over a Submit call of their own. Each answer says the message is queued, or why not.

    ``queue_available`` is what the rewriter last said of its queue: false from a reply that
    the queue is away until its health says SERVING again (asked every ``PROBE_EVERY`` seconds
    meanwhile, and by the readiness checks), so that DATA is refused up front while NATS is
    away and taken again as soon as it is back."""

    PROBE_EVERY = 0.25

    def __init__(self, stub: rewriter_pb2_grpc.RewriterStub, channel: grpc.aio.Channel, *, streams: int,
                 timeout: float, connect_timeout: float, max_age: float) -> None:
        self.stub = stub
        self.channel = channel
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.queue_available = True
        self._probe: asyncio.Task | None = None
        self._withdrawing: set[asyncio.Task] = set()
        self.streams = Streams(
            "rewriter", channel, count=streams, connect_timeout=connect_timeout, max_age=max_age, open_call=stub.SubmitMany,
            batch=lambda items: rewriter_pb2.WholeBatch(items=items),
            replies=lambda batch: ((r.id, r.result) for r in batch.replies),
            error=lambda: BackendUnavailable(REWRITER_DOWN),
        )

    async def serving(self) -> bool:
        """The rewriter's grpc.health.v1 (SERVING needs its NATS connection): the frontend's
        readiness check."""
        ok = await grpcutil.remote_serving(self.channel)
        self.queue_available = ok
        return ok

    def answered(self, result: rewriter_pb2.SubmitResult) -> rewriter_pb2.SubmitResult:
        if result.queue_unavailable:
            self.queue_available = False
            if self._probe is None or self._probe.done():
                self._probe = asyncio.ensure_future(self._until_serving())
        return result

    async def _until_serving(self) -> None:
        while not self.queue_available:
            await asyncio.sleep(self.PROBE_EVERY)
            with contextlib.suppress(Exception):
                await self.serving()

    async def submit(self, envelope: common_pb2.Envelope, message: bytes) -> rewriter_pb2.SubmitResult:
        """A whole message (of up to 64 KiB) completed, signed and queued by the rewriter."""
        stream = await self.streams.get()
        request_id = next(self.streams.ids)
        with client_call(tracer, "/submitd.v1.Rewriter/SubmitMany"):
            item = rewriter_pb2.WholeItem(
                id=request_id, message=rewriter_pb2.WholeMessage(envelope=envelope, message=message),
                trace_context=inject_context(),
            )
            try:
                result = await stream.ask(item, request_id, self.timeout)
            except BaseException:
                # Given up (the client went, no answer in time, the stream broke): the client
                # will send it again, so the rewriter withdraws it if it is being queued or was.
                self.withdraw(envelope.queue_id, request_id, stream)
                raise
        return self.answered(result)

    def withdraw(self, queue_id: str, request_id: int = 0, stream=None) -> None:
        """A message given up on, whose client was told 4xx (or went): the rewriter withdraws it
        if it is being queued, or was (its answer and our giving up crossed). Said on the item's
        own ``stream`` while it works (an item still waiting there is cancelled), else on any."""
        item = rewriter_pb2.WholeItem(id=request_id, withdraw=True, queue_id=queue_id)
        if stream is not None and stream.writable:
            stream.send(item, None)
            return
        task = asyncio.ensure_future(self._withdraw_elsewhere(item))
        self._withdrawing.add(task)
        task.add_done_callback(self._withdrawing.discard)

    async def _withdraw_elsewhere(self, item: rewriter_pb2.WholeItem) -> None:
        try:
            (await self.streams.get()).send(item, None)
        except Exception as e:
            log.warning("withdrawal not sent: if it was queued, the message may be delivered twice",
                        extra={"fields": {"queue_id": item.queue_id, "error": repr(e)}})

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
        # Withdraws still to be sent go, and are read, within one BACKEND_CONNECT_TIMEOUT.
        deadline = asyncio.get_running_loop().time() + self.connect_timeout
        if self._withdrawing:
            await asyncio.wait(list(self._withdrawing), timeout=self.connect_timeout)
        await self.streams.close(flush=max(0.1, deadline - asyncio.get_running_loop().time()))


class StreamedMessage:
    """A message larger than one chunk, on its way while it arrives: streamed through a Submit
    call of its own, which the rewriter writes into the Object Store as it goes. Every step
    waits for the next (gRPC flow control, at most a few chunks awaiting NATS's
    acknowledgement in the rewriter), so a slow rewriter or queue slows the reading of the
    client's socket and nothing grows. ``finish()`` returns the rewriter's answer."""

    def __init__(self, rewriter: Rewriter, envelope: common_pb2.Envelope) -> None:
        self.rewriter = rewriter
        self.envelope = envelope
        self.span = tracer.start_span("submitd.v1.Rewriter/Submit", kind=trace.SpanKind.CLIENT, attributes={
            "rpc.system": "grpc", "rpc.service": "submitd.v1.Rewriter", "rpc.method": "Submit"})
        self.call = None
        self.receiving: asyncio.Future | None = None
        self.pending = bytearray()  # content not yet sent: less than one STREAM_CHUNK
        self.ended = False  # told it is whole: from then on the rewriter may queue it

    async def start(self, first: bytes) -> None:
        r = self.rewriter
        await ready(r.channel, r.connect_timeout, lambda: BackendUnavailable(REWRITER_DOWN))
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(self.span))
        self.call = r.stub.Submit(timeout=r.timeout, metadata=tuple(carrier.items()))
        self.receiving = asyncio.ensure_future(self._answer())
        await self._write(rewriter_pb2.RewriteRequest(envelope=self.envelope))
        await self.send(first)

    async def _answer(self) -> rewriter_pb2.SubmitResult:
        return await self.call

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
            return  # answered already (a refusal, or the queue failed): finish() says which
        write = asyncio.ensure_future(self.call.write(request))
        await asyncio.wait((write, self.receiving), return_when=asyncio.FIRST_COMPLETED)
        if not write.done():
            # The rewriter answered (a refusal, or its output could not be stored) while this
            # write waited for room that will never come: finish() says why at once rather
            # than at the call's deadline.
            write.cancel()
            with contextlib.suppress(BaseException):
                await write
            return
        try:
            write.result()
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as e:
            if not self.receiving.done():
                raise BackendUnavailable(REWRITER_DOWN) from e

    async def finish(self) -> rewriter_pb2.SubmitResult:
        """The rewriter's answer: queued, refused, or the queue's 4xx."""
        try:
            await self._flush(final=True)
            self.ended = True
            await self._write(rewriter_pb2.RewriteRequest(end=True))  # whole: queue it
            if not self.receiving.done():
                with contextlib.suppress(grpc.aio.UsageError, asyncio.InvalidStateError, grpc.aio.AioRpcError):
                    await self.call.done_writing()
            result = await self.receiving
            if result.HasField("reply"):
                self.span.set_attribute("smtp.reply.code", result.reply.code)
        except grpc.aio.AioRpcError as e:
            log.warning("rewriter unavailable: %s %s", e.code(), e.details())
            await self.abort()
            raise BackendUnavailable(REWRITER_DOWN) from e
        except BaseException:
            await self.abort()
            raise
        finally:
            self.span.end()
        return self.rewriter.answered(result)

    async def abort(self) -> None:
        """Nothing of this message stays: the call is cancelled, and the rewriter removes what
        it stored (or withdraws the entry it was publishing). Once it was said to be whole, it
        may have been queued as we gave up (the answer on its way): withdrawn then too."""
        if self.call is not None:
            self.call.cancel()
        if self.ended:
            self.ended = False
            self.rewriter.withdraw(self.envelope.queue_id)
        if self.receiving is not None and not self.receiving.done():
            self.receiving.cancel()
            with contextlib.suppress(BaseException):
                await self.receiving
        if self.span.is_recording():
            self.span.end()
