"""What the policy's in-memory copies of a KV bucket share (the lockout mirror, mirror.py, and the
app passwords, apppasswords.py): a copy is current while it was read whole since the connection's
last reconnect (a change may have gone by unheard during one) and the connection is up; it is
read whole again after a reconnect, every ``resync_seconds``, and after a failed read (backing off
from 0.5 s to 10 s)."""

from __future__ import annotations

import asyncio
import logging
import time

log = logging.getLogger("submitd.policy")


class LocalCopy:
    what = "a bucket"  # for the log

    def __init__(self, nc, resync_seconds: float) -> None:
        self.nc = nc
        self.resync_seconds = resync_seconds
        self._loaded_at: float | None = None  # monotonic time of the last whole read
        self._loaded_reconnects = -1
        self._supervisor: asyncio.Task | None = None

    async def reload(self) -> None:
        raise NotImplementedError

    def _loaded(self, reconnects: int) -> None:
        """A whole read that began at ``reconnects`` reconnections has been applied."""
        self._loaded_at, self._loaded_reconnects = time.monotonic(), reconnects

    @property
    def current(self) -> bool:
        return (self._loaded_at is not None and self.nc.is_connected
                and self.nc.stats["reconnects"] == self._loaded_reconnects)

    async def _start_reading(self, timeout: float) -> None:
        """The first whole read, waited for up to ``timeout``; then kept current in the background."""
        try:
            await asyncio.wait_for(self.reload(), timeout)
        except Exception as e:
            log.warning("%s not read yet: %s", self.what, type(e).__name__)
        self._supervisor = asyncio.create_task(self._keep_current())

    def _tick(self) -> None:
        """Each pass of the keeping loop, connected or not (a subclass's housekeeping)."""

    async def _keep_current(self, every: float = 0.5) -> None:
        failures = 0
        while True:
            await asyncio.sleep(min(every * 2 ** failures, 10))
            self._tick()
            if not self.nc.is_connected:
                continue
            stale = self._loaded_at is None or self.nc.stats["reconnects"] != self._loaded_reconnects
            if not stale and time.monotonic() - self._loaded_at < self.resync_seconds:
                continue
            try:
                await self.reload()
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as e:
                failures = min(failures + 1, 5)
                log.warning("%s not read: %s: %s", self.what, type(e).__name__, e)
