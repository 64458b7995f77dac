"""The frontend's side of the policy seam: every SMTP session of this process multiplexed over a
few long-lived ``Sessions`` streams (see policy.proto).

Opening a gRPC stream per SMTP connection cost about 2 ms of frontend and 1 ms of policy CPU
before any mail moved; a stream message per command cost a write, a read and a wake-up on each
side. Here a session costs nothing until it asks for a decision; steps that need none (connect,
EHLO, STARTTLS, RSET) travel with the next one that does; and the requests of all sessions that
are ready together go out as one stream message (and their verdicts come back the same way).

A session is bound to one stream for its life (policy keeps its state there). When that stream
breaks, the session's state is gone: its next step answers 421 and the session ends, as a
broken per-session stream did before; new sessions get a new stream.
"""

from __future__ import annotations

import logging

import grpc

from submitd.v1 import policy_pb2, policy_pb2_grpc

from .backends import POLICY_DOWN, BackendUnavailable
from .mux import Multiplexer, Streams

log = logging.getLogger("submitd.frontend")


class PolicyStreams:
    """``streams`` multiplexed Sessions streams; sessions are spread over them in turn."""

    def __init__(
        self, stub: policy_pb2_grpc.PolicyStub, channel: grpc.aio.Channel, *, streams: int, timeout: float,
        connect_timeout: float, max_age: float,
    ) -> None:
        self.timeout = timeout
        self.stub = stub
        # What EHLO advertises after AUTH: policy's list (Capabilities), asked with every health
        # check; none until policy has answered (AUTH could not succeed before that anyway).
        self.auth_mechanisms: list[str] = []
        self.streams = Streams(
            "policy", channel, count=streams, connect_timeout=connect_timeout, max_age=max_age, open_call=stub.Sessions,
            batch=lambda requests: policy_pb2.SessionBatch(requests=requests),
            replies=lambda batch: ((r.id, r.verdicts) for r in batch.replies),
            error=lambda: BackendUnavailable(POLICY_DOWN),
        )

    async def refresh_capabilities(self) -> bool:
        """Asks policy what AUTH accepts; False when it did not answer (the last list stays)."""
        try:
            reply = await self.stub.Capabilities(policy_pb2.CapabilitiesRequest(), timeout=self.timeout)
        except grpc.aio.AioRpcError as e:
            log.debug("policy capabilities: %s", e.code())
            return False
        self.auth_mechanisms = list(reply.auth_mechanisms)
        return True

    def session(self, session_id: str) -> "PolicySession":
        return PolicySession(self, session_id)

    async def close(self) -> None:
        await self.streams.close()


class PolicySession:
    """One SMTP session's view of policy: ``note`` a step that needs no answer, ``ask`` for a
    verdict (the noted steps go first, in order, in the same request)."""

    def __init__(self, policy: PolicyStreams, session_id: str) -> None:
        self.policy = policy
        self.session_id = session_id
        self.notes: list[policy_pb2.SessionEvent] = []
        self._stream: Multiplexer | None = None
        self.broken = False

    def note(self, **event) -> None:
        """A step the policy hears of with the next question. The same step twice in a row
        (EHLO after EHLO, RSET after RSET) keeps only the later: a client that repeats one
        command and never asks anything holds one note, not one per command."""
        note = policy_pb2.SessionEvent(**event)
        if self.notes and self.notes[-1].WhichOneof("event") == note.WhichOneof("event"):
            self.notes[-1] = note
        else:
            self.notes.append(note)

    async def ask(self, trace_context: dict[str, str] | None = None, **event) -> policy_pb2.Verdict:
        if self.broken:
            raise BackendUnavailable(POLICY_DOWN)
        if self._stream is None:
            self._stream = await self.policy.streams.get()
            self._stream.bind()
        events = [*self.notes, policy_pb2.SessionEvent(**event)]
        self.notes = []
        request_id = next(self.policy.streams.ids)
        request = policy_pb2.SessionRequest(
            id=request_id, session_id=self.session_id, events=events, trace_context=trace_context or {},
        )
        try:
            verdicts = await self._stream.ask(request, request_id, self.policy.timeout)
        except BackendUnavailable:
            self.broken = True
            raise
        if len(verdicts) != len(events):
            self.broken = True
            raise BackendUnavailable(POLICY_DOWN)
        # A noted step may be refused too (a policy that turns a client away at connect).
        for verdict in verdicts[:-1]:
            if not verdict.accept:
                return verdict
        return verdicts[-1]

    def close(self) -> None:
        """The session is over: policy forgets it (nothing to wait for)."""
        if self._stream is not None and not self._stream.broken and not self.broken:
            self._stream.send(policy_pb2.SessionRequest(session_id=self.session_id, end=True), None)
        if self._stream is not None:
            self._stream.release()
