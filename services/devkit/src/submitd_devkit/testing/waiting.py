"""Waiting in tests for something a real process does in its own time."""

from __future__ import annotations

import time


def eventually(predicate, timeout: float = 15, interval: float = 0.1):
    """The first truthy value of ``predicate()`` within ``timeout`` seconds, else AssertionError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"not true within {timeout}s: {predicate}")
