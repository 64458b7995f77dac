"""One message from the client's first octet of content to its final reply: the rewriter (which
queues it), never the socket.

Messages of up to one chunk (64 KiB, most mail) are kept and sent whole at the end: a batched
SubmitMany item and an inline queue entry cost a fraction of a stream. A larger message is
streamed as it arrives (:class:`~.backends.StreamedMessage`) into a Submit call: the rewriter
writes its output into the Object Store, and queues it once its last chunk is stored. Either way
at most one chunk of it is held here, and 250 comes only after the rewriter said JetStream
acknowledged the queue entry.
"""

from __future__ import annotations

import asyncio
import logging

from opentelemetry import trace

from submitd.v1 import common_pb2
from submitd_common.replies import render

from . import metrics, replies
from .backends import CHUNK, REWRITER_DOWN, BackendUnavailable, StreamedMessage

log = logging.getLogger("submitd.frontend")
_CLEANUPS: set[asyncio.Future] = set()  # abandoned streams still being removed (kept from the GC)


class SessionBackends:
    """What a dialog asks of the backends (:class:`~.state.Backends`): its policy session's
    verdicts, and a :class:`Submission` for each message."""

    def __init__(self, backends, policy) -> None:
        self.backends = backends
        self.policy = policy

    @property
    def queue_available(self) -> bool:
        return self.backends.rewriter.queue_available

    @property
    def auth_mechanisms(self) -> list[str]:
        return self.backends.policy.auth_mechanisms

    async def ask(self, **event):
        with metrics.BACKEND_LATENCY.labels("policy").time():
            return await self.policy.ask(**event)

    def note(self, **event) -> None:
        self.policy.note(**event)

    def submission(self, envelope: common_pb2.Envelope) -> "Submission":
        return Submission(self.backends, envelope)


class Submission:
    def __init__(self, backends, envelope: common_pb2.Envelope) -> None:
        self.backends = backends
        self.envelope = envelope
        self.buffer = bytearray()
        self.stream: StreamedMessage | None = None
        self.failure: str | None = None  # a backend failed on the way: the reply, once read
        self.size = 0

    async def feed(self, content: bytes) -> None:
        """More content (unstuffed, checked). Waits while the backends catch up."""
        if self.failure or not content:
            return
        self.size += len(content)
        try:
            if self.stream is not None:
                await self.stream.send(content)
                return
            self.buffer += content
            if len(self.buffer) > CHUNK:
                self.stream = StreamedMessage(self.backends.rewriter, self.envelope)
                first, self.buffer = bytes(self.buffer), bytearray()
                await self.stream.start(first)
        except BackendUnavailable as e:
            # The message is still read to its end; then the client is told to come back.
            self.failure = _temporary(e.reply)
            await self.abandon()

    async def abandon(self) -> None:
        """Refused partway (or the client went away): nothing of it is kept or queued."""
        self.buffer = bytearray()
        if self.stream is not None:
            stream, self.stream = self.stream, None
            # The session's task is cancelled when its connection is lost, which a session cut
            # mid-message (421) brings about while this runs: the stored chunks' removal goes
            # on regardless, or they would wait for the orphan sweep.
            cleanup = asyncio.ensure_future(stream.abort())
            _CLEANUPS.add(cleanup)
            cleanup.add_done_callback(_CLEANUPS.discard)
            await asyncio.shield(cleanup)

    async def finish(self) -> str:
        """The reply to the end of data: 250 with the queue id once queued, or why not."""
        span = trace.get_current_span()
        span.set_attribute("smtp.message.size", self.size)
        if self.failure:
            span.set_attribute("smtp.reply.code", int(self.failure[:3]))
            return self.failure
        try:
            with metrics.BACKEND_LATENCY.labels("rewriter").time():  # (from the end of data)
                if self.stream is None:
                    result = await self.backends.rewriter.submit(self.envelope, bytes(self.buffer))
                    self.buffer = bytearray()
                else:
                    stream, self.stream = self.stream, None
                    result = await stream.finish()
        except BackendUnavailable as e:
            span.set_attribute("smtp.reply.code", e.reply.code)
            return _temporary(e.reply)
        kind = result.WhichOneof("result")
        if kind != "queued":
            answer = result.reply if kind == "reply" else REWRITER_DOWN
            span.set_attribute("smtp.reply.code", answer.code)
            return _temporary(answer)
        span.set_attribute("smtp.reply.code", 250)
        return replies.queued(self.envelope.queue_id)


def _temporary(reply: common_pb2.Reply) -> str:
    # A failed backend ends the transaction, never the session.
    return render(reply) if reply.code != 421 else replies.TEMPORARY
