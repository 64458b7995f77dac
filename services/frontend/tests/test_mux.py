"""How requests leave on a stream: batched, and never one stream message over the size gRPC allows."""

from __future__ import annotations

import asyncio

from submitd.v1 import policy_pb2
from submitd_devkit.testing.waiting import eventually_async
from submitd_frontend.mux import BATCH_BYTES, Multiplexer, take_batch


def auth(i: int, size: int = 12_000) -> policy_pb2.SessionRequest:
    start = policy_pb2.AuthStart(mechanism="OAUTHBEARER", has_initial_response=True, initial_response=b"x" * size)
    return policy_pb2.SessionRequest(id=i, session_id=f"s{i}", events=[policy_pb2.SessionEvent(auth_start=start)])


def test_a_batch_holds_at_most_batch_bytes_but_always_one_request():
    outbox = [auth(i) for i in range(1000)]
    sizes = []
    while outbox:
        batch, outbox = take_batch(outbox)
        sizes.append(sum(r.ByteSize() for r in batch))
    assert max(sizes) <= BATCH_BYTES and len(sizes) > 10
    big = [auth(0, size=2 * BATCH_BYTES), auth(1)]
    assert take_batch(big) == ([big[0]], [big[1]]), "a request larger than the cap still goes, alone"


class Written:
    """The stream's sending side as the Multiplexer sees it: what was written, in order."""

    def __init__(self) -> None:
        self.messages: list[policy_pb2.SessionBatch] = []
        self.replies: asyncio.Queue = asyncio.Queue()
        self.half_closed = False

    async def write(self, message) -> None:
        self.messages.append(message)
        await asyncio.sleep(0)

    async def read(self):
        return await self.replies.get()

    async def done_writing(self) -> None:
        self.half_closed = True

    def cancel(self) -> None:
        pass


async def test_a_thousand_12_kb_auth_lines_at_once_leave_in_messages_grpc_accepts_and_in_order():
    call = Written()
    mux = Multiplexer("policy", call, lambda items: policy_pb2.SessionBatch(requests=items),
                      lambda batch: [], lambda: ConnectionError("policy"))
    for i in range(1000):  # all in one turn of the loop: nothing is written meanwhile
        mux.send(auth(i), None)
    for _ in range(200):
        if not mux.outbox and sum(len(m.requests) for m in call.messages) == 1000:
            break
        await asyncio.sleep(0)
    assert [r.id for m in call.messages for r in m.requests] == list(range(1000))
    assert max(m.ByteSize() for m in call.messages) < 8 << 20, "each under gRPC's message limit (8 MiB)"
    await call.replies.put(None)
    for task in (mux._writer, mux._reader):
        task.cancel()
    await asyncio.gather(mux._writer, mux._reader, return_exceptions=True)


async def test_a_request_given_up_on_leaves_nothing_pending_so_a_retired_stream_closes():
    """A caller that stops waiting (its client went) may never get a reply: the rewriter answers
    no withdrawn item. Its request no longer counts as pending, so a retired stream half-closes
    once its sessions are done, instead of staying open for good."""
    call = Written()
    mux = Multiplexer("rewriter", call, lambda items: policy_pb2.SessionBatch(requests=items),
                      lambda batch: [], lambda: ConnectionError("rewriter"))
    mux.bind()
    asking = asyncio.create_task(mux.ask(auth(1), 1, timeout=30))
    await eventually_async(lambda: 1 in mux.pending, 5)
    asking.cancel()
    await asyncio.gather(asking, return_exceptions=True)
    assert mux.pending == {}
    mux.retire()
    mux.release()
    await eventually_async(lambda: call.half_closed, 5)  # the retired stream was half-closed
    await call.replies.put(None)
    await mux.close()
