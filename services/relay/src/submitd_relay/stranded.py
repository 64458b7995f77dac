"""Queue entries the relay's consumer has passed but the stream still holds.

A WorkQueue stream removes an entry when its consumer acknowledges it; after nats-server restarts
the two can disagree (nats-server #4736, #7680; seen here after a NATS kill): the stream keeps an
entry at or below the consumer's ack floor, which the consumer will never hand out again. Nobody
would notice: the message would sit in the queue for ever with no delivery attempt.

This module notices them (on start, after every reconnect, and every ``STRANDED_CHECK_INTERVAL``)
by comparing the stream's count with the consumer's pending and ack-pending counts, which costs
two requests when they agree; only when they do not is the stream read up to the ack floor. Each
stranded entry is then settled by what is known of it:

- delivered: this relay acknowledged it after the next hop's 250 (a bounded memory of recent acks),
  or its delivery record says every recipient is finished → the entry is removed;
- otherwise → a copy is queued that reads the delivery record first (so a recipient already done
  is not sent again) under a Nats-Msg-Id derived from the entry's sequence (two relays recovering
  the same entry queue one copy), and the entry is removed. Where nothing shows the message was
  delivered and it was (another replica's ack, lost with the record), the next hop gets a second
  copy: counted in ``submitd_delivery_possible_duplicates_total``.

An entry above the ack floor cannot be told from one in flight (JetStream does not list a
consumer's pending set); one that was stranded there is found once the floor passes it. The
gauge ``submitd_queue_unaccounted`` says how many entries the counts do not explain meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError, ObjectDeletedError, ObjectNotFoundError

from submitd.v1 import queue_pb2
from submitd_common import bodies, jetstream

from . import metrics
from .queue import QueuedBody
from .state import StateStore

log = logging.getLogger("submitd.relay")


class RecentAcks:
    """Queue ids this relay finished (every recipient delivered or reported) and acknowledged,
    or tried to, the newest ``size`` of them."""

    def __init__(self, size: int = 100_000) -> None:
        self.size = size
        self._ids: OrderedDict[str, None] = OrderedDict()

    def add(self, queue_id: str) -> None:
        self._ids[queue_id] = None
        if len(self._ids) > self.size:
            self._ids.popitem(last=False)

    def __contains__(self, queue_id: str) -> bool:
        return queue_id in self._ids


class StrandedEntries:
    def __init__(self, js: JetStreamContext, state: StateStore, acked: RecentAcks, confirm_after: float = 2.0) -> None:
        self.js = js
        self.confirm_after = confirm_after
        self.state = state
        self.acked = acked
        self.wake = asyncio.Event()  # set on reconnect: check at once

    async def check(self) -> int:
        """Settle the stranded entries there are now; returns how many there were."""
        stream = await self.js.stream_info(jetstream.STREAM)
        consumer = await self.js.consumer_info(jetstream.STREAM, jetstream.RELAY_DURABLE)
        unaccounted = stream.state.messages - consumer.num_pending - consumer.num_ack_pending
        metrics.UNACCOUNTED.set(max(0, unaccounted))
        if unaccounted <= 0:
            return 0
        floor = consumer.ack_floor.stream_seq if consumer.ack_floor else 0
        candidates, seq = [], stream.state.first_seq
        while seq <= floor:
            try:
                raw = await self.js.get_msg(jetstream.STREAM, seq, subject=f"{jetstream.SUBJECT_PREFIX}.>", next=True)
            except NotFoundError:
                break
            if raw.seq > floor:
                break
            candidates.append(raw.seq)
            seq = raw.seq + 1
        if not candidates:
            return 0
        # An entry acknowledged a moment ago may still be on its way out of the stream: only
        # one that is still there a while later is stranded.
        await asyncio.sleep(self.confirm_after)
        found = 0
        for seq in candidates:
            try:
                raw = await self.js.get_msg(jetstream.STREAM, seq)
            except NotFoundError:
                continue
            found += 1
            await self._settle(raw)
        return found

    async def _settle(self, raw) -> None:
        try:
            qmsg = queue_pb2.QueuedMessage.FromString(raw.data or b"")
        except Exception:
            qmsg = queue_pb2.QueuedMessage()
        queue_id = qmsg.envelope.queue_id
        fields = {"queue_id": queue_id, "seq": raw.seq}
        if not queue_id:
            log.error("stranded queue entry unreadable: removed", extra={"fields": fields})
            await self._remove(raw.seq, "unreadable")
            return
        if queue_id in self.acked:
            log.warning("stranded queue entry was delivered: removed", extra={"fields": fields})
            await self._remove(raw.seq, "delivered")
            return
        record = await self.state.get(queue_id)
        if record.revision and all(r.address in record.finished for r in qmsg.envelope.recipients):
            log.warning("stranded queue entry finished by its record: removed", extra={"fields": fields})
            await self._remove(raw.seq, "delivered")
            return
        if qmsg.WhichOneof("body") == "object_name":
            try:
                await QueuedBody(self.js, qmsg).check()
            except (ObjectNotFoundError, ObjectDeletedError):
                # A body goes only after its entry was acknowledged, or when the frontend gave
                # up on the publish (and answered 4xx): either way nothing is to be sent.
                log.warning("stranded queue entry without its body: removed", extra={"fields": fields})
                await self._remove(raw.seq, "body_gone")
                return
        headers = {k: v for k, v in (raw.headers or {}).items() if k != "Nats-Msg-Id"}
        await self.js.publish(jetstream.SUBMIT_SUBJECT, raw.data, headers={
            **headers, "Nats-Msg-Id": f"{queue_id}.stranded.{raw.seq}", jetstream.RECORD_HEADER: "1"})
        if not record.revision:
            metrics.POSSIBLE_DUPLICATES.inc()
        log.warning("stranded queue entry queued again for delivery", extra={"fields": fields})
        await self._remove(raw.seq, "requeued")

    async def _remove(self, seq: int, outcome: str) -> None:
        try:
            await self.js.delete_msg(jetstream.STREAM, seq)
        except NotFoundError:
            pass  # another relay settled it
        metrics.STRANDED.labels(outcome).inc()

    async def run(self, stopping: asyncio.Event, interval: float) -> None:
        """Check now, after every reconnect (``wake``) and every ``interval`` seconds."""
        while not stopping.is_set():
            try:
                await self.check()
            except Exception as e:  # NATS away: the reconnect wakes us again
                log.info("stranded entry check failed: %r", e)
            self.wake.clear()
            sleeper = asyncio.ensure_future(self.wake.wait())
            stopper = asyncio.ensure_future(stopping.wait())
            await asyncio.wait({sleeper, stopper}, timeout=interval, return_when=asyncio.FIRST_COMPLETED)
            for task in (sleeper, stopper):
                task.cancel()


async def withdraw(js: JetStreamContext, acked: RecentAcks, delivering: set[str], marker: queue_pb2.QueuedMessage) -> str:
    """Carry out a frontend's withdrawal (see submitd_frontend.withdrawals): remove the entry it
    names if it is still queued. Returns the outcome, counted and logged."""
    queue_id = marker.envelope.queue_id
    outcome = "nothing_stored"
    if marker.withdraw_seq:
        try:
            raw = await js.get_msg(jetstream.STREAM, marker.withdraw_seq)
            entry = queue_pb2.QueuedMessage.FromString(raw.data or b"")
        except NotFoundError:
            entry = None
        if entry is not None and entry.envelope.queue_id == queue_id and not entry.withdrawal:
            await js.delete_msg(jetstream.STREAM, marker.withdraw_seq)
            if entry.WhichOneof("body") == "object_name":
                await bodies.delete(js, jetstream.BODY_BUCKET, entry.object_name)
            outcome = ("delivered_meanwhile" if queue_id in acked
                       else "in_flight" if queue_id in delivering else "removed")
        else:
            outcome = "too_late"
        if outcome != "removed":
            # Gone already (delivered, or being delivered): the client was told 451 and has
            # probably sent it again.
            metrics.POSSIBLE_DUPLICATES.inc()
    metrics.WITHDRAWALS.labels(outcome).inc()
    (log.warning if outcome in ("too_late", "delivered_meanwhile", "in_flight") else log.info)(
        "withdrawal", extra={"fields": {"queue_id": queue_id, "seq": marker.withdraw_seq, "outcome": outcome}})
    return outcome
