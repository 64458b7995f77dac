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

import asyncio
import itertools
import logging

import grpc

from submitd.v1 import policy_pb2, policy_pb2_grpc

from .backends import POLICY_DOWN, BackendUnavailable, ready

log = logging.getLogger("submitd.frontend")


class _Stream:
    def __init__(self, call) -> None:
        self.call = call
        self.pending: dict[int, asyncio.Future] = {}
        self.outbox: list[policy_pb2.SessionRequest] = []
        self.broken = False
        self._wake = asyncio.Event()
        self._writer = asyncio.create_task(self._write_loop(), name="policy stream writer")
        self._reader = asyncio.create_task(self._read_loop(), name="policy stream reader")

    def send(self, request: policy_pb2.SessionRequest, reply: bool = True) -> asyncio.Future | None:
        if self.broken:
            raise BackendUnavailable(POLICY_DOWN)
        future = None
        if reply:
            future = asyncio.get_running_loop().create_future()
            self.pending[request.id] = future
        self.outbox.append(request)
        self._wake.set()
        return future

    async def _write_loop(self) -> None:
        # While one write is under way, more requests gather in the outbox: under load they
        # leave together.
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                batch, self.outbox = self.outbox, []
                await self.call.write(policy_pb2.SessionBatch(requests=batch))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.fail(e)

    async def _read_loop(self) -> None:
        error: BaseException | None = None
        try:
            while True:
                batch = await self.call.read()
                if batch is grpc.aio.EOF:
                    break
                for answer in batch.replies:
                    future = self.pending.pop(answer.id, None)
                    if future is not None and not future.done():
                        future.set_result(answer.verdicts)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            error = e
        self.fail(error)

    def fail(self, error: BaseException | None) -> None:
        if self.broken:
            return
        self.broken = True
        log.warning("policy stream broken: %r", error or "ended")
        for future in self.pending.values():
            if not future.done():
                future.set_exception(BackendUnavailable(POLICY_DOWN))
        self.pending.clear()
        self._writer.cancel()
        self.call.cancel()

    async def close(self) -> None:
        if not self.broken:
            self.broken = True
            self.call.cancel()
        for task in (self._writer, self._reader):
            task.cancel()
        await asyncio.gather(self._writer, self._reader, return_exceptions=True)


class PolicyStreams:
    """``streams`` streams, each opened on first use (and again after it broke); sessions are
    spread over them in turn, and so (round robin per call) over the policy replicas."""

    def __init__(
        self, stub: policy_pb2_grpc.PolicyStub, channel: grpc.aio.Channel, *, streams: int, timeout: float,
        connect_timeout: float,
    ) -> None:
        self.stub = stub
        self.channel = channel
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._streams: list[_Stream | None] = [None] * max(1, streams)
        self._turn = itertools.cycle(range(len(self._streams)))
        self.ids = itertools.count(1)

    def session(self, session_id: str) -> "PolicySession":
        return PolicySession(self, session_id)

    async def stream(self) -> _Stream:
        slot = next(self._turn)
        current = self._streams[slot]
        if current is None or current.broken:
            # A policy that is restarting gets a moment to come back before this is a 4xx.
            await ready(self.channel, self.connect_timeout, POLICY_DOWN)
            current = self._streams[slot]
            if current is None or current.broken:
                current = self._streams[slot] = _Stream(self.stub.Sessions())
        return current

    async def close(self) -> None:
        await asyncio.gather(*(s.close() for s in self._streams if s is not None), return_exceptions=True)


class PolicySession:
    """One SMTP session's view of policy: ``note`` a step that needs no answer, ``ask`` for a
    verdict (the noted steps go first, in order, in the same request)."""

    def __init__(self, streams: PolicyStreams, session_id: str) -> None:
        self.streams = streams
        self.session_id = session_id
        self.notes: list[policy_pb2.SessionEvent] = []
        self._stream: _Stream | None = None
        self.broken = False

    def note(self, **event) -> None:
        self.notes.append(policy_pb2.SessionEvent(**event))

    async def ask(self, trace_context: dict[str, str] | None = None, **event) -> policy_pb2.Verdict:
        if self.broken:
            raise BackendUnavailable(POLICY_DOWN)
        if self._stream is None:
            self._stream = await self.streams.stream()
        events = [*self.notes, policy_pb2.SessionEvent(**event)]
        self.notes = []
        request = policy_pb2.SessionRequest(
            id=next(self.streams.ids), session_id=self.session_id, events=events, trace_context=trace_context or {},
        )
        try:
            future = self._stream.send(request)
        except BackendUnavailable:
            self.broken = True
            raise
        assert future is not None
        timer = asyncio.get_running_loop().call_later(self.streams.timeout, _expire, future)
        try:
            verdicts = await future
        except BackendUnavailable:
            self.broken = True
            raise
        finally:
            timer.cancel()
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
            self._stream.send(
                policy_pb2.SessionRequest(id=next(self.streams.ids), session_id=self.session_id, end=True), reply=False
            )


def _expire(future: asyncio.Future) -> None:
    if not future.done():
        log.warning("policy did not answer in time")
        future.set_exception(BackendUnavailable(POLICY_DOWN))
