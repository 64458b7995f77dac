"""Queue entries that the relay's consumer would never hand out again (JetStream's stream and
consumer disagreeing after a restart), and publishes the frontend gave up on: found, settled,
counted. The divergence is made on purpose here, so these tests cannot depend on luck; `make
fault-queue` (scripts/queue_faults.py) makes it the way it happens, by killing nats-server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import struct
import threading
import time

import grpc
import nats
import pytest
from relay_helpers import body, envelope, queue_async, queue_depth, relay_only

from submitd.v1 import common_pb2, rewriter_pb2, rewriter_pb2_grpc
from submitd_common import jetstream
from submitd_common.ids import new_queue_id
from submitd_devkit.testing.metrics import sample
from submitd_devkit.testing.users import ALICE
from submitd_devkit.testing.smtp import logged_in
from submitd_devkit.testing.waiting import eventually
from submitd_frontend.backends import CHUNK, Rewriter, StreamedMessage
from submitd_rewriter.queue import QueueWriter

pytestmark = pytest.mark.timeout(90)


def relay_metric(stack, name: str, **labels: str) -> float:
    return sample(stack.ports.relay_http, name, **labels)


def strand(stack, items) -> None:
    """Queue ``items`` (envelope, data, delivery record or None) behind the relay consumer's ack
    floor, as a restarted server may leave them: with the relay stopped, the consumer is pointed
    elsewhere, passes them, and takes one other entry; the relay points it back when it starts."""
    elsewhere = f"{jetstream.SUBJECT_PREFIX}.elsewhere"

    async def go() -> None:
        nc = await nats.connect(stack.nats.url)
        try:
            js = nc.jetstream()
            cfg = (await js.consumer_info(jetstream.STREAM, jetstream.RELAY_DURABLE)).config
            cfg.filter_subject = elsewhere
            await js.add_consumer(jetstream.STREAM, config=cfg)
            await queue_async(stack.nats.url, [(env, data) for env, data, _ in items])
            kv = await js.key_value(jetstream.DELIVERY_BUCKET)
            for env, _, record in items:
                if record is not None:
                    await kv.put(env.queue_id, json.dumps(record).encode())
            await js.publish(elsewhere, b"")
            sub = await js.pull_subscribe_bind(durable=jetstream.RELAY_DURABLE, stream=jetstream.STREAM)
            [passed] = await sub.fetch(1, timeout=5)
            await passed.ack_sync()
            await sub.unsubscribe()
        finally:
            await nc.close()

    asyncio.run(go())


def test_stranded_entries_are_delivered_once_or_removed_by_their_record(make_stack, sink):
    stack = relay_only(make_stack, STRANDED_CHECK_INTERVAL=1)
    stack.stop_service("relay")
    waiting = envelope()
    done = envelope()
    record = {"attempts": [], "finished": ["bob@example.net"], "delivered": ["bob@example.net"],
              "delay_notified": [], "reports": []}
    strand(stack, [(waiting, body("stranded"), None), (done, body("already delivered"), record)])
    assert queue_depth(stack) == 2
    stack.start(services=("relay",))
    [got] = sink.handler.wait_for(1, 20)
    assert b"Subject: stranded" in got.data
    # Both settled: once the queue is empty no delivery can still be under way (an entry
    # leaves the stream only with its ack, after the next hop's 250).
    eventually(lambda: queue_depth(stack) == 0, 20)
    eventually(lambda: relay_metric(stack, "submitd_queue_stranded_total", outcome="requeued") == 1, 10)
    assert relay_metric(stack, "submitd_queue_stranded_total", outcome="delivered") == 1
    assert len(sink.handler.messages) == 1
    log = stack.log_path("relay").read_text()
    assert waiting.queue_id in log and done.queue_id in log


def test_no_entry_in_flight_is_taken_for_stranded(make_stack, sink):
    """A busy queue (entries pending and in flight, acks all the time) is never 'stranded'."""
    stack = relay_only(make_stack, STRANDED_CHECK_INTERVAL=0.2)
    sink.handler.data_delay = 0.05
    asyncio.run(queue_async(stack.nats.url, [(envelope(), body(f"busy {i}")) for i in range(300)]))
    sink.handler.wait_for(300, 60)
    eventually(lambda: queue_depth(stack) == 0, 20)  # every delivery acked: none under way
    assert len(sink.handler.messages) == 300, "each message once"
    assert relay_metric(stack, "submitd_queue_stranded_total", outcome="requeued") == 0


def end_of_data_while_nats_stalls(stack, client, message: bytes, while_stalled=None):
    """MAIL, RCPT and DATA, then the message's end while nats-server is stopped (SIGSTOP), and
    ``while_stalled()`` (by default the reply) before NATS goes on; what it returned."""
    client.mail(ALICE)
    client.rcpt("bob@example.net")
    client.send(b"DATA\r\n")
    assert client.getreply()[0] == 354
    os.kill(stack.nats.proc.pid, signal.SIGSTOP)
    try:
        client.send(message + b".\r\n")
        return while_stalled() if while_stalled is not None else client.getreply()
    finally:
        os.kill(stack.nats.proc.pid, signal.SIGCONT)


def rewriter_metric(stack, name: str, **labels: str) -> float:
    return sample(stack.ports.rewriter_http, name, **labels)


def withdrawals(stack, outcome: str) -> float:
    return rewriter_metric(stack, "submitd_rewriter_withdrawals_total", outcome=outcome)


def rewriter_settled(stack, withdraws: int) -> bool:
    """The frontend's ``withdraws`` have reached the rewriter, no queue entry waits for JetStream,
    and every withdrawal they asked for is done."""
    done = sum(withdrawals(stack, outcome) for outcome in ("stored", "not_stored", "abandoned"))
    return (rewriter_metric(stack, "submitd_rewriter_withdraws_received_total") == withdraws
            and rewriter_metric(stack, "submitd_rewriter_publishes_waiting") == 0
            and withdrawals(stack, "requested") == done)


def only_the_retry_is_delivered(stack, sink) -> None:
    stack.start(services=("relay",))
    sink.handler.wait_for(1, 20)
    # Nothing left in the queue or in flight (an entry leaves the stream only when it was
    # delivered and acked, or withdrawn): what the next hop has now is all it gets.
    eventually(lambda: queue_depth(stack) == 0, 30)
    assert len(sink.handler.messages) == 1, "the copy the client was told 451 for never left"


def nothing_is_delivered(stack, sink) -> None:
    """The relay, started now, removes the one entry that was withdrawn: the next hop gets nothing."""
    stack.start(services=("relay",))
    eventually(lambda: relay_metric(stack, "submitd_queue_withdrawals_total", outcome="removed") == 1, 20)
    eventually(lambda: queue_depth(stack) == 0, 20)
    assert sink.handler.messages == [], "queued while its client was told 451 (or went), and sent"


MESSAGE = b"From: alice@example.test\r\nTo: bob@example.net\r\nSubject: twice?\r\n\r\nbody\r\n"


def test_a_publish_answered_451_is_withdrawn_not_delivered(make_stack, sink):
    """NATS stalls (SIGSTOP) while it stores a message: the rewriter gives up at its publish
    timeout and the client is told 451; when NATS goes on, the stored entry is withdrawn before
    the relay may send it, and the client's second try is the one copy delivered."""
    stack = make_stack(env={"rewriter": {"PUBLISH_TIMEOUT": "2"}, "relay": {"STRANDED_CHECK_INTERVAL": "1"}})
    stack.stop_service("relay")  # so that only the withdrawal decides
    with logged_in(stack) as client:
        code, text = end_of_data_while_nats_stalls(stack, client, MESSAGE)
        assert code == 451, text
        eventually(lambda: withdrawals(stack, "stored") == 1, 20)
        client.sendmail(ALICE, ["bob@example.net"], MESSAGE)  # the client tries again
    only_the_retry_is_delivered(stack, sink)
    assert relay_metric(stack, "submitd_queue_withdrawals_total", outcome="removed") == 1


