"""Configuration files (a mounted Secret or ConfigMap) reloaded on change without a restart."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import yaml

log = logging.getLogger(__name__)
T = TypeVar("T")


def load_yaml(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return data


class WatchedFile(Generic[T]):
    """Holds ``parse(path)`` of a file and re-parses it when the file changes.

    A file that fails to parse keeps the last good value (and logs why); the service keeps
    working with it. Kubernetes swaps a mounted Secret by replacing a symlink, which changes
    the target's inode and mtime: both are watched.
    """

    def __init__(self, path: str, parse: Callable[[str], T], interval: float = 2.0) -> None:
        self.path = path
        self.parse = parse
        self.interval = interval
        self.value: T = parse(path)
        self.last_error: str | None = None
        self._stamp = self._stat()
        self._task: asyncio.Task | None = None

    def _stat(self) -> tuple | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def reload_if_changed(self) -> bool:
        stamp = self._stat()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            self.value = self.parse(self.path)
        except Exception as e:
            self.last_error = str(e)
            log.error("keeping the previous %s: %s", self.path, e)
            return False
        self.last_error = None
        log.info("reloaded %s", self.path)
        return True

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.reload_if_changed()

    def start(self) -> Callable[[], Awaitable[None]]:
        self._task = asyncio.create_task(self._loop(), name=f"watch {self.path}")

        async def stop() -> None:
            assert self._task is not None
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

        return stop
