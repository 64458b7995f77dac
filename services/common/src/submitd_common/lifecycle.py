"""Graceful shutdown: every start step registers its finalizer; SIGTERM runs them in reverse."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

log = logging.getLogger(__name__)


async def wait_for_signal(*signals: signal.Signals) -> signal.Signals:
    """Return the first of ``signals`` (default SIGTERM, SIGINT) delivered to the process."""
    signals = signals or (signal.SIGTERM, signal.SIGINT)
    loop = asyncio.get_running_loop()
    got: asyncio.Future[signal.Signals] = loop.create_future()
    for sig in signals:
        loop.add_signal_handler(sig, lambda s=sig: got.done() or got.set_result(s))
    try:
        return await got
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


def run(amain) -> None:
    """Run a service's async main (on uvloop, where installed: it spends fewer cycles per
    socket operation); Ctrl-C before the handlers exist still exits quietly."""
    try:
        import uvloop
    except ImportError:
        uvloop = None
    with contextlib.suppress(KeyboardInterrupt):
        if uvloop is not None:
            uvloop.run(amain())
        else:
            asyncio.run(amain())
