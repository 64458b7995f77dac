"""Least privilege on NATS: the grants the chart renders, loaded into a real nats-server, let each
service do its own work and refuse it everything else (issue 14).

The whole suite is the other half of the proof: every stack in the tests runs with these grants
(``submitd_devkit.stack``), and a test fails when its nats-server logged a violation
(``testing.plugin.assert_within_grants``)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path

import nats
import pytest
from nats.js.api import ConsumerConfig, KeyValueConfig, RePublish, StreamSource

from submitd_common import jetstream, natsauth, provision
from submitd_common.bodies import BodyWriter, purge_abandoned, read_chunks
from submitd_devkit.testing.waiting import eventually_async
from submitd_devkit.ports import free_port, wait_port
from submitd_devkit.stack import nats_server_binary

from test_chart import CHART, by_kind, render

PASSWORDS = {"rewriter": "pw-rewriter", "policy": "pw-policy", "relay": "pw-relay", "frontend": "pw-frontend",
             "submitctl": "pw-submitctl", "provision": "pw-provision"}


def test_the_charts_grants_are_the_services_grants():
    """The chart carries a copy (files/nats-grants.json); regenerate it with
    ``python -m submitd_common.natsauth > helm/submitd/files/nats-grants.json``."""
    assert json.loads((CHART / "files" / "nats-grants.json").read_text()) == natsauth.PERMISSIONS


def test_only_services_that_use_nats_get_a_user_and_a_way_out():
    docs = render({"services": {"archiver": {
        "ports": [{"name": "http", "containerPort": 8080}], "probe": {"http": "http"},
        "nats": {"publish": ["archive.>"], "subscribe": ["_INBOX_archiver.>"]}}}})
    env = {name.removeprefix("mail-submitd-"): {e["name"] for e in d["spec"]["template"]["spec"]["containers"][0]["env"]}
           for name, d in by_kind(docs, "Deployment").items()}
    assert not any("NATS" in e for e in env["frontend"]), "the frontend has no business on NATS"
    for service in ("rewriter", "policy", "relay", "archiver"):
        assert f"SUBMITD_{service.upper()}_NATS_USER" in env[service]
        assert f"SUBMITD_{service.upper()}_NATS_INBOX_PREFIX" in env[service], "replies on its own inbox"
    # (and submitctl, the operator's app-password tool, which is no service: no Deployment, no way out)
    assert set(by_kind(docs, "Secret")["mail-submitd-nats-auth"]["data"]) == {
        "rewriter", "policy", "relay", "archiver", "submitctl", "provision"}
    conf = by_kind(docs, "ConfigMap")["mail-submitd-nats"]["data"]["nats.conf"]
    assert '{user: archiver, password: $ARCHIVER_PASSWORD, permissions: {publish: {allow: ["archive.>"]}' in conf
    clients = by_kind(docs, "NetworkPolicy")["mail-submitd-nats-clients"]["spec"]["podSelector"]["matchExpressions"]
    assert set(clients[1]["values"]) == {"rewriter", "policy", "relay", "archiver"}


def test_only_the_init_containers_hold_the_provisioning_password():
    """Policy's and the relay's pods provision first (an init container running the service's
    image with ``provision``, as the NATS user ``provision``); no service container, and no
    other pod, is given that user's password, and the init container gets none of the
    service's keys, tokens or users."""
    deployments = by_kind(render(), "Deployment")

    def secret_keys(container: dict) -> set[str]:
        return {e["valueFrom"]["secretKeyRef"]["key"] for e in container.get("env", [])
                if "secretKeyRef" in e.get("valueFrom", {}) and e["valueFrom"]["secretKeyRef"]["name"].endswith("-nats-auth")}

    for name, d in deployments.items():
        pod = d["spec"]["template"]["spec"]
        service = name.removeprefix("mail-submitd-")
        assert "provision" not in secret_keys(pod["containers"][0]), f"{service} holds the provisioning password"
        inits = pod.get("initContainers", [])
        if service in ("policy", "relay"):
            (init,) = inits
            env = {e["name"]: e.get("value") for e in init["env"]}
            assert init["args"] == ["provision"] and init["image"] == pod["containers"][0]["image"]
            assert env[f"SUBMITD_{service.upper()}_NATS_USER"] == "provision" and secret_keys(init) == {"provision"}
            assert {m["name"] for m in init["volumeMounts"]} == {"tmp", "config"}, "none of the service's secrets"
        else:
            assert not inits, f"{service} needs no provisioning"


