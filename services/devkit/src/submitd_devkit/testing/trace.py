"""The Received field submitd puts on top of every message (RFC 5321 §4.4), for tests that
compare what was sent with what arrived."""

from __future__ import annotations

import re

_OURS = re.compile(rb"\A((?:DKIM-Signature:.*?\r\n(?![ \t]))*)(Received: .*? \(submitd\) .*?\r\n(?![ \t]))", re.S | re.I)


def without_received(data: bytes) -> bytes:
    """``data`` without the Received field submitd added (any DKIM signatures above it stay);
    fails if there is none."""
    m = _OURS.match(data)
    assert m, f"no Received field of submitd's on top: {data[:300]!r}"
    return m.group(1) + data[m.end():]
