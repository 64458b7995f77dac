"""Calls carried over a long-lived bidirectional gRPC stream, batched both ways.

A gRPC call, even a unary one, costs more CPU on both sides than what policy or the rewriter do
for a small message. A ``Multiplexer`` keeps one stream open and sends every request it is given,
each with an id; the requests that are ready together leave as one stream message (while one
write is under way the next ones gather), and each reply, matched by its id, completes its
caller's future. When the stream breaks, every caller still waiting gets ``error``.

A stream is retired after ``max_age`` seconds: new work goes to a new stream (which round robin
may place on another replica, so replicas that were added since get their share), and the old
one is half-closed once nothing is waiting on it and no session is bound to it any more.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import grpc

log = logging.getLogger("submitd.frontend")


async def ready(channel: grpc.aio.Channel, timeout: float, error: Callable[[], Exception]) -> None:
    """Wait (briefly) for a channel that is reconnecting, e.g. to a peer that just restarted,
    instead of failing at once; a peer that stays away raises ``error()`` after ``timeout``."""
    if channel.get_state(try_to_connect=True) == grpc.ChannelConnectivity.READY:
        return
    try:
        await asyncio.wait_for(channel.channel_ready(), timeout)
    except asyncio.TimeoutError as e:
        raise error() from e


# What one stream message carries at most (then the next one goes on): well under gRPC's 8 MiB
# message limit (grpcutil), which a burst of AUTH lines of 12,288 octets from a thousand sessions,
# or of message blocks, would pass and break the stream for every session on it.
BATCH_BYTES = 1 << 20


def take_batch(outbox: list) -> tuple[list, list]:
    """The requests for one stream message (at least one, at most ``BATCH_BYTES`` of them but for
    a single larger one), and those left for the next."""
    size = 0
    for cut, request in enumerate(outbox):
        size += request.ByteSize()
        if cut and size > BATCH_BYTES:
            return outbox[:cut], outbox[cut:]
    return outbox, []


class Multiplexer:
    def __init__(
        self,
        name: str,
        call,
        batch: Callable[[list], Any],
        replies: Callable[[Any], Iterable[tuple[int, Any]]],
        error: Callable[[], Exception],
    ) -> None:
        self.name = name
        self.call = call
        self._batch = batch
        self._replies = replies
        self._error = error
        self.pending: dict[int, asyncio.Future] = {}
        self.outbox: list = []
        self.broken = False
        self.opened_at = time.monotonic()
        self.users = 0  # sessions bound to this stream (their state lives at the other end)
        self.retired = False
        self._closing = False
        self._wake = asyncio.Event()
        self._writer = asyncio.create_task(self._write_loop(), name=f"{name} stream writer")
        self._reader = asyncio.create_task(self._read_loop(), name=f"{name} stream reader")

    @property
    def writable(self) -> bool:
        """Takes requests: neither broken nor half-closing (a half-closed stream sends nothing more)."""
        return not self.broken and not self._closing

    def send(self, request, request_id: int | None) -> asyncio.Future | None:
        """Queue ``request``; with an id, the future of its reply."""
        if not self.writable:
            raise self._error()
        future = None
        if request_id is not None:
            future = asyncio.get_running_loop().create_future()
            self.pending[request_id] = future
        self.outbox.append(request)
        self._wake.set()
        return future

    async def ask(self, request, request_id: int, timeout: float):
        """Send and wait for the reply, at most ``timeout`` seconds (then ``error``)."""
        future = self.send(request, request_id)
        assert future is not None
        timer = asyncio.get_running_loop().call_later(timeout, self._expire, request_id)
        try:
            return await future
        finally:
            timer.cancel()
            # Given up (cancelled): no reply may ever come (the rewriter answers no withdrawn
            # item), and a retired stream closes only once nothing is pending.
            if self.pending.pop(request_id, None) is not None:
                self._close_if_done()

    def _expire(self, request_id: int) -> None:
        future = self.pending.pop(request_id, None)
        if future is not None and not future.done():
            log.warning("%s did not answer in time", self.name)
            future.set_exception(self._error())

    def bind(self) -> None:
        self.users += 1

    def release(self) -> None:
        self.users -= 1
        self._close_if_done()

    def retire(self) -> None:
        self.retired = True
        self._close_if_done()

    def _close_if_done(self) -> None:
        if self.retired and not self.users and not self.pending and not self._closing and not self.broken:
            self._closing = True  # the writer half-closes once the outbox is sent
            self._wake.set()

    async def _write_loop(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                batch, self.outbox = take_batch(self.outbox)
                if self.outbox:
                    self._wake.set()  # the rest in the next message
                if batch:
                    await self.call.write(self._batch(batch))
                if self._closing and not self.outbox:
                    await self.call.done_writing()
                    return
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.fail(e)

    async def _read_loop(self) -> None:
        error: BaseException | None = None
        try:
            while True:
                message = await self.call.read()
                if message is grpc.aio.EOF:
                    break
                for request_id, reply in self._replies(message):
                    future = self.pending.pop(request_id, None)
                    if future is not None and not future.done():
                        future.set_result(reply)
                self._close_if_done()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            error = e
        self.fail(error)

    def fail(self, error: BaseException | None) -> None:
        if self.broken:
            return
        self.broken = True
        if self._closing and error is None:
            log.debug("%s stream retired", self.name)
        else:
            log.warning("%s stream broken: %r", self.name, error or "ended")
        for future in self.pending.values():
            if not future.done():
                future.set_exception(self._error())
        self.pending.clear()
        self._writer.cancel()
        self.call.cancel()

    async def close(self, flush: float = 0.0) -> None:
        """Cancel the stream. With ``flush``, it is first half-closed once what is queued is
        written, and the other side's end of it awaited, for at most ``flush`` seconds: then
        what was sent has been read (the frontend's last withdraws, at shutdown)."""
        if flush and not self.broken:
            if not self._closing:
                self._closing = True
                self._wake.set()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._reader), flush)
        if not self.broken:
            self.broken = True
            self.call.cancel()
        for task in (self._writer, self._reader):
            task.cancel()
        await asyncio.gather(self._writer, self._reader, return_exceptions=True)


