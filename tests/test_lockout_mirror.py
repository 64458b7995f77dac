"""Each policy replica's mirror of the lockout counters (issue 29: AUTH reads nothing remote on
the fast path), against a real nats-server, each replica connected as the policy's NATS user
with its grants: reads are local, writes stay compare-and-set in KV, another replica's write is
read within milliseconds, entries expire with the bucket's max age and go with a delete or a
purge, and a mirror that may have missed a write never answers (the counters read KV instead)."""

from __future__ import annotations

import asyncio
import time
import tracemalloc

import pytest
from nats.js.errors import KeyWrongLastSequenceError

from submitd_common import jetstream
from submitd_devkit.testing.waiting import eventually, eventually_async
from submitd_policy.counters import Counters, key_part
from submitd_policy.mirror import KvMirror

from test_app_passwords import CuttableProxy

BUCKET = jetstream.AUTHFAIL_BUCKET
TTL = 60


class Replica:
    """What one policy replica holds: its NATS connection (as policy, optionally through a
    proxy the test can cut), its mirror of AUTHFAIL and the counters on it."""

    def __init__(self, server, port: int | None = None, clock=time.time, mirror_keys: str | None = ">",
                 **options) -> None:
        self.server, self.port, self.clock, self.mirror_keys = server, port or server.port, clock, mirror_keys
        self.options = options

    async def start(self, follow: bool = True) -> "Replica":
        creds = self.server.credentials("policy")
        self.nc = await jetstream.connect("policy", {
            "servers": [f"nats://127.0.0.1:{self.port}"], "user": "policy", "password": creds["NATS_PASSWORD"],
            "inbox_prefix": creds["NATS_INBOX_PREFIX"]})
        spec = jetstream.KvSpec(BUCKET, TTL, mirror_keys=self.mirror_keys)
        await self.server.provision(buckets=[spec])  # as the chart's init container does
        kv = await jetstream.open_kv(self.nc.jetstream(timeout=2), spec)
        self.mirror = KvMirror(self.nc, BUCKET, clock=self.clock, **self.options)
        self.counters = Counters(kv, self.mirror)
        if follow:
            await self.mirror.start()
        return self

    def sees(self, key: str) -> int | None:
        """What this replica's mirror answers for ``key`` (None: it cannot, the counters read KV)."""
        found = self.mirror.lookup(key)
        return None if found is None else found[0]

    async def stop(self) -> None:
        await self.mirror.close()
        await self.nc.close()


async def test_a_write_by_one_replica_is_read_from_the_others_mirror_within_milliseconds(nats_server):
    a, b = await Replica(nats_server).start(), await Replica(nats_server).start()
    try:
        key = f"login.{key_part('alice' + chr(0) + '203.0.113.9')}"
        assert a.sees(key) == b.sees(key) == 0, "both mirrors read whole: nothing counted yet"
        started = time.monotonic()
        assert await a.counters.reserve(key, 5)
        assert a.sees(key) == 1, "the writer's own write, at once"
        await eventually_async(lambda: b.sees(key) == 1, timeout=5, interval=0.001)
        took = time.monotonic() - started
        print(f"\nanother replica's mirror had the write {took * 1000:.1f} ms after it began")
        assert took < 1.0

        # Forty writes from both at once: each mirror ends at KV's exact count.
        await asyncio.gather(*(r.counters.incr(key) for _ in range(20) for r in (a, b)))
        entry = await a.counters.kv.get(key)
        assert int(entry.value) == 41
        await eventually_async(lambda: a.sees(key) == b.sees(key) == 41, timeout=5)
        assert b.mirror.lookup(key) == (41, entry.revision), "the revision too, for the next compare-and-set"

        # A compare-and-set that lost is published on the bucket's subjects all the same; the
        # mirror, fed by what the bucket stored, never counts it.
        with pytest.raises(KeyWrongLastSequenceError):
            await b.counters.kv.update(key, b"0", last=entry.revision - 1)
        marker = f"client.{key_part('198.51.100.1')}"
        await a.counters.incr(marker)  # stored after the refused write: once b has it, it had that
        await eventually_async(lambda: b.sees(marker) == 1, timeout=5)
        assert b.sees(key) == 41

        # The room left is taken by compare-and-set in KV from both replicas at once: never more.
        room = f"login.{key_part('bob')}"
        granted = await asyncio.gather(*(r.counters.reserve(room, 10) for _ in range(15) for r in (a, b)))
        assert granted.count(True) == 10
        await eventually_async(lambda: a.sees(room) == b.sees(room) == 10, timeout=5)
    finally:
        await a.stop()
        await b.stop()


