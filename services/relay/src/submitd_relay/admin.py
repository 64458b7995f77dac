"""The queue admin API (FastAPI, under /api/v1/queue, bearer token).

The queue is the JetStream stream and the delivery records are in a KV bucket, so every relay
replica answers the same: list and search, show one message with its attempts, retry now,
delete, bounce, totals. OpenAPI at /openapi.json."""

from __future__ import annotations

import email.parser
import email.policy
import logging
import time
from typing import Protocol

from fastapi import APIRouter, Depends, HTTPException, Query
from nats.js import JetStreamContext
from pydantic import BaseModel

from submitd.v1 import queue_pb2
from submitd_common import jetstream
from submitd_common.adminauth import authorizer

from . import dsn
from .queue import MAX_SCAN, QueuedBody, scan_queue
from .reports import Reports
from .settings import Settings
from .state import DeliveryState, StateStore

log = logging.getLogger("submitd.relay.admin")
# The token may come in this header instead of Authorization: through the Kubernetes API
# server's proxy (submitctl), Authorization carries the operator's own credentials and the API
# server removes it before forwarding.


class Summary(BaseModel):
    id: str
    seq: int
    sender: str
    recipients: list[str]
    state: str  # queued | deferred
    age_seconds: float
    size: int
    attempts: int
    last_reply: str | None = None


class AttemptOut(BaseModel):
    at: float
    attempt: int
    next_hop: str
    result: str
    replies: dict[str, str]


class Detail(Summary):
    delivered: list[str]
    finished: list[str]
    notify: dict[str, str]
    dsn_ret: str
    dsn_envid: str
    authenticated_user: str
    client_address: str
    smtputf8: bool
    headers: list[tuple[str, str]]
    attempt_log: list[AttemptOut]
    reports: list[str]


class Listing(BaseModel):
    messages: list[Summary]
    scanned: int
    truncated: bool


class Totals(BaseModel):
    messages: int
    bytes: int
    oldest_age_seconds: float
    pending_delivery: int  # not yet handed to a relay (includes retries whose delay passed)
    in_delivery: int  # handed out and not acknowledged (in delivery or waiting for a retry)
    deferred: int
    queued: int


class Action(BaseModel):
    id: str
    action: str
    entries: int
    report_queue_id: str | None = None


def _state_name(state: DeliveryState) -> str:
    if state.attempts and state.attempts[-1].result in ("deferred", "partial", "expired"):
        return "deferred"
    return "queued"


def _summary(seq: int, qmsg: queue_pb2.QueuedMessage, state: DeliveryState) -> Summary:
    env = qmsg.envelope
    last = state.attempts[-1] if state.attempts else None
    return Summary(
        id=env.queue_id,
        seq=seq,
        sender=env.return_path,
        recipients=[r.address for r in env.recipients if r.address not in state.finished],
        state=_state_name(state),
        age_seconds=round(max(0.0, time.time() - qmsg.received_at_ms / 1000), 3),
        size=qmsg.size,
        attempts=len(state.attempts),
        last_reply=next(iter(last.replies.values()), None) if last and last.replies else None,
    )


class QueueOwner(Protocol):
    """What the admin API needs of the relay (consumer.Relay is one): the admin never imports
    the consumer."""

    js: JetStreamContext
    s: Settings
    state: StateStore
    reports: Reports

    async def delete_body(self, qmsg: queue_pb2.QueuedMessage) -> None: ...

    def event(self, event: str, env, fields: dict) -> None: ...