def test_a_message_whose_client_went_is_withdrawn_by_the_rewriter(make_stack, sink):
    """The client goes while the rewriter waits for NATS (stalled) to store its message: the
    frontend withdraws its item, the rewriter the entry NATS stored. The client heard no 250,
    so it sends the message again, and only that copy is delivered."""
    stack = make_stack(env={"relay": {"STRANDED_CHECK_INTERVAL": "1"}, "rewriter": {"PUBLISH_TIMEOUT": "60"}})
    stack.stop_service("relay")

    def leave_while_it_is_published():
        eventually(lambda: rewriter_metric(stack, "submitd_rewriter_publishes_waiting") == 1, 10)
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # (a reset: gone at once)
        # Withdrawn at once, not at the rewriter's publish timeout (60 s).
        eventually(lambda: withdrawals(stack, "requested") == 1, 10)

    with logged_in(stack) as client:
        end_of_data_while_nats_stalls(stack, client, MESSAGE, leave_while_it_is_published)
    eventually(lambda: withdrawals(stack, "stored") == 1, 20)
    with logged_in(stack) as client:
        client.sendmail(ALICE, ["bob@example.net"], MESSAGE)  # the client tries again
    only_the_retry_is_delivered(stack, sink)
    assert relay_metric(stack, "submitd_queue_withdrawals_total", outcome="removed") == 1


