"""Queue ids: short, unique, sortable by time, safe in SMTP replies and NATS subjects."""

from __future__ import annotations

import secrets
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford base32


def _b32(value: int, length: int) -> str:
    out = []
    for _ in range(length):
        out.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(out))


def new_queue_id() -> str:
    """48 bits of milliseconds then 60 random bits: 22 characters."""
    return _b32(int(time.time() * 1000), 10) + _b32(secrets.randbits(60), 12)
