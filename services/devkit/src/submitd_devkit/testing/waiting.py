"""Waiting in tests for something a real process does in its own time."""

from __future__ import annotations

import asyncio
import inspect
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


async def eventually_async(predicate, timeout: float = 15, interval: float = 0.05):
    """``eventually`` inside an event loop: ``predicate`` may be a coroutine function, and the
    loop goes on running while it waits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        await asyncio.sleep(interval)
    raise AssertionError(f"not true within {timeout}s: {predicate}")