def test_a_message_the_frontend_gave_up_on_is_not_delivered(make_stack, sink):
    """The frontend stops waiting for the rewriter (its REWRITER_TIMEOUT, shorter than the
    rewriter's own publish timeout) while NATS stalls: the client is told 451 at once and sends
    the message again; the copy it was told 451 for is withdrawn (or, if the rewriter had not
    begun to publish it, never published), so only the second try is delivered."""
    stack = make_stack(env={"relay": {"STRANDED_CHECK_INTERVAL": "1"}, "rewriter": {"PUBLISH_TIMEOUT": "60"},
                            "frontend": {"REWRITER_TIMEOUT": "2"}})
    stack.stop_service("relay")
    with logged_in(stack) as client:
        started = time.monotonic()
        code, text = end_of_data_while_nats_stalls(stack, client, MESSAGE)
        assert (code, text[:5]) == (451, b"4.3.0"), text
        assert time.monotonic() - started < 30, "at REWRITER_TIMEOUT, not at the publish timeout"
        eventually(lambda: rewriter_settled(stack, withdraws=1), 20)
        client.sendmail(ALICE, ["bob@example.net"], MESSAGE)  # the client tries again
    only_the_retry_is_delivered(stack, sink)


@pytest.mark.parametrize("method", ["SubmitMany", "Submit"])
def test_a_withdraw_that_crossed_its_queued_answer_still_withdraws_the_entry(make_stack, sink, method):
    """The frontend gives up on a message just as JetStream acknowledges it: its withdraw and the
    rewriter's "queued" cross. The client was told 451 and sends the message again, so the
    entry already queued is withdrawn all the same. Made here in that order, with the frontend's
    certificate: the withdraw is sent after the answer, on the item's own SubmitMany stream, or
    (for a Submit call, which has none) on a SubmitMany stream by its queue id."""
    stack = make_stack(env={"relay": {"STRANDED_CHECK_INTERVAL": "1"}})
    stack.stop_service("relay")
    envelope = common_pb2.Envelope(queue_id=new_queue_id(), return_path=ALICE, authenticated_user=ALICE,
                                   recipients=[common_pb2.Recipient(address="bob@example.net")])
    whole = rewriter_pb2.WholeMessage(envelope=envelope, message=MESSAGE)
    answered = threading.Event()

    def requests(first: list, withdraw_id: int):
        yield from first
        assert answered.wait(20)
        yield rewriter_pb2.WholeBatch(items=[rewriter_pb2.WholeItem(
            id=withdraw_id, withdraw=True, queue_id=envelope.queue_id)])

    with grpc.secure_channel(f"127.0.0.1:{stack.ports.rewriter}", stack.grpc_credentials("frontend")) as ch:
        stub = rewriter_pb2_grpc.RewriterStub(ch)
        if method == "Submit":
            answered.set()
            result = stub.Submit(iter([rewriter_pb2.RewriteRequest(envelope=envelope),
                                       rewriter_pb2.RewriteRequest(chunk=MESSAGE),
                                       rewriter_pb2.RewriteRequest(end=True)]), timeout=10)
            assert result.queued == envelope.queue_id
            assert list(stub.SubmitMany(requests([], 0), timeout=10)) == [], "no answer to a withdraw"
        else:
            replies = stub.SubmitMany(requests([rewriter_pb2.WholeBatch(
                items=[rewriter_pb2.WholeItem(id=1, message=whole)])], 1), timeout=30)
            [reply] = next(replies).replies
            assert reply.result.queued == envelope.queue_id
            answered.set()
            assert list(replies) == [], "no answer to a withdraw"
    eventually(lambda: withdrawals(stack, "stored") == 1, 20)
    nothing_is_delivered(stack, sink)


