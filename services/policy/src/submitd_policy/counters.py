"""Counters shared by every policy replica, in NATS KV.

Rates count per fixed window (the key names the window); authentication failures count in a
bucket whose entries expire a lockout period after the last failure. Keys carry hashes of
logins and addresses, never the values themselves.

With a ``mirror`` (``mirror.py``), the keys it covers are read from this replica's copy while it
is current (an AUTH's lockout checks read nothing remote), and a compare-and-set starts from
it; every write is still a compare-and-set in KV, so counting stays exact across replicas.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import logging
import random
import time
from collections.abc import Callable

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from prometheus_client import Counter

from .mirror import KvMirror

log = logging.getLogger("submitd.policy")
READS = Counter("submitd_policy_counter_reads_total", "Counter reads, from this replica's mirror or from NATS KV",
                ["source"])
FROM_MIRROR, FROM_KV = READS.labels("mirror"), READS.labels("nats")


def key_part(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()[:32]


class Counters:
    def __init__(self, kv: KeyValue, mirror: KvMirror | None = None) -> None:
        self.kv = kv
        self.mirror = mirror

    def _mirrored(self, key: str) -> tuple[int, int | None] | None:
        """(value, revision) from the mirror; None when it does not cover the key or cannot answer."""
        if self.mirror is None or not self.mirror.covers(key):
            return None
        return self.mirror.lookup(key)

    async def get(self, key: str) -> int:
        found = self._mirrored(key)
        if found is not None:
            FROM_MIRROR.inc()
            return found[0]
        FROM_KV.inc()
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            return 0
        return int(entry.value or b"0")

    async def incr(self, key: str) -> int:
        return await self.add(key, 1)

    async def add(self, key: str, delta: int) -> int:
        """Add ``delta`` (never below zero), atomically across replicas; returns the new value."""
        return await self._compare_and_set(key, lambda value: max(0, value + delta))

    async def reserve(self, key: str, limit: int, already: int = 0) -> bool:
        """Add one unless the counter (plus ``already``, counted elsewhere) has reached ``limit``,
        atomically across replicas: N callers at once get at most the room left, never more."""
        return await self._compare_and_set(key, lambda value: value + 1 if value + already < limit else None) is not None

    async def _compare_and_set(self, key: str, change: Callable[[int], int | None]) -> int | None:
        """Write ``change(value)`` on the revision it was read at, again while another replica
        wrote in between; None, writing nothing, when ``change`` refuses. The first try starts
        from the mirror's value and revision when it has them (a stale one only loses the race)."""
        for attempt in range(50):
            if attempt:
                await asyncio.sleep(random.uniform(0, 0.002 * attempt))
            found = None if attempt else self._mirrored(key)
            if found is not None:
                FROM_MIRROR.inc()
                value, revision = found
            else:
                FROM_KV.inc()
                try:
                    entry = await self.kv.get(key)
                    value, revision = int(entry.value or b"0"), entry.revision
                except KeyNotFoundError:
                    value, revision = 0, None
            new = change(value)
            if new is None or new == value:
                return new  # refused, or nothing to change (a zero staying zero)
            try:
                if revision is None:
                    revision = await self.kv.create(key, str(new).encode())
                else:
                    revision = await self.kv.update(key, str(new).encode(), last=revision)
            except KeyWrongLastSequenceError:
                continue
            if self.mirror is not None and self.mirror.covers(key):
                self.mirror.note(key, new, revision)
            return new
        raise RuntimeError(f"counter {key} too contended")

    async def has(self, key: str) -> bool:
        try:
            await self.kv.get(key)
        except KeyNotFoundError:
            return False
        return True

    async def mark(self, key: str) -> None:
        await self.kv.put(key, b"1")


def window_key(kind: str, who: str, window: int, now: float | None = None) -> str:
    return f"{kind}.{key_part(who)}.{int((time.time() if now is None else now) // window)}"


class SlidingWindow:
    """A count over the last ``window`` seconds, estimated from two fixed windows (the current
    one, and the previous one weighted by how much of it is still inside), rounded up: a burst
    across a window's edge gets no more than ``limit`` either."""

    def __init__(self, counters: Counters, kind: str, window: int) -> None:
        self.counters, self.kind, self.window = counters, kind, window

    async def parts(self, who: str) -> tuple[str, int]:
        """The current window's key, and what the previous window still counts for."""
        now = time.time()
        previous = await self.counters.get(window_key(self.kind, who, self.window, now - self.window))
        inside = 1 - (now % self.window) / self.window
        return window_key(self.kind, who, self.window, now), math.ceil(previous * inside)

    async def count(self, who: str) -> int:
        key, earlier = await self.parts(who)
        return earlier + await self.counters.get(key)
