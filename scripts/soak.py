"""A soak (issue 29): submitd's whole stack under steady load for a long while, the resident
memory of every process sampled each minute, to show what grows and whether it levels off.

    make soak SOAK_MINUTES=60 SOAK_RATE=100

Reused plain sessions from loopback (trusted, as `make bench`'s plain rounds) offer SOAK_RATE
messages a second in all, evenly spaced, to the stack as `make run` starts it; Postfix's
smtp-sink is the next hop. Each minute: RSS of nats-server and each service, the queue stream's
state, and the messages accepted and delivered so far. At the end a verdict per process: its
growth over the last third of the run beside its growth over the first two thirds.

What is expected to grow until a window fills, then stay: the queue stream's duplicate window
(every accepted message's id, kept 30 minutes: QueueConfig.duplicate_window_s) in nats-server.
Anything that still grows in the last third grows without bound.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchkit import Round, SmtpSink, Submitd, _status_kb, paced  # noqa: E402


def stream_state(stack) -> dict:
    import nats

    from submitd_common import jetstream

    async def read() -> dict:
        nc = await nats.connect(stack.nats.url)
        try:
            js = nc.jetstream()
            info = await js.stream_info(jetstream.STREAM)
            consumer = await js.consumer_info(jetstream.STREAM, jetstream.RELAY_DURABLE)
            bodies = await js.stream_info(f"OBJ_{jetstream.BODY_BUCKET}")
            return {"messages": info.state.messages, "deleted": info.state.num_deleted or 0,
                    "bytes": info.state.bytes, "delivered": consumer.delivered.stream_seq,
                    "pending": consumer.num_pending + consumer.num_ack_pending, "body_msgs": bodies.state.messages}
        finally:
            await nc.close()

    return asyncio.run(read())


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=60)
    parser.add_argument("--rate", type=float, default=100, help="messages a second offered, in all")
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--every", type=float, default=60, help="seconds between samples")
    parser.add_argument("--json", type=Path, help="write the samples here too")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="submitd-soak-"))
    sink = SmtpSink()
    server = Submitd("submitd", work / "submitd", sink, dkim=False)
    pids = server.pids()
    result = Round()
    seconds = args.minutes * 60
    load = threading.Thread(target=paced, args=(server.port, args.rate, seconds, args.sessions, result), daemon=True)
    samples: list[dict] = []
    print(f"soak: {args.minutes:g} min at {args.rate:g} msg/s over {args.sessions} reused sessions; "
          f"RSS in MB every {args.every:g} s", flush=True)
    names = list(pids)
    print(f"{'min':>6} {'accepted':>9} {'queued':>7} " + " ".join(f"{n:>9}" for n in names)
          + f" {'stream msgs':>11} {'deleted':>8}", flush=True)
    start = time.monotonic()
    load.start()
    try:
        while True:
            elapsed = time.monotonic() - start
            state = stream_state(server.stack)
            sample = {"minute": elapsed / 60, "accepted": result.accepted, "failed": result.failed,
                      "rss_mb": {n: _status_kb(pid, "VmRSS") / 1024 for n, pid in pids.items()}, **state}
            samples.append(sample)
            print(f"{sample['minute']:6.1f} {result.accepted:9d} {state['pending']:7d} "
                  + " ".join(f"{sample['rss_mb'][n]:9.1f}" for n in names)
                  + f" {state['messages']:11d} {state['deleted']:8d}", flush=True)
            if not load.is_alive():
                break
            time.sleep(max(0.0, args.every - (time.monotonic() - start - elapsed)))
        deadline = time.monotonic() + 120
        while not server.drained() and time.monotonic() < deadline:
            time.sleep(1)
        samples.append({"minute": (time.monotonic() - start) / 60, "accepted": result.accepted,
                        "failed": result.failed, "rss_mb": {n: _status_kb(pid, "VmRSS") / 1024 for n, pid in pids.items()},
                        **stream_state(server.stack)})
    finally:
        server.stop()
        sink.stop()
    if args.json:
        args.json.write_text(json.dumps(samples, indent=1))
    last = samples[-1]
    print(f"\naccepted {last['accepted']} (failed {last['failed']}), all delivered: {last['pending'] == 0}, "
          f"queue stream left with {last['messages']} messages")
    # Growth in the first two thirds and in the last third of the load (the final sample, after
    # the drain, is left out: the load stopped).
    loaded = samples[:-1]
    if len(loaded) >= 4:
        a, b, c = loaded[0], loaded[(2 * len(loaded)) // 3], loaded[-1]
        print(f"{'process':>10} {'start':>7} {'2/3':>7} {'end':>7}  growth first 2/3, last 1/3 (MB)")
        for n in names:
            first, late = b["rss_mb"][n] - a["rss_mb"][n], c["rss_mb"][n] - b["rss_mb"][n]
            print(f"{n:>10} {a['rss_mb'][n]:7.1f} {b['rss_mb'][n]:7.1f} {c['rss_mb'][n]:7.1f}  "
                  f"{first:+7.1f} {late:+7.1f}")
    return 0 if last["pending"] == 0 and last["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