def test_a_large_message_given_up_on_after_its_end_is_withdrawn(make_stack, sink):
    """A message streamed to the rewriter in a Submit call of its own is given up on after it was
    said to be whole, while the rewriter's "queued" is on its way (made here by holding the
    answer back, with the frontend's own classes in this process and its certificate): the
    frontend withdraws it by its queue id on a SubmitMany stream, so the entry is not delivered."""
    stack = make_stack(env={"relay": {"STRANDED_CHECK_INTERVAL": "1"}})
    stack.stop_service("relay")
    env = common_pb2.Envelope(queue_id=new_queue_id(), return_path=ALICE, authenticated_user=ALICE,
                              recipients=[common_pb2.Recipient(address="bob@example.net")])
    large = MESSAGE + b"x" * 100 + b"\r\n" * 2000 + b"y" * 200_000 + b"\r\n"

    async def go() -> None:
        async with grpc.aio.secure_channel(f"127.0.0.1:{stack.ports.rewriter}", stack.grpc_credentials("frontend")) as ch:
            rewriter = Rewriter(rewriter_pb2_grpc.RewriterStub(ch), ch, streams=1, timeout=30, connect_timeout=5,
                                max_age=300)
            message = StreamedMessage(rewriter, env)
            await message.start(large[:CHUNK])
            await message.send(large[CHUNK:])
            answer, message.receiving = message.receiving, asyncio.get_running_loop().create_future()
            finishing = asyncio.create_task(message.finish())
            assert (await asyncio.wait_for(answer, 20)).queued == env.queue_id, "queued by the rewriter"
            finishing.cancel()  # the client goes, its answer still on the way
            with pytest.raises(asyncio.CancelledError):
                await finishing
            await rewriter.close()  # (sends what it has to)

    asyncio.run(go())
    eventually(lambda: withdrawals(stack, "stored") == 1, 20)
    nothing_is_delivered(stack, sink)


def test_a_publish_cancelled_as_it_is_acknowledged_is_withdrawn(make_stack, sink):
    """The rewriter's publish is cancelled (its client went, the frontend gave up) at the moment
    JetStream's acknowledgement arrives: Python 3.11's asyncio.wait_for, inside nats-py, then
    returns the acknowledgement and drops the cancel, so the entry is queued although nobody
    will be told 250. It is withdrawn all the same (a rewriter's QueueWriter, in this process,
    on the stack's NATS; the cancel made to come with the acknowledgement)."""
    stack = relay_only(make_stack, STRANDED_CHECK_INTERVAL=1)
    stack.stop_service("relay")
    env = envelope()

    async def go() -> None:
        nc = await nats.connect(stack.nats.url)
        try:
            writer = QueueWriter(nc, timeout=5)
            publish = writer.js.publish

            async def acknowledged_then_cancelled(*args, **kwargs):
                ack = await publish(*args, **kwargs)
                asyncio.current_task().cancel()  # (what wait_for swallows, as it returns the ack)
                return ack

            writer.js.publish = acknowledged_then_cancelled
            with pytest.raises(asyncio.CancelledError):
                await asyncio.create_task(writer.publish(env, body("cancelled")))
            assert env.queue_id in writer.withdrawals.pending
            await writer.withdrawals.flush()
            assert not writer.withdrawals.pending
        finally:
            await nc.close()

    asyncio.run(go())
    nothing_is_delivered(stack, sink)


def test_an_entry_this_relay_delivered_and_acked_is_not_sent_again(make_stack, sink):
    """A nats-server killed after the relay's ack can hand the entry out again, even as a first
    delivery (its record of the ack lost with it): the relay remembers what it acknowledged."""
    stack = relay_only(make_stack)
    env = envelope()
    asyncio.run(queue_async(stack.nats.url, [(env, body("once"))]))
    sink.handler.wait_for(1, 20)
    eventually(lambda: queue_depth(stack) == 0, 20)

    asyncio.run(again(stack.nats.url, env, body("once")))
    eventually(lambda: queue_depth(stack) == 0, 20)
    eventually(lambda: relay_metric(stack, "submitd_delivery_duplicates_avoided_total") == 1, 10)
    assert len(sink.handler.messages) == 1, "sent once"


def test_an_entry_handed_out_again_while_it_is_being_delivered_goes_once(make_stack, sink):
    """A restarted server that lost the delivery hands the entry out again while the first
    attempt still runs (a slow next hop): the second waits for the first and finds it done."""
    stack = relay_only(make_stack)
    sink.handler.data_delay = 3
    env = envelope()
    asyncio.run(queue_async(stack.nats.url, [(env, body("slow"))]))
    eventually(lambda: sink.handler.ehlos >= 1, 10)
    asyncio.run(again(stack.nats.url, env, body("slow")))
    sink.handler.wait_for(1, 20)
    eventually(lambda: queue_depth(stack) == 0, 30)
    # The second copy came back after the first was done, and was recognised.
    eventually(lambda: relay_metric(stack, "submitd_delivery_duplicates_avoided_total") == 1, 10)
    assert len(sink.handler.messages) == 1, "sent once"


async def again(url: str, env, data: bytes) -> None:
    """The same entry back in the queue, as a restarted server may have it."""
    from submitd.v1 import queue_pb2

    nc = await nats.connect(url)
    try:
        q = queue_pb2.QueuedMessage(envelope=env, inline_body=data, size=len(data))
        await nc.jetstream().publish(jetstream.SUBMIT_SUBJECT, q.SerializeToString(), headers={"Nats-Msg-Id": "again"})
    finally:
        await nc.close()
