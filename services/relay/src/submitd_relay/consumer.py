"""The queue consumer: pull, deliver, and only then acknowledge."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from opentelemetry import trace

from submitd.v1 import queue_pb2
from submitd_common import jetstream, received
from submitd_common.bodies import delete, sweep_unfinished
from submitd_common.telemetry import extract_context

from . import dsn, metrics, settle, streams
from .delivery import NextHopPool
from .model import NextHopError, Outcome
from .queue import QueuedBody, queue_metrics, sweep_orphaned_bodies
from .reports import Reports, Signer
from .settings import Settings
from .state import DeliveryState, StateStore
from .stranded import RecentAcks, StrandedEntries, withdraw

log = logging.getLogger("submitd.relay")
tracer = trace.get_tracer("submitd.relay")
DURABLE = jetstream.RELAY_DURABLE
INTERNAL_RETRY = 2.0  # seconds before a message whose handling failed inside submitd is tried again


def parse(msg: Msg) -> queue_pb2.QueuedMessage | None:
    try:
        return queue_pb2.QueuedMessage.FromString(msg.data)
    except Exception as e:
        log.error("unreadable queue entry terminated", extra={"fields": {"subject": msg.subject, "error": repr(e)}})
        return None


class Relay:
    def __init__(self, nc, pool: NextHopPool, settings: Settings, signer: Signer | None = None) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.reports = Reports(self.js, settings, signer)
        self.state = StateStore(self.js, streams.delivery_records(settings), settings.finished_record_seconds)
        self.acked = RecentAcks()
        self.delivering: set[str] = set()  # queue ids being delivered here now
        self.stranded = StrandedEntries(self.js, self.state, self.acked)
        self.pool = pool
        self.s = settings
        self.inflight: set[asyncio.Task] = set()
        self.stopping = asyncio.Event()
        self._sub = None

    async def start(self) -> None:
        await self.state.open()
        # Made, or brought to these settings, by provisioning (streams.consumer): a consumer's
        # configuration may aim its deliveries anywhere, so the relay may not write one.
        info = await jetstream.wait_for_consumer(self.js, DURABLE)
        want = streams.consumer(self.s)
        if (info.config.ack_wait, info.config.max_ack_pending) != (want.ack_wait, want.max_ack_pending):
            log.error("the queue's consumer is not as this relay's settings say (AckWait %s s, max ack pending "
                      "%s; want %s s, %s): run its provisioning with these settings", info.config.ack_wait,
                      info.config.max_ack_pending, want.ack_wait, want.max_ack_pending)
        self._sub = await self.js.pull_subscribe_bind(durable=DURABLE, stream=jetstream.STREAM)

    async def run(self) -> None:
        assert self._sub is not None
        while not self.stopping.is_set():
            room = self.s.connections - len(self.inflight)
            if room <= 0:
                await asyncio.wait(self.inflight, return_when=asyncio.FIRST_COMPLETED)
                continue
            try:
                msgs = await self._sub.fetch(batch=room, timeout=self.s.fetch_wait)
            except asyncio.TimeoutError:  # nats.errors.TimeoutError too: nothing to fetch
                continue
            except (nats.errors.Error, OSError) as e:
                log.warning("fetch failed: %r", e)
                await asyncio.sleep(0.5)
                continue
            # Withdrawals first: the entry one withdraws is earlier in the queue, often in the
            # same batch, and must not be started meanwhile.
            entries = [(msg, parse(msg)) for msg in msgs]
            withdrawn = set()
            for msg, qmsg in entries:
                if qmsg is not None and qmsg.withdrawal:
                    await self.withdrawal(msg, qmsg)
                    withdrawn.add(qmsg.envelope.queue_id)
            for msg, qmsg in entries:
                if qmsg is not None and (qmsg.withdrawal or qmsg.envelope.queue_id in withdrawn):
                    continue  # a withdrawn entry is gone from the stream already
                task = asyncio.create_task(self.handle(msg, qmsg))
                self.inflight.add(task)
                task.add_done_callback(self.inflight.discard)

    async def watch_queue(self, interval: float = 15.0) -> None:
        """Queue depth, age and consumer lag for /metrics (and the alerts built on them)."""
        while not self.stopping.is_set():
            await queue_metrics(self.js)
            try:
                await asyncio.wait_for(self.stopping.wait(), interval)
            except asyncio.TimeoutError:
                pass

    async def check_stranded(self) -> None:
        """Entries the consumer passed but the stream kept (see stranded.py)."""
        if self.s.stranded_check_interval > 0:
            await self.stranded.run(self.stopping, self.s.stranded_check_interval)

    async def sweep(self) -> None:

        while not self.stopping.is_set():
            try:
                await asyncio.wait_for(self.stopping.wait(), self.s.orphan_sweep_interval)
                return
            except asyncio.TimeoutError:
                pass
            try:
                metrics.ORPHANS.inc(await sweep_orphaned_bodies(self.js, self.s.orphan_min_age))
                # Chunks of bodies whose writer died before finishing them (never an object).
                metrics.ORPHANS.inc(await sweep_unfinished(self.js, jetstream.BODY_BUCKET, self.s.orphan_min_age))
            except Exception as e:
                log.warning("orphan sweep failed: %r", e)

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

    async def delete_body(self, qmsg: queue_pb2.QueuedMessage) -> None:
        if qmsg.WhichOneof("body") != "object_name":
            return
        try:
            await delete(self.js, jetstream.BODY_BUCKET, qmsg.object_name)
        except Exception as e:
            log.warning("could not delete body %s: %r", qmsg.object_name, e)

    def backoff(self, attempt: int) -> float:
        schedule = self.s.retry_schedule or [300.0]
        return schedule[min(attempt, len(schedule)) - 1]

    async def withdrawal(self, msg: Msg, marker: queue_pb2.QueuedMessage) -> None:
        try:
            await withdraw(self.js, self.acked, self.delivering, marker)
            await msg.ack_sync()
        except Exception as e:
            log.warning("withdrawal of %s failed: %r", marker.envelope.queue_id, e)
            with contextlib.suppress(Exception):
                await msg.nak(delay=INTERNAL_RETRY)

    async def handle(self, msg: Msg, qmsg: queue_pb2.QueuedMessage | None = None) -> None:
        qmsg = qmsg or parse(msg)
        if qmsg is None:  # not ours, or damaged: redelivering it cannot help
            with contextlib.suppress(Exception):
                await msg.term()
            return
        if qmsg.withdrawal:
            await self.withdrawal(msg, qmsg)
            return
        if qmsg.envelope.queue_id in self.delivering:
            # Handed out again while this relay still delivers it (a restarted server that lost
            # the delivery): after this attempt has ended, the next look finds it finished.
            log.info("already being delivered", extra={"fields": {"queue_id": qmsg.envelope.queue_id}})
            with contextlib.suppress(Exception):
                await msg.nak(delay=INTERNAL_RETRY)
            return
        self.delivering.add(qmsg.envelope.queue_id)
        try:
            await self._handle(msg, qmsg)
        finally:
            self.delivering.discard(qmsg.envelope.queue_id)

    async def _handle(self, msg: Msg, qmsg: queue_pb2.QueuedMessage) -> None:
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
                "server.address": self.pool.name,
            },
        ) as span:
            keepalive = asyncio.create_task(self._keepalive(msg))
            try:
                if env.queue_id in self.acked:
                    # This relay delivered and acknowledged it; the server lost the ack (a NATS
                    # crash) and hands it out again, maybe as a first delivery.
                    log.info("already delivered, ack lost", extra={"fields": {"queue_id": env.queue_id, "attempt": attempt}})
                    span.set_attribute("submitd.outcome", "duplicate")
                    metrics.DUPLICATES_AVOIDED.inc()
                    await msg.ack_sync()
                    return
                # A first delivery has no record to read: records are written only for messages
                # that were deferred, partly delivered or reported on (and copies an admin
                # retried carry a header saying so).
                if attempt > 1 or (msg.headers or {}).get(jetstream.RECORD_HEADER):
                    state = await self.state.get(env.queue_id)
                else:
                    state = DeliveryState()
                if attempt > 1 and not state.revision:
                    metrics.POSSIBLE_DUPLICATES.inc()
                pending = [r for r in env.recipients if r.address not in state.finished]
                if not pending:
                    # Redelivered after a crash (or a lost ack) between the next hop's 250 and our ack.
                    log.info("already delivered", extra={"fields": {"queue_id": env.queue_id, "attempt": attempt}})
                    span.set_attribute("submitd.outcome", "duplicate")
                    metrics.DUPLICATES_AVOIDED.inc()
                    await msg.ack_sync()
                    self.acked.add(env.queue_id)
                    await self.delete_body(qmsg)
                    return
                work = queue_pb2.QueuedMessage()
                work.CopyFrom(qmsg)
                del work.envelope.recipients[:]
                work.envelope.recipients.extend(pending)
                # The body streams from JetStream to the next hop as it takes it: a large
                # message costs a few chunks of memory, not its size.
                body = QueuedBody(self.js, qmsg)
                try:
                    await body.check()
                except (nats.js.errors.ObjectNotFoundError, nats.js.errors.ObjectDeletedError):
                    # Retrying cannot bring it back: the sender is told, never left waiting.
                    log.error("message body missing", extra={"fields": {"queue_id": env.queue_id}})
                    body = None
                    outcome = Outcome(next_hop=self.pool.name)
                    outcome.fail_all([r.address for r in pending], 554, "5.3.0 The message body was lost in the queue")
                else:
                    outcome = await self._deliver(qmsg, work, body, pending)
                await self._settle(msg, work, body, outcome, state, attempt, span)
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await msg.nak()
                raise
            except Exception:
                # Our own trouble (NATS away, a record not written): soon again for a passing
                # outage, on the usual schedule if it keeps failing. What is done is in the
                # record, so nothing goes twice.
                log.exception("delivery of %s failed", env.queue_id)
                delay = INTERNAL_RETRY if attempt <= 5 else self.backoff(attempt)
                with contextlib.suppress(Exception):
                    await msg.nak(delay=delay)
            finally:
                keepalive.cancel()

    async def _deliver(self, qmsg, work, body: QueuedBody, pending) -> Outcome:
        hops = received.hops(dsn.header_section(await jetstream.message_head(self.js, qmsg)))
        if hops > self.s.max_hops:
            # Whoever queued it, a message that went round this often is in a loop: the next
            # hop would only hand it back again.
            log.error("too many hops", extra={"fields": {"queue_id": qmsg.envelope.queue_id, "hops": hops}})
            outcome = Outcome(next_hop=self.pool.name)
            outcome.fail_all([r.address for r in pending], 554,
                             f"5.4.6 Too many hops ({hops} Received/Delivered-To fields): a mail loop")
            return outcome
        try:
            return await self.pool.deliver(work.envelope, body)
        except NextHopError as e:
            outcome = Outcome(next_hop=self.pool.name)
            outcome.fail_all([r.address for r in pending], 451, f"4.4.1 next hop: {e}")
            return outcome

    async def _remember_delivered(self, env, state: DeliveryState) -> None:
        """The ack of a delivered message may be lost (NATS away): its record, written as soon
        as NATS takes it again (the redelivery waits AckWait), makes the redelivery an ack and
        not a second copy. Costs nothing unless an ack fails."""
        state.finish(r.address for r in env.recipients)
        # A restarted server may hand it out as a first delivery, which reads no record: this
        # relay's memory of what it finished covers that.
        self.acked.add(env.queue_id)
        deadline = time.monotonic() + self.s.ack_wait * 0.8
        while True:
            try:
                await self.state.put(env.queue_id, state, final=True)
                return
            except Exception as e:
                if time.monotonic() > deadline:
                    log.warning("could not record the delivery of %s: it may be sent twice (%r)", env.queue_id, e)
                    return
                await asyncio.sleep(0.5)

    async def _failpoint(self, name: str) -> None:
        if self.s.failpoint == name:
            log.warning("failpoint %s reached: stopping here", name)
            await asyncio.Event().wait()

    async def _keepalive(self, msg: Msg) -> None:
        # A slow delivery must not be redelivered elsewhere while it still runs.
        while True:
            await asyncio.sleep(max(self.s.ack_wait / 3, 0.5))  # three chances before AckWait runs out
            with contextlib.suppress(Exception):
                await msg.in_progress()

    async def _settle(
        self, msg: Msg, qmsg: queue_pb2.QueuedMessage, body: QueuedBody | None, outcome: Outcome,
        state: DeliveryState, attempt: int, span,
    ) -> None:
        """Carry out settle.plan(): the record, the reports, the events, then ack or nak."""
        env = qmsg.envelope
        p = settle.plan(outcome, state.finished, state.delay_notified, state.revision, env,
                        time.time() - qmsg.received_at_ms / 1000, max_lifetime=self.s.max_lifetime,
                        delay_warning_after=self.s.delay_warning_after, backoff=self.backoff(attempt))
        state.record(attempt, outcome.next_hop, p.result, outcome.delivered, {**outcome.temporary, **outcome.permanent})
        # The record comes before anything else: from here on a crash cannot send to these
        # recipients again.
        if p.record_first:
            await self.state.put(env.queue_id, state, final=p.ack)
        await self._failpoint("after-record")

        self._count(qmsg, outcome, p.result, span)
        fields = {"queue_id": env.queue_id, "attempt": attempt, "next_hop": outcome.next_hop}

        # Reports, queued (and acknowledged by JetStream) before the original is acked.
        if p.null_return_path:
            log.info("no DSN to the null return path", extra={"fields": fields})
        for kind, statuses in p.reports:
            report_id = await self.reports.queue(qmsg, body, kind, statuses)
            state.reports.append(report_id)
            self.event("dsn", env, {"action": kind, "report_queue_id": report_id,
                                     "recipients": [s.recipient.address for s in statuses]})
        if p.failed:
            bounced = {f.recipient.address: f.reply for f in p.failed}
            log.error("bounced", extra={"fields": {**fields, "failed": bounced}})
            self.event("expired" if p.expired else "bounced", env, {
                "recipients": bounced, "attempt": attempt, "next_hop": outcome.next_hop})
        state.delay_notified = p.delay_notified
        state.finish(p.finished)
        if p.record_again:
            await self.state.put(env.queue_id, state, final=p.ack)
        if outcome.delivered:
            self.event("delivered", env, {"recipients": outcome.delivered, "attempt": attempt,
                                           "next_hop": outcome.next_hop})

        if p.ack:
            try:
                if self.s.failpoint == "ack-lost":
                    raise nats.errors.ConnectionClosedError
                await msg.ack_sync()
            except Exception:
                await self._remember_delivered(env, state)
                raise
            self.acked.add(env.queue_id)
            await self.delete_body(qmsg)
            if outcome.delivered:
                log.info("delivered", extra={"fields": {**fields, "recipients": len(outcome.delivered)}})
            return
        self.event("deferred", env, {"recipients": outcome.temporary, "attempt": attempt,
                                      "next_hop": outcome.next_hop, "retry_in": p.retry_in})
        # The message waits for its retry as it is; the record (written above, before this
        # nak) makes the next attempt skip every recipient already finished. A republished
        # copy would be available at once, losing the backoff.
        await msg.nak(delay=p.retry_in)
        partly = any(r.address in p.finished for r in env.recipients)
        log.info("partially delivered" if partly else "deferred",
                 extra={"fields": {**fields, "deferred": outcome.temporary, "retry_in": p.retry_in}})

    def _count(self, qmsg: queue_pb2.QueuedMessage, outcome: Outcome, result: str, span) -> None:
        metrics.count_attempt(qmsg, outcome, result, span, smarthost=bool(self.pool.smarthost),
                              trace_addresses=self.s.trace_addresses)

    def event(self, event: str, env, fields: dict) -> None:
        """An outcome event on NATS (submitd.events.<event>), fire and forget: events inform,
        the queue and the delivery record are what count."""
        metrics.EVENTS.labels(event).inc()
        payload = {"event": event, "queue_id": env.queue_id, "return_path": env.return_path, "at": time.time(), **fields}
        task = asyncio.ensure_future(self.nc.publish(f"{jetstream.EVENTS_PREFIX}.{event}", json.dumps(payload).encode()))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