@pytest.fixture
def chart_nats(tmp_path: Path):
    """A real nats-server whose users and permissions are the chart's rendered ``authorization``
    block, passwords given through the environment exactly as the StatefulSet does."""
    rendered = by_kind(render(), "ConfigMap")["mail-submitd-nats"]["data"]["nats.conf"]
    block = rendered[rendered.index("authorization {"):]
    port = free_port()
    conf = tmp_path / "nats.conf"
    conf.write_text(f"listen: 127.0.0.1:{port}\njetstream {{\n  store_dir: {json.dumps(str(tmp_path / 'js'))}\n}}\n{block}")
    env = {**os.environ, **{f"{k.upper()}_PASSWORD": v for k, v in PASSWORDS.items()}}
    with open(tmp_path / "nats.log", "wb") as log:
        proc = subprocess.Popen([nats_server_binary(), "-c", str(conf)], stdout=log, stderr=log, env=env)
    try:
        assert wait_port("127.0.0.1", port, 15), (tmp_path / "nats.log").read_text()
        yield f"nats://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


class As:
    """A connection as one service (its user, password and inbox prefix), recording the
    permission violations the server reports to it."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.errors: list[str] = []

    async def connect(self, url: str) -> "As":
        async def error_cb(e: Exception) -> None:
            self.errors.append(str(e))

        self.nc = await nats.connect(url, user=self.service, password=PASSWORDS[self.service],
                                     inbox_prefix=natsauth.inbox_prefix(self.service), error_cb=error_cb,
                                     allow_reconnect=False)
        self.js = self.nc.jetstream(timeout=2)
        return self

    async def refused(self, what: str, operation) -> None:
        """``operation`` fails, and the server says it was for want of permission."""
        self.errors.clear()
        with pytest.raises(Exception):
            await asyncio.wait_for(operation(), 3)
            await self.nc.flush(2)
            for _ in range(20):  # an asynchronous refusal (a publish or a subscription)
                if self.errors:
                    break
                await asyncio.sleep(0.05)
            if self.errors:
                raise PermissionError(self.errors[-1])
        assert any("permissions violation" in e.lower() for e in self.errors), f"{self.service}: {what}: {self.errors}"


def test_each_service_may_do_its_work_and_nothing_else(chart_nats):
    asyncio.run(_grants(chart_nats))


RELAY_CONSUMER = ConsumerConfig(name="relay", durable_name="relay", filter_subject="submitd.queue.>", ack_wait=30)


def buckets(ttl: float = 60) -> list[jetstream.KvSpec]:
    """Every bucket, as the policy's and the relay's provisioning make them."""
    return [jetstream.KvSpec(jetstream.COUNTERS_BUCKET, ttl, mirror_keys=jetstream.BUDGET_KEYS),
            jetstream.KvSpec(jetstream.AUTHFAIL_BUCKET, ttl, mirror_keys=">"),
            jetstream.KvSpec(jetstream.AUTHKNOWN_BUCKET, ttl), jetstream.KvSpec(jetstream.APPPASSWORDS_BUCKET, 0),
            jetstream.KvSpec(jetstream.DELIVERY_BUCKET, ttl), jetstream.KvSpec(jetstream.TLSRPT_BUCKET, ttl),
            jetstream.KvSpec(jetstream.MTA_STS_BUCKET, ttl)]


async def _grants(url: str) -> None:
    rewriter = await As("rewriter").connect(url)
    policy = await As("policy").connect(url)
    relay = await As("relay").connect(url)
    provisioner = await As("provision").connect(url)

    # What each does in production, allowed. Provisioning makes the queue, the body store, every
    # bucket and the relay's consumer, and brings them to changed settings on the next start;
    # the services open what it made. The rewriter writes a body and queues an entry.
    await provision.provision(provisioner.js, queue=jetstream.QueueConfig(), buckets=buckets(), consumers=[RELAY_CONSUMER])
    await provision.provision(provisioner.js, queue=jetstream.QueueConfig(max_bytes=1 << 29), buckets=buckets(120),
                              consumers=[RELAY_CONSUMER])
    assert (await relay.js.stream_info(jetstream.STREAM)).config.max_bytes == 1 << 29
    await asyncio.wait_for(jetstream.wait_for_queue(rewriter.js), 5)
    writer = BodyWriter(rewriter.js, jetstream.BODY_BUCKET, "q1", timeout=2)
    await writer.write(b"Subject: x\r\n\r\nbody\r\n")
    await writer.close()
    await rewriter.js.publish(jetstream.SUBMIT_SUBJECT, b"entry", timeout=2)
    # A write the rewriter abandons: it asks the relay, which removes the chunks.
    abandoned = await relay.nc.subscribe(jetstream.ABANDONED_SUBJECT, queue="relay")
    dropped = BodyWriter(rewriter.js, jetstream.BODY_BUCKET, "q2", timeout=2, abandon=lambda nuid: rewriter.nc.publish(
        jetstream.ABANDONED_SUBJECT, json.dumps({"nuid": nuid}).encode()))
    await dropped.write(b"x" * (300 << 10))
    await dropped.abort()
    notice = await abandoned.next_msg(timeout=2)
    assert await purge_abandoned(relay.js, jetstream.BODY_BUCKET, json.loads(notice.data)["nuid"])
    spec = {b.bucket: b for b in buckets(120)}
    rates = await jetstream.open_kv(policy.js, spec[jetstream.COUNTERS_BUCKET])
    authfail = await jetstream.open_kv(policy.js, spec[jetstream.AUTHFAIL_BUCKET])
    known = await jetstream.open_kv(policy.js, spec[jetstream.AUTHKNOWN_BUCKET])
    # Each policy replica follows the lockout counters' writes as the server republishes them.
    mirrored = await policy.nc.subscribe(jetstream.mirror_subject(jetstream.AUTHFAIL_BUCKET))
    budgets = await policy.nc.subscribe(jetstream.mirror_subject(jetstream.COUNTERS_BUCKET, jetstream.BUDGET_KEYS))
    await rates.put("k", b"1")
    assert (await authfail.put("login", b"1")) and (await rates.get("k")).value == b"1"
    assert (await known.put("known.x", b"1")) and (await known.get("known.x")).value == b"1"
    await rates.put(f"{jetstream.BUDGET_KIND}.x.1", b"2")
    assert ((await mirrored.next_msg(2)).data, (await budgets.next_msg(2)).data) == (b"1", b"2")
    records = await jetstream.open_kv(relay.js, spec[jetstream.DELIVERY_BUCKET])
    await records.put("q1", b"{}")
    # TLS reporting: counts merged by compare-and-set, the day's domains listed, one lock per report.
    tlsrpt = await jetstream.open_kv(relay.js, spec[jetstream.TLSRPT_BUCKET])
    revision = await tlsrpt.create("counts.20260101T000000Z.example.net", b"{}")
    await tlsrpt.update("counts.20260101T000000Z.example.net", b"{}", last=revision)
    await tlsrpt.create("sent.20260101T000000Z.example.net", b"{}")
    listed = await relay.js.stream_info(f"KV_{jetstream.TLSRPT_BUCKET}", subjects_filter=f"$KV.{jetstream.TLSRPT_BUCKET}.counts.>")
    assert list(listed.state.subjects) == [f"$KV.{jetstream.TLSRPT_BUCKET}.counts.20260101T000000Z.example.net"]
    assert (await jetstream.wait_for_consumer(relay.js)).config.ack_wait == 30
    sub = await relay.js.pull_subscribe_bind(durable="relay", stream=jetstream.STREAM)
    (msg,) = await sub.fetch(1, timeout=2)
    assert msg.data == b"entry"
    assert b"".join([c async for c in read_chunks(relay.js, jetstream.BODY_BUCKET, "q1")]) == b"Subject: x\r\n\r\nbody\r\n"
    await msg.ack_sync(timeout=2)
    await relay.nc.publish(f"{jetstream.EVENTS_PREFIX}.delivered", b"{}")
    await relay.nc.flush(2)
    assert not rewriter.errors + policy.errors + relay.errors + provisioner.errors
    for c in (rewriter, policy, relay, provisioner):
        c.js = c.nc.jetstream(timeout=0.5)  # a refused API request is never answered

    # No service may write a stream's or a consumer's configuration: with it, it could copy any
    # stream's messages anywhere in the account. The policy could republish its own writes into
    # the queue (mail no gate checked) or source the queue into its bucket (everyone's mail, to
    # read); the relay could source the app passwords into its records, or aim a consumer's
    # deliveries at their subjects (an app password of its making).
    counters = (await policy.js.stream_info(f"KV_{jetstream.COUNTERS_BUCKET}")).config
    counters.republish = RePublish(src=f"$KV.{jetstream.COUNTERS_BUCKET}.>", dest=jetstream.SUBMIT_SUBJECT)
    await policy.refused("republish its writes into the queue", lambda: policy.js.update_stream(counters))
    counters.republish, counters.sources = None, [StreamSource(name=jetstream.STREAM)]
    await policy.refused("source the queue into its bucket", lambda: policy.js.update_stream(counters))
    await policy.refused("make its bucket afresh", lambda: policy.js.create_key_value(KeyValueConfig(
        bucket=jetstream.AUTHKNOWN_BUCKET, history=1, ttl=60)))
    delivery = (await relay.js.stream_info(f"KV_{jetstream.DELIVERY_BUCKET}")).config
    delivery.sources = [StreamSource(name=f"KV_{jetstream.APPPASSWORDS_BUCKET}")]
    await relay.refused("source the app passwords into its records", lambda: relay.js.update_stream(delivery))
    await relay.refused("aim its consumer at the app passwords", lambda: relay.js.add_consumer(
        jetstream.STREAM, config=ConsumerConfig(name="relay", durable_name="relay",
                                                deliver_subject=f"$KV.{jetstream.APPPASSWORDS_BUCKET}.x")))
    await relay.refused("change the queue", lambda: relay.js.update_stream(
        jetstream.stream_config(jetstream.QueueConfig(max_bytes=1 << 20))))
    await relay.refused("make the queue", lambda: relay.js.add_stream(jetstream.stream_config(jetstream.QueueConfig())))
    await relay.refused("make another bucket", lambda: relay.js.create_key_value(KeyValueConfig(bucket="OTHER")))
    # And provisioning, which may, touches no message: it cannot queue, read, consume, delete or
    # purge one, nor read or write a bucket's entries, nor make a consumer other than the relay's.
    await provisioner.refused("queue a message", lambda: provisioner.js.publish(jetstream.SUBMIT_SUBJECT, b"x", timeout=1))
    await provisioner.refused("read a queue entry", lambda: provisioner.js.get_msg(jetstream.STREAM, 1))
    await provisioner.refused("read a queue entry directly", lambda: provisioner.js.get_msg(jetstream.STREAM, 1, direct=True))
    await provisioner.refused("read a stored body", lambda: _read(provisioner))
    await provisioner.refused("listen to the queue", lambda: provisioner.nc.subscribe(f"{jetstream.SUBJECT_PREFIX}.>"))
    await provisioner.refused("consume the queue", lambda: provisioner.js.add_consumer(
        jetstream.STREAM, config=ConsumerConfig(durable_name="thief")))
    await provisioner.refused("read a lockout", lambda: authfail_as(provisioner))
    await provisioner.refused("clear a lockout", lambda: provisioner.nc.publish(f"$KV.{jetstream.AUTHFAIL_BUCKET}.login", b"0"))
    await provisioner.refused("purge the queue", lambda: provisioner.js.purge_stream(jetstream.STREAM))
    await provisioner.refused("delete the queue", lambda: provisioner.js.delete_stream(jetstream.STREAM))
    await provisioner.refused("make another stream", lambda: provisioner.js.add_stream(name="X", subjects=["x.>"]))

    # The rewriter writes new entries and bodies and nothing more: it may not consume the queue,
    # change or purge the stream or the body store, read bodies (other users' mail) or entries,
    # delete anything, create a stream, or read the policy's or the relay's buckets.
    await rewriter.refused("consume the queue", lambda: rewriter.js.add_consumer(
        jetstream.STREAM, config=ConsumerConfig(durable_name="thief")))
    await rewriter.refused("shorten the queue's max age", lambda: rewriter.js.update_stream(
        jetstream.stream_config(jetstream.QueueConfig())))
    await rewriter.refused("create the queue", lambda: jetstream.ensure_queue(rewriter.js, jetstream.QueueConfig()))
    await rewriter.refused("purge the bodies", lambda: rewriter.js.purge_stream(f"OBJ_{jetstream.BODY_BUCKET}"))
    await rewriter.refused("purge one body's chunks", lambda: purge_abandoned(rewriter.js, jetstream.BODY_BUCKET, "A" * 22))
    await rewriter.refused("read a stored body", lambda: _read(rewriter))
    await rewriter.refused("read a queue entry", lambda: rewriter.js.get_msg(jetstream.STREAM, 1))
    await rewriter.refused("read a queue entry directly", lambda: rewriter.js.get_msg(jetstream.STREAM, 1, direct=True))
    await rewriter.refused("delete a queue entry", lambda: rewriter.js.delete_msg(jetstream.STREAM, 1))
    await rewriter.refused("create another stream", lambda: rewriter.js.add_stream(name="X", subjects=["x.>"]))
    await rewriter.refused("write a delivery record", lambda: rewriter.nc.publish(f"$KV.{jetstream.DELIVERY_BUCKET}.q1", b"{}"))
    await rewriter.refused("listen to the queue", lambda: rewriter.nc.subscribe(f"{jetstream.SUBJECT_PREFIX}.>"))
    await rewriter.refused("read lockouts", lambda: rewriter.js.key_value(jetstream.AUTHFAIL_BUCKET))
    await rewriter.refused("delete the queue", lambda: rewriter.js.delete_stream(jetstream.STREAM))
    # The policy has its three buckets only.
    await policy.refused("queue a message", lambda: policy.js.publish(jetstream.SUBMIT_SUBJECT, b"x", timeout=1))
    await policy.refused("read delivery records", lambda: policy.js.key_value(jetstream.DELIVERY_BUCKET))
    await policy.refused("forge TLS report counts", lambda: policy.js.publish(
        f"$KV.{jetstream.TLSRPT_BUCKET}.counts.20260101T000000Z.example.net", b"{}", timeout=1))
    await policy.refused("read bodies", lambda: _read(policy))
    await policy.refused("follow the rates (only the lockout counters are mirrored)", lambda: policy.nc.subscribe(
        jetstream.mirror_subject(jetstream.COUNTERS_BUCKET)))
    await policy.refused("follow every mirrored bucket", lambda: policy.nc.subscribe(f"{jetstream.MIRROR_PREFIX}.>"))
    await policy.refused("forge a write into every replica's mirror", lambda: policy.nc.publish(
        jetstream.mirror_subject(jetstream.AUTHFAIL_BUCKET, "login"), b"0"))
    await policy.refused("follow the bucket's own subjects", lambda: policy.nc.subscribe(
        f"$KV.{jetstream.AUTHFAIL_BUCKET}.>"))
    # The relay may not touch the policy's buckets nor remove the queue.
    await relay.refused("read lockouts", lambda: relay.js.key_value(jetstream.AUTHFAIL_BUCKET))
    await relay.refused("read where users log in from", lambda: relay.js.key_value(jetstream.AUTHKNOWN_BUCKET))
    await relay.refused("clear a lockout", lambda: relay.nc.publish(f"$KV.{jetstream.AUTHFAIL_BUCKET}.login", b"0"))
    await relay.refused("follow the lockouts", lambda: relay.nc.subscribe(jetstream.mirror_subject(jetstream.AUTHFAIL_BUCKET)))
    await rewriter.refused("follow the lockouts", lambda: rewriter.nc.subscribe(
        jetstream.mirror_subject(jetstream.AUTHFAIL_BUCKET)))
    await relay.refused("purge the queue", lambda: relay.js.purge_stream(jetstream.STREAM))
    await relay.refused("delete the queue", lambda: relay.js.delete_stream(jetstream.STREAM))
    # Nobody hears another's replies.
    for me, other in ((rewriter, "relay"), (relay, "policy"), (policy, "rewriter")):
        await me.refused("read others' replies", lambda: me.nc.subscribe(f"{natsauth.inbox_prefix(other)}.>"))
        await me.refused("read every reply", lambda: me.nc.subscribe("_INBOX.>"))
    for c in (rewriter, policy, relay, provisioner):
        await c.nc.close()

    # The frontend has no user at all (the Secret holds none for it).
    host, port = url.removeprefix("nats://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    assert (await reader.readline()).startswith(b"INFO ")
    writer.write(b'CONNECT {"user":"frontend","pass":"%s","verbose":false}\r\nPING\r\n' % PASSWORDS["frontend"].encode())
    assert (await reader.readline()).lower() == b"-err 'authorization violation'\r\n"
    writer.close()


async def authfail_as(who: As) -> None:
    await (await who.js.key_value(jetstream.AUTHFAIL_BUCKET)).get("login")


async def _read(who: As) -> None:
    async for _ in read_chunks(who.js, jetstream.BODY_BUCKET, "q1"):
        pass


def test_policy_reads_app_passwords_and_only_submitctl_makes_or_revokes_them(chart_nats):
    asyncio.run(_app_password_grants(chart_nats))


async def _app_password_grants(url: str) -> None:
    import time

    from nats.js.api import KeyValueConfig

    from submitd_common import apppasswords as records
    from submitd_ctl import apppasswords as ctl
    from submitd_policy.apppasswords import AppPasswords

    bucket, stream = jetstream.APPPASSWORDS_BUCKET, f"KV_{jetstream.APPPASSWORDS_BUCKET}"
    policy = await As("policy").connect(url)
    operator = await As("submitctl").connect(url)
    relay = await As("relay").connect(url)
    options = {"servers": [url], "user": "submitctl", "password": PASSWORDS["submitctl"],
               "inbox_prefix": natsauth.inbox_prefix("submitctl")}
    alice = "alice@example.test"

    # What each does in production, allowed: policy's provisioning makes the (empty) bucket, policy
    # reads it and follows it; submitctl adds, lists and revokes; policy records the last use.
    provisioner = await As("provision").connect(url)
    await provision.provision(provisioner.js, buckets=[jetstream.KvSpec(bucket, 0)])
    await provisioner.nc.close()
    mirror = AppPasswords(policy.nc, last_used_seconds=0)
    await mirror.start()
    record, password = await ctl.add(options, alice, "printer")

    async def accepted():
        return mirror.check(alice, password) is not None

    async def last_used():
        return [r for r in await ctl.listing(options, alice) if r["last_used"] != "never"]

    await eventually_async(accepted)
    await eventually_async(last_used)
    await ctl.revoke(options, alice, record.ident)

    async def refused():
        return mirror.check(alice, password) is None

    await eventually_async(refused)
    assert not policy.errors + operator.errors + relay.errors
    for c in (policy, operator, relay):
        c.js = c.nc.jetstream(timeout=0.5)

    # One step beyond: policy may neither make nor revoke an app password, nor change, purge or
    # delete the bucket, nor aim a consumer's deliveries anywhere (the queue, say).
    forged, _ = records.new("mallory@example.test", "forged", time.time())
    kept, _ = await ctl.add(options, alice, "kept")
    await policy.refused("make an app password", lambda: policy.js.publish(
        f"$KV.{bucket}.{forged.key}", forged.to_json(), timeout=1))
    await policy.refused("revoke an app password", lambda: policy.js.publish(
        f"$KV.{bucket}.{kept.key}", b"", headers={"KV-Operation": "PURGE", "Nats-Rollup": "sub"}, timeout=1))
    config = (await policy.js.stream_info(stream)).config
    config.max_age = 1.0
    await policy.refused("expire every app password", lambda: policy.js.update_stream(config))
    await policy.refused("purge the bucket", lambda: policy.js.purge_stream(stream))
    await policy.refused("delete the bucket", lambda: policy.js.delete_stream(stream))
    await policy.refused("create another bucket", lambda: policy.js.create_key_value(KeyValueConfig(bucket="OTHER")))
    await policy.refused("aim a consumer at the queue", lambda: policy.js.add_consumer(
        stream, config=ConsumerConfig(name="aimed", deliver_subject=jetstream.SUBMIT_SUBJECT)))
    # submitctl writes app passwords and nothing else; the relay does not see them at all.
    await operator.refused("delete the bucket", lambda: operator.js.delete_stream(stream))
    await operator.refused("queue a message", lambda: operator.js.publish(jetstream.SUBMIT_SUBJECT, b"x", timeout=1))
    await operator.refused("clear a lockout", lambda: operator.nc.publish(f"$KV.{jetstream.AUTHFAIL_BUCKET}.x", b"0"))
    await operator.refused("aim a consumer at the queue", lambda: operator.js.add_consumer(
        stream, config=ConsumerConfig(name="aimed", deliver_subject=jetstream.SUBMIT_SUBJECT)))
    await relay.refused("read app passwords", lambda: relay.js.key_value(bucket))
    await relay.refused("follow app passwords", lambda: relay.nc.subscribe(f"$KV.{bucket}.>"))
    assert mirror.check(alice, password) is None and [r["id"] for r in await ctl.listing(options, alice)] == [kept.ident]
    await mirror.close()
    for c in (policy, operator, relay):
        await c.nc.close()


def test_a_local_nats_made_before_a_user_was_removed_starts_without_it(tmp_path):
    """`make run`'s var/ from before the frontend lost its NATS user still names it in its
    passwords file: the dev kit's nats-server starts all the same (it failed with a KeyError),
    keeps the passwords it knew, and the removed user cannot log in."""
    from submitd_devkit.stack import NatsServer

    root = tmp_path / "nats"
    root.mkdir()
    (root / "passwords.json").write_text(json.dumps({"frontend": "pw-frontend", "policy": "pw-kept"}))
    server = NatsServer(root).start()

    async def login(user: str, password: str) -> bool:
        # (A raw CONNECT: nats-py leaves the socket of a refused login to the garbage collector.)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            assert (await reader.readline()).startswith(b"INFO ")
            writer.write(b'CONNECT {"user":"%s","pass":"%s","verbose":false}\r\nPING\r\n'
                         % (user.encode(), password.encode()))
            answer = await reader.readline()
            assert answer in (b"PONG\r\n", b"-ERR 'Authorization Violation'\r\n"), answer
            return answer == b"PONG\r\n"
        finally:
            writer.close()
            await writer.wait_closed()

    try:
        assert server.passwords["policy"] == "pw-kept" and "frontend" not in server.passwords
        assert asyncio.run(login("policy", "pw-kept"))
        assert not asyncio.run(login("frontend", "pw-frontend"))
    finally:
        server.stop()
