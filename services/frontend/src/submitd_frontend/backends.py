"""The frontend's calls out: the policy session stream, the rewriter and the queue."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from opentelemetry import trace
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS

from submitd.v1 import common_pb2, queue_pb2, rewriter_pb2, rewriter_pb2_grpc
from submitd_common import jetstream
from submitd_common.replies import reply
from submitd_common.telemetry import client_call, inject_context

from .mux import Streams, ready

tracer = trace.get_tracer("submitd.frontend")

log = logging.getLogger("submitd.frontend")

CHUNK = 64 << 10


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
        """Send the message through the rewriter. Returns (envelope, final bytes) or (None, reply)."""
        if len(message) > CHUNK:
            await ready(self.channel, self.connect_timeout, lambda: BackendUnavailable(REWRITER_DOWN))
            return await rewrite_stream(self.stub, envelope, message, self.timeout)
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


async def rewrite_stream(
    stub: rewriter_pb2_grpc.RewriterStub, envelope: common_pb2.Envelope, message: bytes, timeout: float
) -> tuple[common_pb2.Envelope | None, bytes | common_pb2.Reply]:
    """A large message over a Rewrite stream of its own, in 64 KiB chunks."""

    async def requests():
        yield rewriter_pb2.RewriteRequest(envelope=envelope)
        view = memoryview(message)
        for i in range(0, len(message), CHUNK):
            yield rewriter_pb2.RewriteRequest(chunk=bytes(view[i : i + CHUNK]))

    out_envelope = None
    parts: list[bytes] = []
    prepend = b""
    try:
        with client_call(tracer, "/submitd.v1.Rewriter/Rewrite") as (span, metadata):
            call = stub.Rewrite(requests(), timeout=timeout, metadata=metadata)
            async for resp in call:
                kind = resp.WhichOneof("part")
                if kind == "reject":
                    return None, resp.reject
                if kind == "envelope":
                    out_envelope = resp.envelope
                elif kind == "prepend":
                    prepend = resp.prepend
                else:
                    parts.append(resp.chunk)
    except grpc.aio.AioRpcError as e:
        log.warning("rewriter unavailable: %s %s", e.code(), e.details())
        raise BackendUnavailable(REWRITER_DOWN) from e
    if out_envelope is None:
        raise BackendUnavailable(REWRITER_DOWN)
    return out_envelope, prepend + b"".join(parts)


class QueueWriter:
    """Publishes a final message to JetStream and returns only once the server stored it."""

    def __init__(self, nc: NATS, inline_limit: int, timeout: float) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.inline_limit = inline_limit
        self.timeout = timeout

    @property
    def available(self) -> bool:
        return self.nc.is_connected

    async def publish(self, envelope: common_pb2.Envelope, body: bytes) -> None:
        with tracer.start_as_current_span(
            f"{jetstream.SUBMIT_SUBJECT} publish",
            kind=trace.SpanKind.PRODUCER,
            attributes={
                "messaging.system": "nats",
                "messaging.operation.type": "publish",
                "messaging.destination.name": jetstream.SUBMIT_SUBJECT,
                "messaging.message.id": envelope.queue_id,
                "submitd.queue_id": envelope.queue_id,
                "messaging.message.body.size": len(body),
            },
        ):
            await self._publish(envelope, body)

    async def _publish(self, envelope: common_pb2.Envelope, body: bytes) -> None:
        qid = envelope.queue_id
        # The relay continues this trace: every delivery attempt, however late, is a child
        # of this publish span.
        trace_context = inject_context()
        qmsg = queue_pb2.QueuedMessage(
            envelope=envelope, received_at_ms=int(time.time() * 1000), size=len(body), trace_context=trace_context
        )
        try:
            await jetstream.enqueue(
                self.js, qmsg, body, msg_id=qid, inline_limit=self.inline_limit, timeout=self.timeout,
                headers=trace_context,
            )
        except nats.js.errors.APIError as e:
            text = (e.description or "").lower()
            if "maximum bytes" in text or "maximum messages" in text or "insufficient resources" in text:
                log.warning("queue full: %s", e.description)
                raise BackendUnavailable(QUEUE_FULL) from e
            log.warning("queue refused the message: %s", e)
            raise BackendUnavailable(QUEUE_DOWN) from e
        except (nats.errors.Error, asyncio.TimeoutError, OSError) as e:
            log.warning("queue unavailable: %r", e)
            raise BackendUnavailable(QUEUE_DOWN) from e
