"""The queue consumer: pull, deliver, and only then acknowledge."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig
from opentelemetry import trace
from prometheus_client import Counter, Gauge, Histogram

from submitd.v1 import queue_pb2
from submitd_common import jetstream
from submitd_common.telemetry import extract_context

from .delivery import NextHopError, NextHopPool, Outcome
from .settings import Settings

log = logging.getLogger("submitd.relay")
ATTEMPTS = Counter("submitd_delivery_attempts_total", "Delivery attempts by result and next hop", ["result", "next_hop"])
RECIPIENTS = Counter("submitd_delivery_recipients_total", "Recipient outcomes", ["result"])
DELIVERY_LATENCY = Histogram(
    "submitd_delivery_seconds", "From acceptance to delivery",
    buckets=(0.1, 0.5, 1, 5, 30, 60, 300, 900, 3600, 14400, 86400, 432000),
)
QUEUE_DEPTH = Gauge("submitd_queue_messages", "Messages in the queue stream")
QUEUE_BYTES = Gauge("submitd_queue_bytes", "Bytes in the queue stream")
QUEUE_OLDEST = Gauge("submitd_queue_oldest_age_seconds", "Age of the oldest queued message")
CONSUMER_LAG = Gauge("submitd_consumer_pending", "Messages not yet handed to a relay")
IN_FLIGHT = Gauge("submitd_consumer_ack_pending", "Messages handed out and not yet acknowledged")
tracer = trace.get_tracer("submitd.relay")
DURABLE = "relay"


class Relay:
    def __init__(self, js: JetStreamContext, pool: NextHopPool, settings: Settings) -> None:
        self.js = js
        self.pool = pool
        self.s = settings
        self.inflight: set[asyncio.Task] = set()
        self.stopping = asyncio.Event()
        self._bodies = None
        self._sub = None

    async def start(self) -> None:
        self._sub = await self.js.pull_subscribe(
            f"{jetstream.SUBJECT_PREFIX}.>",
            durable=DURABLE,
            stream=jetstream.STREAM,
            config=ConsumerConfig(
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=self.s.ack_wait,
                max_deliver=-1,
                max_ack_pending=max(1000, self.s.connections * 4),
            ),
        )

    async def run(self) -> None:
        assert self._sub is not None
        while not self.stopping.is_set():
            room = self.s.connections - len(self.inflight)
            if room <= 0:
                await asyncio.wait(self.inflight, return_when=asyncio.FIRST_COMPLETED)
                continue
            try:
                msgs = await self._sub.fetch(batch=room, timeout=1.0)
            except nats.errors.TimeoutError:
                continue
            except (nats.errors.Error, OSError) as e:
                log.warning("fetch failed: %r", e)
                await asyncio.sleep(0.5)
                continue
            for msg in msgs:
                task = asyncio.create_task(self.handle(msg))
                self.inflight.add(task)
                task.add_done_callback(self.inflight.discard)

    async def watch_queue(self, interval: float = 5.0) -> None:
        """Queue depth, age and consumer lag for /metrics (and the alerts built on them)."""
        while not self.stopping.is_set():
            try:
                stream = await self.js.stream_info(jetstream.STREAM)
                consumer = await self.js.consumer_info(jetstream.STREAM, DURABLE)
                QUEUE_DEPTH.set(stream.state.messages)
                QUEUE_BYTES.set(stream.state.bytes)
                CONSUMER_LAG.set(consumer.num_pending)
                IN_FLIGHT.set(consumer.num_ack_pending)
                oldest = 0.0
                if stream.state.messages:
                    first = await self.js.get_msg(jetstream.STREAM, stream.state.first_seq)
                    received = queue_pb2.QueuedMessage.FromString(first.data).received_at_ms / 1000
                    oldest = max(0.0, time.time() - received)
                QUEUE_OLDEST.set(oldest)
            except Exception as e:  # metrics must never disturb delivery
                log.debug("queue metrics: %r", e)
            try:
                await asyncio.wait_for(self.stopping.wait(), interval)
            except asyncio.TimeoutError:
                pass

    async def stop(self, grace: float) -> None:
        """Stop fetching; let deliveries in flight finish, then hand the rest back."""
        self.stopping.set()
        if self.inflight:
            _, pending = await asyncio.wait(self.inflight, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def close(self) -> None:
        # A pull subscription's internal queue is never joined by anyone: left subscribed,
        # it would hold nc.drain() until the drain timeout.
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    async def _body(self, qmsg: queue_pb2.QueuedMessage) -> bytes:
        if qmsg.WhichOneof("body") == "inline_body":
            return qmsg.inline_body
        if self._bodies is None:
            self._bodies = await self.js.object_store(jetstream.BODY_BUCKET)
        return (await self._bodies.get(qmsg.object_name)).data

    async def _delete_body(self, qmsg: queue_pb2.QueuedMessage) -> None:
        if qmsg.WhichOneof("body") != "object_name":
            return
        try:
            await self._bodies.delete(qmsg.object_name)
        except Exception as e:
            log.warning("could not delete body %s: %r", qmsg.object_name, e)

    def backoff(self, attempt: int) -> float:
        schedule = self.s.retry_schedule or [300.0]
        return schedule[min(attempt, len(schedule)) - 1]

    async def handle(self, msg: Msg) -> None:
        qmsg = queue_pb2.QueuedMessage.FromString(msg.data)
        env = qmsg.envelope
        attempt = msg.metadata.num_delivered if msg.metadata else 1
        ctx = extract_context(msg.headers)
        with tracer.start_as_current_span(
            "relay.deliver",
            context=ctx,
            kind=trace.SpanKind.CONSUMER,
            attributes={
                "messaging.system": "nats",
                "messaging.destination.name": msg.subject,
                "submitd.queue_id": env.queue_id,
                "submitd.attempt": attempt,
                "server.address": self.s.next_hop_host,
                "server.port": self.s.next_hop_port,
            },
        ) as span:
            keepalive = asyncio.create_task(self._keepalive(msg))
            try:
                body = await self._body(qmsg)
                try:
                    outcome = await self.pool.deliver(env, body)
                except NextHopError as e:
                    outcome = Outcome(next_hop=self.pool.name)
                    outcome.fail_all([r.address for r in env.recipients], 451, f"4.4.1 next hop: {e}")
                await self._settle(msg, qmsg, outcome, attempt, span)
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await msg.nak()
                raise
            except Exception:
                log.exception("delivery of %s failed", env.queue_id)
                with contextlib.suppress(Exception):
                    await msg.nak(delay=self.backoff(attempt))
            finally:
                keepalive.cancel()

    async def _keepalive(self, msg: Msg) -> None:
        # A slow delivery must not be redelivered elsewhere while it still runs.
        while True:
            await asyncio.sleep(max(self.s.ack_wait / 3, 0.5))
            with contextlib.suppress(Exception):
                await msg.in_progress()

    async def _settle(self, msg: Msg, qmsg: queue_pb2.QueuedMessage, outcome: Outcome, attempt: int, span) -> None:
        env = qmsg.envelope
        result = "delivered" if not outcome.temporary and not outcome.permanent else (
            "deferred" if outcome.temporary else "failed")
        ATTEMPTS.labels(result, outcome.next_hop).inc()
        for name, count in (("delivered", len(outcome.delivered)), ("deferred", len(outcome.temporary)),
                            ("failed", len(outcome.permanent))):
            if count:
                RECIPIENTS.labels(name).inc(count)
        if outcome.delivered:
            DELIVERY_LATENCY.observe(max(0.0, time.time() - qmsg.received_at_ms / 1000))
        span.set_attribute("submitd.outcome", result)
        replies = {**outcome.temporary, **outcome.permanent}
        if replies:
            span.set_attribute("smtp.reply", sorted(set(replies.values()))[:5])
        span.set_attribute("submitd.delivered", len(outcome.delivered))
        span.set_attribute("submitd.deferred", len(outcome.temporary))
        span.set_attribute("submitd.failed", len(outcome.permanent))
        fields = {"queue_id": env.queue_id, "attempt": attempt, "next_hop": outcome.next_hop}
        if outcome.permanent:
            # Bounces (RFC 3464) are not generated yet: the failure is logged loudly.
            log.error("undeliverable recipients", extra={"fields": {**fields, "failed": outcome.permanent}})
        if not outcome.temporary:
            await msg.ack_sync()
            await self._delete_body(qmsg)
            log.info("delivered", extra={"fields": {**fields, "recipients": len(outcome.delivered)}})
            return
        age = time.time() - qmsg.received_at_ms / 1000
        if age > self.s.max_lifetime:
            log.error("giving up after max lifetime", extra={"fields": {**fields, "failed": outcome.temporary}})
            await msg.ack_sync()
            await self._delete_body(qmsg)
            return
        delay = self.backoff(attempt)
        if outcome.delivered or outcome.permanent:
            # Some recipients are done: only the deferred ones are queued again, under an id
            # derived from this attempt so that a repeated republish is de-duplicated.
            retry = queue_pb2.QueuedMessage()
            retry.CopyFrom(qmsg)
            del retry.envelope.recipients[:]
            retry.envelope.recipients.extend(r for r in env.recipients if r.address in outcome.temporary)
            await self.js.publish(
                jetstream.SUBMIT_SUBJECT,
                retry.SerializeToString(),
                headers={"Nats-Msg-Id": f"{env.queue_id}.{attempt}", **{k: v for k, v in (msg.headers or {}).items() if k != "Nats-Msg-Id"}},
            )
            await msg.ack_sync()
            log.info("partially delivered", extra={"fields": {**fields, "deferred": outcome.temporary}})
            return
        await msg.nak(delay=delay)
        log.info("deferred", extra={"fields": {**fields, "deferred": outcome.temporary, "retry_in": delay}})
