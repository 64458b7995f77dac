"""Messages stream from the client through the rewriter into the queue's Object Store, and from
there to the next hop: a refusal found late, a client that goes away, a backend that fails
mid-message or a relay killed mid-delivery leave nothing behind, and a message is never
partly queued."""

from __future__ import annotations

import asyncio
import signal
import smtplib
import time

import nats
import pytest

from relay_helpers import body, envelope, queue, queue_depth, relay_only
from submitd_devkit.sink import STALL
from submitd_devkit.testing.users import ALICE
from submitd_devkit.testing.smtp import logged_in
from submitd_devkit.testing.waiting import eventually

pytestmark = pytest.mark.timeout(180)
HEADER = f"From: {ALICE}\r\nTo: bob@example.net\r\nSubject: streamed\r\n\r\n".encode()
LINE = b"0123456789abcdefghijklmnopqrstuvwxyz" * 2 + b"\r\n"


def lines(megabytes: float) -> bytes:
    return LINE * int(megabytes * 1_000_000 // len(LINE))


def stored_chunks(stack) -> int:
    """Messages in the Object Store's stream: chunks and object records, finished or not."""
    async def go() -> int:
        nc = await nats.connect(stack.nats.url)
        try:
            return (await nc.jetstream().stream_info("OBJ_SUBMITD_BODIES")).state.messages
        except nats.js.errors.NotFoundError:
            return 0
        finally:
            await nc.close()
    return asyncio.run(go())


def start_data(client: smtplib.SMTP) -> None:
    client.mail(ALICE)
    client.rcpt("bob@example.net")
    assert client.docmd("DATA")[0] == 354


def test_a_refusal_found_late_reads_to_the_end_and_keeps_nothing(stack):
    # The first megabytes already streamed through the rewriter into the Object Store when a
    # bare LF shows up: the message is read to its end, refused, and its chunks removed.
    before = stored_chunks(stack)
    with logged_in(stack) as client:
        start_data(client)
        client.send(HEADER + lines(3) + b"a bare\nline feed\r\n" + lines(1) + b".\r\n")
        code, text = client.getreply()
        assert (code, text[:5]) == (554, b"5.6.0")
        assert client.noop()[0] == 250, "the session goes on"
        client.sendmail(ALICE, ["bob@example.net"], HEADER + b"after the refusal\r\n")
    [msg] = stack.sink.handler.wait_for(1, 30)
    assert msg.data.endswith(b"after the refusal\r\n")
    eventually(lambda: queue_depth(stack) == 0)
    eventually(lambda: stored_chunks(stack) <= before, 10)


@pytest.mark.parametrize("where", [b"\r\n\x00.\r\n", b"\r\n.\x00\r\n", b"\x00"])
def test_nul_in_data_is_refused_and_never_relayed(stack, where):
    with logged_in(stack) as client:
        start_data(client)
        client.send(HEADER + b"before" + where + b"after\r\n.\r\n")
        code, text = client.getreply()
        assert (code, text) == (554, b"5.6.0 Message contains NUL octets")
        assert client.noop()[0] == 250, "the session goes on"
    time.sleep(0.5)
    assert stack.sink.handler.messages == []


def test_a_client_that_stops_halfway_leaves_nothing_queued(stack):
    before = stored_chunks(stack)
    client = logged_in(stack)
    start_data(client)
    client.send(HEADER + lines(2))
    time.sleep(0.5)
    client.close()  # gone, in the middle of its message (no QUIT)
    eventually(lambda: stored_chunks(stack) <= before, 10)
    assert queue_depth(stack) == 0
    time.sleep(0.3)
    assert stack.sink.handler.messages == []


def test_a_large_message_by_bdat_streams_too(stack):
    data = HEADER + lines(3)
    with logged_in(stack) as client:
        client.mail(ALICE)
        client.rcpt("bob@example.net")
        third = len(data) // 3
        for i, piece in enumerate((data[:third], data[third : 2 * third], data[2 * third :])):
            client.send(b"BDAT %d%s\r\n" % (len(piece), b" LAST" if i == 2 else b"") + piece)
            code, text = client.getreply()
            assert code == 250, text
        assert text.startswith(b"2.0.0 Ok: queued as")
    [msg] = stack.sink.handler.wait_for(1, 30)
    assert msg.data.endswith(data[len(HEADER):])


def test_rewriter_gone_mid_message_answers_451_and_queues_nothing(make_stack):
    # The rewriter writes the body: killed mid-message, what it had stored is never an object,
    # and goes by the relay's sweep (once untouched for ORPHAN_MIN_AGE: not the chunks of the
    # message being written after the restart).
    stack = make_stack(env={"relay": {"ORPHAN_SWEEP_INTERVAL": "0.5", "ORPHAN_MIN_AGE": "3"}})
    with logged_in(stack) as client:
        start_data(client)
        client.send(HEADER + lines(2))
        stack.stop_service("rewriter", sig=signal.SIGKILL)
        client.send(lines(1) + b".\r\n")
        code, text = client.getreply()
        assert (code, text[:5]) == (451, b"4.3.0")
        assert client.noop()[0] == 250, "the session goes on"
    assert queue_depth(stack) == 0
    eventually(lambda: stored_chunks(stack) == 0, 15)
    stack.start_service("rewriter")
    stack.wait_ready("rewriter")
    with logged_in(stack) as client:
        client.sendmail(ALICE, ["bob@example.net"], HEADER + lines(1))
    assert len(stack.sink.handler.wait_for(1, 30)) == 1


def test_nats_gone_mid_message_answers_451_and_the_sweep_removes_the_chunks(make_stack):
    # The client goes on sending megabytes after NATS went: the chunks awaiting NATS fill
    # their window, the rewriter's output stops, its input stops, and the frontend's write
    # to the rewriter waits for room. When storing gives up (PUBLISH_TIMEOUT), that write
    # is abandoned too: 451 then, not at the rewriter's deadline (60 s).
    stack = make_stack(env={"relay": {"ORPHAN_SWEEP_INTERVAL": "0.5", "ORPHAN_MIN_AGE": "0"},
                            "rewriter": {"PUBLISH_TIMEOUT": "2"}})
    with logged_in(stack) as client:
        start_data(client)
        client.send(HEADER + lines(2))
        time.sleep(0.5)
        stack.nats.stop()
        started = time.monotonic()
        client.send(lines(8) + b".\r\n")
        code, text = client.getreply()
        assert code == 451, text
        assert time.monotonic() - started < 15, "answered once storing gave up"
        stack.nats.start()
    assert stack.sink.handler.messages == []
    # Whatever reached the Object Store before NATS went away was never an object: swept.
    eventually(lambda: stored_chunks(stack) == 0, 30)
    assert queue_depth(stack) == 0


def test_relay_killed_mid_delivery_of_a_large_body_delivers_it_once(make_stack, sink):
    stack = relay_only(make_stack, ACK_WAIT=2)
    big = body("large and killed", lines(5).decode())
    sink.handler.data_replies.append(STALL)  # the whole body goes out, the next hop never answers
    queue(stack, envelope(), big)
    assert sink.handler.wait_until(lambda h: h.stalled == 1, 30)
    stack.stop_service("relay", sig=signal.SIGKILL)
    stack.start_service("relay")
    (got,) = sink.handler.wait_for(1, 30)
    assert got.data == big
    eventually(lambda: queue_depth(stack) == 0)
    eventually(lambda: stored_chunks(stack) == 0, 10)
    time.sleep(1)
    assert len(sink.handler.messages) == 1


def test_a_message_cut_by_the_drain_leaves_no_chunks_behind(make_stack):
    # A client still in the middle of a large message when the drain runs out: its session is
    # cut, and what it had streamed into the Object Store is removed before NATS is let go
    # (not left for the sweep).
    stack = make_stack(env={"frontend": {"DRAIN_SECONDS": "1"}})
    client = logged_in(stack)
    try:
        start_data(client)
        client.send(HEADER + lines(2))
        eventually(lambda: stored_chunks(stack) > 0, 10)
        assert stack.stop_service("frontend", sig=signal.SIGTERM, timeout=20) == 0
        assert stored_chunks(stack) == 0
        assert queue_depth(stack) == 0
    finally:
        client.close()
