"""Counters shared by every policy replica, in NATS KV.

Rates count per fixed window (the key names the window); authentication failures count in a
bucket whose entries expire a lockout period after the last failure. Keys carry hashes of
logins and addresses, never the values themselves.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import logging
import time

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

log = logging.getLogger("submitd.policy")


def key_part(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()[:32]


class Counters:
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def get(self, key: str) -> int:
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            return 0
        return int(entry.value or b"0")

    async def incr(self, key: str) -> int:
        return await self.add(key, 1)

    async def add(self, key: str, delta: int) -> int:
        """Add ``delta`` (never below zero), atomically across replicas (compare-and-set on the
        revision); returns the new value."""
        for attempt in range(50):
            if attempt:
                await asyncio.sleep(random.uniform(0, 0.002 * attempt))
            try:
                entry = await self.kv.get(key)
            except KeyNotFoundError:
                if delta <= 0:
                    return 0
                try:
                    await self.kv.create(key, str(delta).encode())
                    return delta
                except KeyWrongLastSequenceError:
                    continue
            value = max(0, int(entry.value or b"0") + delta)
            try:
                await self.kv.update(key, str(value).encode(), last=entry.revision)
                return value
            except KeyWrongLastSequenceError:
                continue
        raise RuntimeError(f"counter {key} too contended")


def window_key(kind: str, who: str, window: int) -> str:
    return f"{kind}.{key_part(who)}.{int(time.time() // window)}"
