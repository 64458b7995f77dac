"""`make fault-queue`: kill nats-server (SIGKILL) again and again while mail flows, and see what
the queue holds afterwards.

Each round: a stack on loopback (trusted network, no AUTH), four clients sending as fast as
they can, nats-server killed at a random moment and started again, then quiet. What every client
was told is kept (250 with its queue id, or 4xx); what the next hop got is read by the queue id in
each message's Received field. After the flood the queue must empty; an entry left at or below the
relay consumer's ack floor is *stranded* (the consumer will never hand it out again), and is
reported with what the client was told and whether it was delivered.

    make fault-queue                       # relay recovers stranded entries (the product)
    FAULT_ARGS="--observe" make fault-queue   # recovery off: show the divergence itself

Prints one line per round and a summary; exits non-zero if a message answered 250 was not
delivered, or (without --observe) the queue did not empty.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import random
import re
import signal
import smtplib
import sys
import tempfile
import threading
import time
from pathlib import Path

import nats

from submitd.v1 import queue_pb2
from submitd_common import jetstream
from submitd_devkit.sink import Sink
from submitd_devkit.stack import Stack
from submitd_devkit.testing.metrics import sample
from submitd_devkit.testing.plugin import stack_options
from submitd_devkit.testing.users import default_users

_ID = re.compile(rb"\(submitd\) with \w+ id ([0-9A-Z]{22})")


def flood(stack: Stack, stop: threading.Event, told: dict[str, str], lock: threading.Lock, t: int) -> None:
    client, i = None, 0
    while not stop.is_set():
        i += 1
        try:
            if client is None:
                client = smtplib.SMTP("127.0.0.1", stack.ports.submission, timeout=20)
                client.ehlo("fault.example.test")
            client.mail("someone@example.test")
            client.rcpt("bob@example.net")
            code, text = client.data(f"From: someone@example.test\r\nSubject: t{t}-{i}\r\n\r\nx\r\n".encode())
            reply = f"{code} {text.decode(errors='replace')}"
            qid = reply.rsplit(" ", 1)[1] if code == 250 else f"t{t}-{i}"
            with lock:
                told[qid] = reply
            if code != 250:
                client.rset()
        except (smtplib.SMTPException, OSError):
            if client is not None:
                client.close()
            client = None
            time.sleep(0.05)
    if client is not None:
        client.close()


async def leftovers(stack: Stack) -> tuple[list[tuple[int, str, bool]], dict]:
    """(seq, queue id, at or below the ack floor) of every entry still queued, and the counts."""
    nc = await nats.connect(stack.nats.url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(jetstream.STREAM)
        consumer = await js.consumer_info(jetstream.STREAM, jetstream.RELAY_DURABLE)
        floor = consumer.ack_floor.stream_seq
        out, seq = [], info.state.first_seq
        while info.state.messages and seq <= info.state.last_seq:
            try:
                raw = await js.get_msg(jetstream.STREAM, seq, subject=f"{jetstream.SUBJECT_PREFIX}.>", next=True)
            except nats.js.errors.NotFoundError:
                break
            q = queue_pb2.QueuedMessage.FromString(raw.data or b"")
            out.append((raw.seq, ("withdrawal " if q.withdrawal else "") + q.envelope.queue_id, raw.seq <= floor))
            seq = raw.seq + 1
        counts = {"messages": info.state.messages, "first_seq": info.state.first_seq, "last_seq": info.state.last_seq,
                  "deleted": info.state.num_deleted, "pending": consumer.num_pending,
                  "ack_pending": consumer.num_ack_pending, "ack_floor": floor,
                  "delivered_seq": consumer.delivered.stream_seq}
        return out, counts
    finally:
        await nc.close()


def one_round(n: int, args, root: Path) -> dict:
    sink = Sink().start()
    relay_env = {"ACK_WAIT": "10", "STRANDED_CHECK_INTERVAL": "0" if args.observe else "2"}
    stack = Stack(root / f"round{n}", **stack_options(
        users=default_users(), next_hop=("127.0.0.1", sink.port), trusted_networks=["127.0.0.1/32"],
        env={"frontend": {"PUBLISH_TIMEOUT": "3"}, "relay": relay_env}))
    stack.sink = sink
    told: dict[str, str] = {}
    lock = threading.Lock()
    stop = threading.Event()
    result: dict = {"round": n}
    try:
        stack.start()
        threads = [threading.Thread(target=flood, args=(stack, stop, told, lock, t)) for t in range(4)]
        for t in threads:
            t.start()
        for _ in range(args.kills):
            time.sleep(random.uniform(0.3, 1.5))
            stack.nats.stop(signal.SIGKILL if args.signal == "KILL" else signal.SIGTERM)
            time.sleep(random.uniform(0.1, 1.0))
            stack.nats.start()
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join(60)
        accepted = {q for q, r in told.items() if r.startswith("250")}
        # Settled: everything answered 250 arrived, nothing readable is left, and the counts
        # said the same twice, an AckWait apart (a redelivery due would have come by then).
        deadline, last = time.monotonic() + args.settle, None
        while time.monotonic() < deadline:
            left, counts = asyncio.run(leftovers(stack))
            got = collections.Counter(m.group(1).decode() for msg in sink.handler.messages
                                      if (m := _ID.search(msg.data)))
            if accepted <= set(got) and not left and counts["messages"] == 0:
                break
            if (left, counts) == last:
                break
            last = (left, counts)
            time.sleep(12 if accepted <= set(got) else 1)
        stranded = [(seq, qid) for seq, qid, below in left if below]
        relay = lambda name, **labels: sample(stack.ports.relay_http, name, **labels)  # noqa: E731
        result["counted"] = relay("submitd_delivery_possible_duplicates_total")
        result["settled"] = {o: relay("submitd_queue_stranded_total", outcome=o)
                             for o in ("delivered", "requeued", "body_gone") if relay("submitd_queue_stranded_total", outcome=o)}
        result["withdrawn"] = {o: relay("submitd_queue_withdrawals_total", outcome=o)
                               for o in ("removed", "too_late", "in_flight", "delivered_meanwhile", "nothing_stored")
                               if relay("submitd_queue_withdrawals_total", outcome=o)}
        result.update(
            accepted=len(accepted), refused=len(told) - len(accepted), lost=sorted(accepted - set(got)),
            twice=sum(n - 1 for n in got.values() if n > 1), queue=counts,
            stranded=[{"seq": seq, "queue_id": qid, "client_told": told.get(qid.split()[-1], "no 250 with this id"),
                       "delivered": got.get(qid.split()[-1], 0)} for seq, qid in stranded],
            left=len(left),
        )
    finally:
        stop.set()
        stack.stop(at_once=True)
        sink.stop()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--kills", type=int, default=3, help="nats-server kills per round")
    parser.add_argument("--settle", type=float, default=40, help="seconds to wait for the queue to empty")
    parser.add_argument("--observe", action="store_true", help="relay recovery off: report the divergence")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--signal", choices=("KILL", "TERM"), default="KILL", help="how nats-server is stopped")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    random.seed(seed)
    print(f"seed {seed}; {args.rounds} rounds of {args.kills} SIG{args.signal}s; recovery {'off' if args.observe else 'on'}", flush=True)
    failed = 0
    with tempfile.TemporaryDirectory(prefix="submitd-faults-") as tmp:
        for n in range(1, args.rounds + 1):
            r = one_round(n, args, Path(tmp))
            bad = bool(r["lost"]) or (not args.observe and r["left"])
            failed += bad
            print(f"round {n}: {r['accepted']} answered 250, {r['refused']} 4xx/cut, lost {len(r['lost'])}, "
                  f"delivered twice {r['twice']} (counted as possible {r['counted']:.0f}), left in queue {r['left']} "
                  f"(stranded {len(r['stranded'])}); recovered {r['settled']}; withdrawals {r['withdrawn']}; "
                  f"{r['queue']}{' FAILED' if bad else ''}", flush=True)
            for s in r["stranded"]:
                print(f"    stranded: {s}", flush=True)
            for q in r["lost"][:5]:
                print(f"    lost: {q}", flush=True)
    print(f"{args.rounds - failed} of {args.rounds} rounds kept every promise")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