class Streams:
    """``count`` multiplexed streams on one channel, each opened (by ``open_call``) on first use
    and again after it broke, handed out in turn; round robin per call spreads them over the
    server's replicas. ``batch``, ``replies`` and ``error`` are the Multiplexer's."""

    def __init__(
        self, name: str, channel: grpc.aio.Channel, *, count: int, connect_timeout: float, max_age: float,
        open_call: Callable[[], Any], batch: Callable[[list], Any],
        replies: Callable[[Any], Iterable[tuple[int, Any]]], error: Callable[[], Exception],
    ) -> None:
        self.channel = channel
        self.max_age = max_age
        self.connect_timeout = connect_timeout
        self._error = error
        self._open = lambda: Multiplexer(name, open_call(), batch, replies, error)
        self._streams: list[Multiplexer | None] = [None] * max(1, count)
        self._turn = itertools.cycle(range(len(self._streams)))
        self.ids = itertools.count(1)
        self._closed = False

    async def get(self) -> Multiplexer:
        if self._closed:
            raise self._error()
        slot = next(self._turn)
        current = self._streams[slot]
        if current is not None and not current.broken and time.monotonic() - current.opened_at > self.max_age:
            current.retire()
            current = None
        if current is None or current.broken:
            await ready(self.channel, self.connect_timeout, self._error)
            current = self._streams[slot]
            if current is None or current.broken or current.retired:
                current = self._streams[slot] = self._open()
        return current

    async def close(self, flush: float = 0.0) -> None:
        self._closed = True
        await asyncio.gather(*(s.close(flush) for s in self._streams if s is not None), return_exceptions=True)