async def test_a_replica_reads_its_own_writes_at_once_and_an_older_write_arriving_late_changes_nothing(nats_server):
    import nats

    a = await Replica(nats_server).start()
    late = []
    tap = await nats.connect(nats_server.url)  # the admin user: a copy of what the server republishes

    async def keep(msg):
        late.append(msg)

    await tap.subscribe(jetstream.mirror_subject(BUCKET), cb=keep)
    try:
        await a.mirror._sub.unsubscribe()  # the server's copies of a's writes now never come
        key = f"login.{key_part('dave')}"
        for n in range(1, 4):
            assert await a.counters.reserve(key, 5)
            assert a.sees(key) == n, "its own write, acknowledged by KV"
        await eventually_async(lambda: len(late) == 3, timeout=5)
        for msg in late:  # the server's copies, the newest last: the count stays the newest
            await a.mirror._on_message(msg)
        assert a.mirror.lookup(key) == (3, int(late[-1].headers["Nats-Sequence"]))
        await a.mirror._on_message(late[0])  # an older one arriving after
        assert a.sees(key) == 3
    finally:
        await tap.close()
        await a.stop()


async def test_an_entry_counts_until_its_writes_time_plus_the_buckets_max_age(nats_server):
    later = [0.0]
    a = await Replica(nats_server).start()
    key = f"client.{key_part('192.0.2.7')}"
    await a.counters.incr(key)
    await a.counters.incr(key)
    # A second replica started after the writes: the whole read takes each entry's time from KV.
    b = await Replica(nats_server, clock=lambda: time.time() + later[0]).start()
    try:
        assert b.sees(key) == 2
        later[0] = TTL - 2
        assert b.sees(key) == 2, "still within the bucket's max age"
        later[0] = TTL + 1
        assert b.sees(key) == 0, "expired, though nothing was published"
        assert await b.counters.get(key) == 0
        b.mirror.sweep()
        assert len(b.mirror) == 0, "and forgotten"

        # A write followed: its time is the server's, from the republished message.
        later[0] = 0
        await a.counters.incr(key)
        await eventually_async(lambda: b.sees(key) == 3, timeout=5)
        later[0] = TTL - 2
        assert b.sees(key) == 3
        later[0] = TTL + 1
        assert b.sees(key) == 0
    finally:
        await a.stop()
        await b.stop()


async def test_a_delete_or_a_purge_clears_the_count_on_every_replica(nats_server):
    a, b = await Replica(nats_server).start(), await Replica(nats_server).start()
    try:
        kv = a.counters.kv
        for name, clear in (("deleted", kv.delete), ("purged", kv.purge)):
            key = f"login.{key_part(name)}"
            for _ in range(3):
                await a.counters.incr(key)
            await eventually_async(lambda: b.sees(key) == 3, timeout=5)
            await clear(key)  # what an operator does to lift a lockout
            await eventually_async(lambda: a.sees(key) == b.sees(key) == 0, timeout=5)
            assert await b.counters.reserve(key, 5), "counting starts again after it"
            await eventually_async(lambda: a.sees(key) == b.sees(key) == 1, timeout=5)
            assert int((await kv.get(key)).value) == 1
    finally:
        await a.stop()
        await b.stop()


