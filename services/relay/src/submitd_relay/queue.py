"""The queue as storage, for the consumer and the admin API alike: its entries read in order,
a queued message's body, and the sweep of bodies no entry refers to."""

from __future__ import annotations

import logging
import time

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from submitd.v1 import queue_pb2
from submitd_common import bodies, jetstream
from submitd_common.bodies import object_info

from . import metrics
from .model import Body

log = logging.getLogger("submitd.relay")
MAX_SCAN = 100_000  # stream entries one listing may read


class QueuedBody(Body):
    """A queued message's body, read from JetStream a chunk at a time for each transaction."""

    def __init__(self, js: JetStreamContext, qmsg: queue_pb2.QueuedMessage) -> None:
        self.js = js
        self.qmsg = qmsg
        inline = qmsg.inline_body if qmsg.WhichOneof("body") == "inline_body" else b""
        self.size = qmsg.size or len(qmsg.prefix) + len(inline)
        self.eight_bit = qmsg.envelope.body_type == "8BITMIME" or not (inline.isascii() and qmsg.prefix.isascii())

    def chunks(self):
        return jetstream.message_chunks(self.js, self.qmsg)

    async def check(self) -> None:
        """ObjectNotFoundError if the body in the Object Store is gone."""
        if self.qmsg.WhichOneof("body") == "object_name":
            await object_info(self.js, jetstream.BODY_BUCKET, self.qmsg.object_name)



async def scan_queue(js, limit: int | None = MAX_SCAN, start: int | None = None):
    """(raw stream message, QueuedMessage) for the entries in the queue, oldest first (from
    sequence ``start``, at most ``limit`` of them)."""
    info = await js.stream_info(jetstream.STREAM)
    seq, seen = max(start or 0, info.state.first_seq), 0
    while (limit is None or seen < limit) and seq <= info.state.last_seq:
        try:
            raw = await js.get_msg(jetstream.STREAM, seq, subject=f"{jetstream.SUBJECT_PREFIX}.>", next=True)
        except NotFoundError:
            return
        seen += 1
        yield raw, queue_pb2.QueuedMessage.FromString(raw.data or b"")
        seq = raw.seq + 1


async def sweep_orphaned_bodies(js, min_age: float) -> int:
    """Delete Object Store bodies no queue entry refers to (left by a publish that failed
    and whose clean-up failed too), once they are older than ``min_age`` seconds.

    The whole queue is read, then whatever was added while it was read, until nothing new
    came: an entry republished during the scan (an admin retry) keeps its body."""
    from datetime import datetime

    objects = await bodies.list_objects(js, jetstream.BODY_BUCKET)
    candidates = []
    for info in objects:
        stamp = info.mtime or ""
        if "." in stamp:  # nanoseconds: more digits than fromisoformat takes
            head, _, frac = stamp.partition(".")
            stamp = f"{head}.{frac.rstrip('Z')[:6]}+00:00"
        try:
            age = time.time() - datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
        except ValueError:
            continue
        if age >= min_age:
            candidates.append(info.name)
    if not candidates:
        return 0
    referenced: set[str] = set()
    upto = 0
    for _ in range(20):  # under steady traffic each pass reads only what came meanwhile
        info = await js.stream_info(jetstream.STREAM)
        if info.state.last_seq <= upto:
            break
        async for _, q in scan_queue(js, limit=None, start=upto + 1):
            if q.WhichOneof("body") == "object_name":
                referenced.add(q.object_name)
        upto = info.state.last_seq
    else:
        return 0  # the queue never stood still long enough: try again next time
    removed = 0
    for name in candidates:
        if name not in referenced:
            await bodies.delete(js, jetstream.BODY_BUCKET, name)
            removed += 1
    if removed:
        log.warning("removed orphaned bodies", extra={"fields": {"count": removed}})
    return removed


async def queue_metrics(js) -> None:
    """Queue depth, age and consumer lag for /metrics (and the alerts built on them)."""
    try:
        stream = await js.stream_info(jetstream.STREAM)
        consumer = await js.consumer_info(jetstream.STREAM, jetstream.RELAY_DURABLE)
        metrics.QUEUE_DEPTH.set(stream.state.messages)
        metrics.QUEUE_BYTES.set(stream.state.bytes)
        metrics.CONSUMER_LAG.set(consumer.num_pending)
        metrics.IN_FLIGHT.set(consumer.num_ack_pending)
        oldest = 0.0
        if stream.state.messages:
            # The first entry at or after first_seq: deleted entries leave gaps.
            first = await js.get_msg(jetstream.STREAM, stream.state.first_seq,
                                     subject=f"{jetstream.SUBJECT_PREFIX}.>", next=True)
            received = queue_pb2.QueuedMessage.FromString(first.data).received_at_ms / 1000
            oldest = max(0.0, time.time() - received)
        metrics.QUEUE_OLDEST.set(oldest)
    except Exception as e:  # metrics must never disturb delivery
        log.debug("queue metrics: %r", e)


async def remove_abandoned_bodies(nc, js):
    """Chunks of body writes a frontend abandoned (a refusal, a client gone), removed at once
    (the frontend may not purge); one relay replica takes each. Returns the subscription."""
    import json

    async def remove(msg) -> None:
        try:
            nuid = json.loads(msg.data).get("nuid", "")
            if await bodies.purge_abandoned(js, jetstream.BODY_BUCKET, str(nuid)):
                metrics.ORPHANS.inc()
        except Exception as e:  # the orphan sweep gets them later
            log.info("abandoned body not removed: %r", e)

    return await nc.subscribe(jetstream.ABANDONED_SUBJECT, queue="relay", cb=remove)
