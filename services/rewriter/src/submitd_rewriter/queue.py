"""The rewriter's writes to the queue: a finished message published to JetStream, answered
only once the server stored it.

The frontend's message crosses gRPC once, into the rewriter, which completes and signs it and
queues it here (inline in its queue entry up to 256 KiB, else streamed into the Object Store
as the rewriter produces it); the frontend answers 250 on the reply that says it is stored.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from opentelemetry import trace
from prometheus_client import Gauge

from submitd.v1 import common_pb2, queue_pb2
from submitd_common import jetstream
from submitd_common.bodies import BodyWriter
from submitd_common.replies import reply
from submitd_common.telemetry import inject_context

from .withdrawals import Withdrawals

tracer = trace.get_tracer("submitd.rewriter")
log = logging.getLogger("submitd.rewriter")

QUEUE_DOWN = reply(451, "4.3.0", "Queue temporarily unavailable, try again later")
QUEUE_FULL = reply(452, "4.3.1", "Insufficient system storage, try again later")
WAITING = Gauge("submitd_rewriter_publishes_waiting",
                "Queue publishes not yet acknowledged by JetStream (their clients wait for the 250)")


class QueueUnavailable(Exception):
    """The queue did not take the message: the client gets ``reply`` (4xx) and may retry."""

    def __init__(self, smtp_reply: common_pb2.Reply) -> None:
        super().__init__(smtp_reply.text)
        self.reply = smtp_reply


class QueueWriter:
    """Publishes a final message to JetStream and returns only once the server stored it."""

    def __init__(self, nc: NATS, timeout: float) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        # Messages of up to 256 KiB travel inside their queue entry; larger ones were streamed
        # into the Object Store (publish_stored).
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
        WAITING.inc()
        try:
            await publish()
            if asyncio.current_task().cancelling():
                # Cancelled as the acknowledgement came: asyncio.wait_for (Python 3.11) returns
                # the result and drops the cancel. The client went or was told 451 all the same.
                raise asyncio.CancelledError
        except asyncio.CancelledError:
            self.withdrawals.add(qmsg.envelope.queue_id)  # the client went: it will send it again
            raise
        except nats.js.errors.APIError as e:
            text = (e.description or "").lower()
            if "maximum bytes" in text or "maximum messages" in text or "insufficient resources" in text:
                log.warning("queue full: %s", e.description)
                raise QueueUnavailable(QUEUE_FULL) from e
            log.warning("queue refused the message: %s", e)
            raise QueueUnavailable(QUEUE_DOWN) from e
        except (nats.errors.Error, asyncio.TimeoutError, OSError) as e:
            log.warning("queue unavailable: %r", e)
            # No answer is no refusal: the entry may be stored, and the client will send it again.
            self.withdrawals.add(qmsg.envelope.queue_id)
            raise QueueUnavailable(QUEUE_DOWN) from e
        finally:
            WAITING.dec()
