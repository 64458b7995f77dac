"""Helpers for relay tests: a relay with only NATS and a next hop around it, messages queued
straight into JetStream (as the frontend queues them), and the reports that come back."""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import time
import urllib.error
import urllib.request

import nats

from submitd.v1 import common_pb2, queue_pb2
from submitd_common import jetstream
from submitd_common.ids import new_queue_id
from submitd_devkit.sink import Received, Sink
from submitd_devkit.stack import Stack
from submitd_devkit.testing.users import ALICE


def body(subject: str, text: str = "hello", *, extra_headers: str = "") -> bytes:
    return (
        f"From: {ALICE}\r\nTo: bob@example.net\r\nSubject: {subject}\r\nMessage-ID: <{subject.replace(' ', '.')}@example.test>\r\n"
        f"{extra_headers}\r\n{text}\r\n"
    ).encode()


def envelope(
    recipients=("bob@example.net",), *, sender: str = ALICE, notify: str = "", orcpt: str = "", ret: str = "",
    envid: str = "", smtputf8: bool = False, eight_bit: bool = False,
) -> common_pb2.Envelope:
    return common_pb2.Envelope(
        queue_id=new_queue_id(),
        return_path=sender,
        recipients=[common_pb2.Recipient(address=r, notify=notify, orcpt=orcpt) for r in recipients],
        dsn_ret=ret,
        dsn_envid=envid,
        smtputf8=smtputf8,
        body_type="8BITMIME" if eight_bit else "7BIT",
        authenticated_user=sender,
    )


async def queue_async(url: str, items, received_at_ms: int | None = None) -> list[str]:
    nc = await nats.connect(url)
    js = nc.jetstream()
    sem = asyncio.Semaphore(200)

    async def one(env, data):
        async with sem:
            q = queue_pb2.QueuedMessage(
                envelope=env, received_at_ms=received_at_ms or int(time.time() * 1000), size=len(data)
            )
            await jetstream.enqueue(js, q, data, msg_id=env.queue_id, inline_limit=256 << 10, timeout=10)
            return env.queue_id

    try:
        return list(await asyncio.gather(*(one(env, data) for env, data in items)))
    finally:
        await nc.close()


def queue(stack: Stack, env: common_pb2.Envelope, data: bytes, received_at_ms: int | None = None) -> str:
    """Queue one message as the frontend would; returns its queue id."""
    return asyncio.run(queue_async(stack.nats.url, [(env, data)], received_at_ms))[0]


def queue_many(stack: Stack, items) -> list[str]:
    return asyncio.run(queue_async(stack.nats.url, items, None))


def queue_depth(stack: Stack) -> int:
    async def go():
        nc = await nats.connect(stack.nats.url)
        try:
            return (await nc.jetstream().stream_info(jetstream.STREAM)).state.messages
        finally:
            await nc.close()

    return asyncio.run(go())


def relay_only(make_stack, next_hop: Sink | None = None, **relay_env) -> Stack:
    """NATS and a relay delivering to ``next_hop`` or the test's sink (no frontend, policy or
    rewriter: its reports go unsigned)."""
    env = {"RETRY_SCHEDULE": "[0.5]", "REWRITER_TARGET": "", **{k: str(v) for k, v in relay_env.items()}}
    kwargs = {"next_hop": ("127.0.0.1", next_hop.port)} if next_hop else {}
    stack: Stack = make_stack(start=False, env={"relay": env}, **kwargs)
    if next_hop:
        stack.sink = next_hop
    stack.start(services=("relay",))
    return stack


def reports(sink: Sink) -> list[Received]:
    return [m for m in sink.handler.messages if m.mail_from == ""]


def ordinary(sink: Sink) -> list[Received]:
    return [m for m in sink.handler.messages if m.mail_from != ""]


def parse_report(received: Received):
    """(the message, its delivery-status blocks as dicts, the returned part)."""
    msg = email.message_from_bytes(received.data, policy=email.policy.compat32)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    human, status, returned = msg.get_payload()
    assert human.get_content_type() == "text/plain"
    assert status.get_content_type() in ("message/delivery-status", "message/global-delivery-status")
    # The delivery-status part as sent: header blocks separated by empty lines.
    boundary = msg.get_boundary().encode()
    part = received.data.split(b"--" + boundary)[2].decode("utf-8")
    chunks = part.replace("\r\n", "\n").strip().split("\n\n")[1:]  # after the part's own header
    blocks = [dict(line.split(": ", 1) for line in chunk.splitlines() if ": " in line) for chunk in chunks]
    return msg, blocks, returned


def admin(stack: Stack, method: str, path: str, token: str | None = "s3cret") -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{stack.ports.relay_http}{path}", method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def metric(stack: Stack, name: str, labels: str = "") -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.ports.relay_http}/metrics", timeout=5) as r:
        text = r.read().decode()
    exported = f"# TYPE {name} " in text or f"# TYPE {name.removesuffix('_total')} " in text
    assert exported, f"the relay exports no {name}"  # a renamed metric fails, never reads 0
    for line in text.splitlines():
        if line.startswith(f"{name}{{{labels}}} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0  # a labelled series not seen yet


def second_relay(stack: Stack):
    """Another replica of the stack's relay, on the same durable consumer (a process as Popen's:
    stop it), started as the stack starts its own (zygote.spawn)."""
    from submitd_devkit import zygote
    from submitd_devkit.ports import free_port

    env = stack.service_env("relay")
    env["SUBMITD_RELAY_HTTP_LISTEN"] = f"127.0.0.1:{free_port()}"
    return zygote.spawn("relay", env, str(stack.root / "log" / "relay2.log"))
