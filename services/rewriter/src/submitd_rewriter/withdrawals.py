"""Publishes the rewriter gave up on, taken back.

A queue entry is published and the client gets 250 only on JetStream's acknowledgement. When
that acknowledgement does not come (NATS stalled or restarting), the client is told 451 and will
send the message again, yet the first publish may have been stored all the same: delivered, it
would reach the recipients twice. The same holds for a publish whose client went while it waited
(the frontend cancelled the Submit call, or withdrew the SubmitMany item). So every publish given
up on this way is withdrawn, once NATS answers again:

1. a marker entry is published under the message's own ``Nats-Msg-Id`` (its queue id). If the
   server had stored the message, the marker is a duplicate and the acknowledgement names the
   stored entry's sequence; otherwise the marker itself is stored, and the relay drops it;
2. if the message was stored, a second marker (``<queue id>.withdraw``) tells the relay to
   remove the entry at that sequence. The rewriter itself may not delete queue entries (least
   privilege): the relay does, and counts the ones it was too late for
   (``submitd_queue_withdrawals_total{outcome="too_late"}``, a possible duplicate).

Withdrawals live in this process: one it still held when it stopped is logged, never retried.
"""

from __future__ import annotations

import asyncio
import logging
import time

from nats.aio.client import Client as NATS
from prometheus_client import Counter

from submitd.v1 import common_pb2, queue_pb2
from submitd_common import jetstream

log = logging.getLogger("submitd.rewriter")
WITHDRAWALS = Counter(
    "submitd_rewriter_withdrawals_total",
    "Publishes answered 451 without an acknowledgement, by what the withdrawal found "
    "(requested; stored: the relay is told to remove it; not_stored; abandoned: NATS never answered in time)",
    ["outcome"],
)
ASKED = Counter(
    "submitd_rewriter_withdraws_received_total",
    "Withdraw items received from the frontend (messages it gave up on); each becomes a withdrawal "
    "when the message was being published or was queued",
)


class Withdrawals:
    def __init__(self, nc: NATS, timeout: float, keep_for: float = 1500.0) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.timeout = timeout
        self.keep_for = keep_for  # inside the stream's duplicate window (30 minutes)
        self.pending: dict[str, float] = {}
        # Withdrawn lately: asked again (a cancelled Submit call and the frontend's withdraw of
        # it both ask), it is not done twice. Kept as long as a pending one.
        self.done: dict[str, float] = {}
        self.wake = asyncio.Event()

    def add(self, queue_id: str) -> None:
        now = time.monotonic()
        while self.done and now - next(iter(self.done.values())) > self.keep_for:
            del self.done[next(iter(self.done))]  # (oldest first: kept in the order done)
        if queue_id in self.pending or queue_id in self.done:
            return
        self.pending[queue_id] = now
        WITHDRAWALS.labels("requested").inc()
        log.warning("publish given up: withdrawing it", extra={"fields": {"queue_id": queue_id}})
        self.wake.set()

    async def withdraw(self, queue_id: str) -> str:
        marker = queue_pb2.QueuedMessage(envelope=common_pb2.Envelope(queue_id=queue_id), withdrawal=True)
        ack = await self.js.publish(jetstream.SUBMIT_SUBJECT, marker.SerializeToString(),
                                    timeout=self.timeout, headers={"Nats-Msg-Id": queue_id})
        if not ack.duplicate:
            return "not_stored"
        marker.withdraw_seq = ack.seq
        await self.js.publish(jetstream.SUBMIT_SUBJECT, marker.SerializeToString(),
                              timeout=self.timeout, headers={"Nats-Msg-Id": f"{queue_id}.withdraw"})
        return "stored"

    async def flush(self) -> None:
        """Withdraw what is pending now; what NATS does not answer stays for the next try."""
        for queue_id, since in list(self.pending.items()):
            if time.monotonic() - since > self.keep_for:
                del self.pending[queue_id]
                WITHDRAWALS.labels("abandoned").inc()
                log.error("withdrawal abandoned: the message may be delivered after its 451",
                          extra={"fields": {"queue_id": queue_id}})
                continue
            if not self.nc.is_connected:
                return
            try:
                outcome = await self.withdraw(queue_id)
            except Exception as e:
                log.info("withdrawal of %s not done yet: %r", queue_id, e)
                return
            del self.pending[queue_id]
            self.done[queue_id] = time.monotonic()
            WITHDRAWALS.labels(outcome).inc()
            log.warning("publish withdrawn", extra={"fields": {"queue_id": queue_id, "outcome": outcome}})

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            if self.pending:
                await self.flush()
            self.wake.clear()
            waiter = asyncio.ensure_future(self.wake.wait())
            stopper = asyncio.ensure_future(stopping.wait())
            await asyncio.wait({waiter, stopper}, timeout=1.0 if self.pending else 60.0,
                               return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            stopper.cancel()
        await self.flush()
        for queue_id in self.pending:
            log.error("withdrawal left undone at shutdown", extra={"fields": {"queue_id": queue_id}})