class QueueAdmin:
    def __init__(self, relay: QueueOwner) -> None:
        self.relay = relay
        self.js = relay.js

    def entries(self, limit: int = MAX_SCAN):
        return scan_queue(self.js, limit)

    async def find(self, queue_id: str):
        found = [(raw, q) async for raw, q in self.entries() if q.envelope.queue_id == queue_id]
        if not found:
            raise HTTPException(404, f"no queued message {queue_id}")
        return found

    async def listing(self, sender, recipient, state, min_age, limit) -> Listing:
        out: list[Summary] = []
        scanned, truncated = 0, False
        async for raw, q in self.entries():
            scanned += 1
            s = _summary(raw.seq, q, await self.relay.state.get(q.envelope.queue_id))
            if sender is not None and sender.lower() not in s.sender.lower():
                continue
            if recipient is not None and not any(recipient.lower() in r.lower() for r in s.recipients):
                continue
            if state is not None and s.state != state:
                continue
            if min_age is not None and s.age_seconds < min_age:
                continue
            if len(out) >= limit:
                truncated = True
                break
            out.append(s)
        return Listing(messages=out, scanned=scanned, truncated=truncated or scanned >= MAX_SCAN)

    async def detail(self, queue_id: str) -> Detail:
        raw, q = (await self.find(queue_id))[0]
        state = await self.relay.state.get(queue_id)
        s = _summary(raw.seq, q, state)
        head = dsn.header_section(await jetstream.message_head(self.js, q))
        parsed = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(head)
        env = q.envelope
        return Detail(
            **s.model_dump(),
            delivered=state.delivered,
            finished=state.finished,
            notify={r.address: r.notify for r in env.recipients if r.notify},
            dsn_ret=env.dsn_ret,
            dsn_envid=env.dsn_envid,
            authenticated_user=env.authenticated_user,
            client_address=env.client_address,
            smtputf8=env.smtputf8,
            headers=[(k, str(v)) for k, v in parsed.items()],
            attempt_log=[AttemptOut(**a.__dict__) for a in state.attempts],
            reports=state.reports,
        )

    async def retry(self, queue_id: str) -> Action:
        found = await self.find(queue_id)
        for raw, q in found:
            # A copy without the retry delay, then the delayed entry goes away.
            headers = {k: v for k, v in (raw.headers or {}).items() if k != "Nats-Msg-Id"}
            await self.js.publish(
                jetstream.SUBMIT_SUBJECT, raw.data, headers={**headers, "Nats-Msg-Id": f"{queue_id}.retry.{raw.seq}", jetstream.RECORD_HEADER: "1"},
            )
            await self.js.delete_msg(jetstream.STREAM, raw.seq)
        log.info("retry requested", extra={"fields": {"queue_id": queue_id}})
        return Action(id=queue_id, action="retry", entries=len(found))

    async def remove(self, queue_id: str, *, bounce: bool) -> Action:
        found = await self.find(queue_id)
        state = await self.relay.state.get(queue_id)
        report_id = None
        if bounce:
            raw, q = found[0]
            pending = [r for r in q.envelope.recipients if r.address not in state.finished]
            statuses = [dsn.RecipientStatus(r, "failed", "550 5.0.0 Message bounced by the mail administrator")
                        for r in pending if dsn.wants(r, "FAILURE")]
            if statuses and q.envelope.return_path:

                report_id = await self.relay.reports.queue(q, QueuedBody(self.js, q), "failed", statuses)
                state.reports.append(report_id)
        for _, q in found:
            state.finish(r.address for r in q.envelope.recipients)
        state.record(0, "", "bounced-by-admin" if bounce else "deleted-by-admin", [], {})
        await self.relay.state.put(queue_id, state)
        for raw, q in found:
            await self.js.delete_msg(jetstream.STREAM, raw.seq)
            await self.relay.delete_body(q)
        self.relay.event("bounced" if bounce else "deleted", found[0][1].envelope, {"by": "admin"})
        log.warning("removed by admin", extra={"fields": {"queue_id": queue_id, "bounce": bounce}})
        return Action(id=queue_id, action="bounce" if bounce else "delete", entries=len(found), report_queue_id=report_id)

    async def totals(self) -> Totals:
        info = await self.js.stream_info(jetstream.STREAM)
        consumer = await self.js.consumer_info(jetstream.STREAM, jetstream.RELAY_DURABLE)
        deferred = queued = 0
        oldest = 0.0
        async for _, q in self.entries():
            oldest = max(oldest, time.time() - q.received_at_ms / 1000)
            if _state_name(await self.relay.state.get(q.envelope.queue_id)) == "deferred":
                deferred += 1
            else:
                queued += 1
        return Totals(
            messages=info.state.messages, bytes=info.state.bytes, oldest_age_seconds=round(oldest, 3),
            pending_delivery=consumer.num_pending, in_delivery=consumer.num_ack_pending,
            deferred=deferred, queued=queued,
        )


def router(relay: QueueOwner) -> APIRouter:
    authorize = authorizer(relay.s, "queue")
    admin = QueueAdmin(relay)
    api = APIRouter(prefix="/api/v1/queue", dependencies=[Depends(authorize)], tags=["queue"])

    @api.get("/messages", response_model=Listing, summary="List and search queued messages")
    async def list_messages(
        sender: str | None = Query(None, description="substring of the return path"),
        recipient: str | None = Query(None, description="substring of a recipient still to deliver"),
        state: str | None = Query(None, pattern="^(queued|deferred)$"),
        min_age: float | None = Query(None, description="seconds since acceptance, at least"),
        limit: int = Query(100, ge=1, le=10_000),
    ) -> Listing:
        return await admin.listing(sender, recipient, state, min_age, limit)

    @api.get("/messages/{queue_id}", response_model=Detail, summary="One message: envelope, headers, attempts")
    async def show(queue_id: str) -> Detail:
        return await admin.detail(queue_id)

    @api.post("/messages/{queue_id}/retry", response_model=Action, summary="Deliver now, without waiting")
    async def retry(queue_id: str) -> Action:
        return await admin.retry(queue_id)

    @api.delete("/messages/{queue_id}", response_model=Action, summary="Delete without a report")
    async def delete(queue_id: str) -> Action:
        return await admin.remove(queue_id, bounce=False)

    @api.post("/messages/{queue_id}/bounce", response_model=Action, summary="Give up and bounce to the sender")
    async def bounce(queue_id: str) -> Action:
        return await admin.remove(queue_id, bounce=True)

    @api.get("/totals", response_model=Totals, summary="Queue totals")
    async def totals() -> Totals:
        return await admin.totals()

    return api