async def test_a_mirror_that_may_have_missed_a_write_never_answers(nats_server):
    writer = await Replica(nats_server).start()
    proxy = CuttableProxy(nats_server.port)
    await proxy.start()
    r = await Replica(nats_server, port=proxy.port).start(follow=False)
    try:
        key = f"login.{key_part('carol')}"
        await writer.counters.incr(key)
        assert r.sees(key) is None, "not read whole yet: the counters read KV"
        assert await r.counters.get(key) == 1
        await r.mirror.start()
        assert r.sees(key) == 1

        await proxy.cut()
        await eventually_async(lambda: not r.nc.is_connected)
        await writer.counters.incr(key)  # published while r cannot hear it
        assert r.sees(key) is None, "cut off from NATS: no answer from the mirror"
        with pytest.raises(Exception):
            await r.counters.get(key)  # as before the mirror: the read fails (AUTH: 451)

        await proxy.start()  # back: reconnected, but a write was missed until it is read again
        await eventually_async(lambda: r.nc.is_connected, timeout=10)
        await eventually_async(lambda: r.sees(key) == 2, timeout=10)
    finally:
        await r.stop()
        await writer.stop()
        proxy.server.close()


async def test_a_bucket_whose_writes_are_not_republished_is_read_from_kv(nats_server):
    # (a bucket another version made, or an operator changed): the mirror would hear nothing.
    r = await Replica(nats_server, mirror_keys=None).start()
    try:
        key = f"client.{key_part('192.0.2.8')}"
        await r.counters.incr(key)
        assert r.sees(key) is None
        assert await r.counters.get(key) == 1
        # The next provisioning of the same bucket republishes its writes: mirrored from then on.
        await nats_server.provision(buckets=[jetstream.KvSpec(BUCKET, TTL, mirror_keys=">")])
        await eventually_async(lambda: r.sees(key) == 1, timeout=15)
    finally:
        await r.stop()


async def test_a_mirror_that_does_not_hear_its_own_writes_back_stops_answering(nats_server):
    # (policy's NATS user without the grant to follow, say): no other replica's write would reach it.
    r = await Replica(nats_server).start()
    try:
        key = f"client.{key_part('192.0.2.9')}"
        await r.counters.incr(key)  # heard back (the server's copy may even come before KV's ack)
        r.mirror.check_heard(time.monotonic() + 60)
        assert r.sees(key) == 1, "hearing its writes: answering"

        await r.mirror._sub.unsubscribe()
        await r.counters.incr(key)
        assert r.sees(key) == 2
        r.mirror.check_heard(time.monotonic() + 60)  # (as its supervisor does every half second)
        assert r.sees(key) is None
        assert await r.counters.get(key) == 2, "read from KV"
    finally:
        await r.stop()


def test_with_nats_away_a_cached_password_is_a_temporary_failure_as_before(make_stack):
    # The mirror is not consulted while policy cannot hear the writes: the lockout reads go to
    # NATS and fail (451 4.3.0), as they did before there was a mirror. Never a 235 on a stale copy.
    from submitd_devkit.testing.users import ALICE, ALICE_PASSWORD

    from test_policy import auth_plain

    stack = make_stack(env={"policy": {"AUTH_FAILURE_DELAY": "0.05"}})
    assert auth_plain(stack, ALICE, ALICE_PASSWORD, "127.0.0.8") == 235  # (cached from now on)
    stack.nats.stop()
    assert auth_plain(stack, ALICE, ALICE_PASSWORD, "127.0.0.8") == 451
    stack.nats.start()
    eventually(lambda: auth_plain(stack, ALICE, ALICE_PASSWORD, "127.0.0.8") == 235, timeout=30)


def test_what_the_mirror_costs_in_memory_per_counter():
    class Connection:
        def jetstream(self):
            return None

    mirror = KvMirror(Connection(), BUCKET)
    n = 20_000
    keys = [f"login.{key_part(str(i))}" for i in range(n)]  # the keys exist anyway (they are made per read)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i, key in enumerate(keys):
        mirror.note(key, 1 + i % 7, 1000 + i)
    per = (tracemalloc.get_traced_memory()[0] - before) / n
    tracemalloc.stop()
    key_size = sum(map(len, keys)) / n + 49  # a str's header; the mirror holds the key too
    print(f"\nmirror: {per:.0f} bytes per counter beside its key, {per + key_size:.0f} with it")
    assert per + key_size < 300
