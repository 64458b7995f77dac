"""What happened to each queued message, kept in a NATS KV bucket under its queue id.

The record makes delivery idempotent: a message redelivered after a crash (or published twice)
skips the recipients that are already done. It also holds the attempts and their replies for
the queue admin API, and whether a delay notice went out. Any relay replica reads the same
record, so none of this depends on which replica handled the message before."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError

from submitd_common import jetstream

MAX_ATTEMPTS_KEPT = 50


@dataclass
class Attempt:
    at: float
    attempt: int
    next_hop: str
    result: str  # delivered | deferred | failed | partial | expired
    replies: dict[str, str] = field(default_factory=dict)


@dataclass
class DeliveryState:
    delivered: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)  # delivered, bounced or given up
    attempts: list[Attempt] = field(default_factory=list)
    delay_notified: bool = False
    reports: list[str] = field(default_factory=list)  # queue ids of the DSNs sent
    revision: int = 0  # of the KV entry this was read from (0: none); not stored

    def record(self, attempt: int, next_hop: str, result: str, delivered: list[str], replies: dict[str, str]) -> None:
        for r in delivered:
            if r not in self.delivered:
                self.delivered.append(r)
        self.finish(delivered)
        self.attempts.append(Attempt(time.time(), attempt, next_hop, result, dict(replies)))
        del self.attempts[:-MAX_ATTEMPTS_KEPT]

    def finish(self, recipients) -> None:
        for r in recipients:
            if r not in self.finished:
                self.finished.append(r)

    def to_bytes(self) -> bytes:
        raw = asdict(self)
        del raw["revision"]
        return json.dumps(raw, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes, revision: int = 0) -> "DeliveryState":
        raw = json.loads(data)
        raw.pop("revision", None)
        raw["attempts"] = [Attempt(**a) for a in raw.get("attempts", [])]
        return cls(**raw, revision=revision)


class StateStore:
    """The records. A record kept for the bucket's whole max age (the message's lifetime and two
    days) costs nats-server memory all that while (its per-subject index: ~200 bytes a key,
    without end at a steady rate), so a finished message's last write carries a time to live of
    its own, ``finished_ttl``: long enough for everything that may still read it (a redelivery
    after a lost ack, a stranded entry, the 30-minute duplicate window, the admin API's recent
    history), short enough that the index stays the size of a few hours' mail."""

    def __init__(self, js: JetStreamContext, spec: jetstream.KvSpec, finished_ttl: float | None = None) -> None:
        self.js = js
        self.spec = spec
        self.finished_ttl = finished_ttl
        self.kv = None

    async def open(self) -> None:
        self.kv = await jetstream.open_kv(self.js, self.spec)  # as provisioning made it

    async def get(self, queue_id: str) -> DeliveryState:
        try:
            entry = await self.kv.get(queue_id)
        except KeyNotFoundError:
            return DeliveryState()
        return DeliveryState.from_bytes(entry.value, entry.revision) if entry.value else DeliveryState()

    async def put(self, queue_id: str, state: DeliveryState, *, final: bool = False) -> None:
        """Write the record only if nobody else wrote it since it was read (compare and set):
        two workers on one queue id (an admin retry, a second publish) cannot undo each
        other's finished recipients. A conflict raises; the caller retries from a fresh read.
        ``final``: every recipient is finished, and the record goes after ``finished_ttl``."""
        ttl = self.finished_ttl if final else None
        if state.revision:
            # (KeyValue.update takes no TTL; its own implementation does, with the same
            # compare-and-set and the same KeyWrongLastSequenceError on a conflict.)
            state.revision = await self.kv._update(queue_id, state.to_bytes(), last=state.revision, msg_ttl=ttl)
        else:
            state.revision = await self.kv.create(queue_id, state.to_bytes(), msg_ttl=ttl)
