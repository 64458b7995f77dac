"""Configuration files (a mounted Secret or ConfigMap) reloaded on change without a restart."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import yaml
from prometheus_client import Gauge

log = logging.getLogger(__name__)
T = TypeVar("T")

# Which content of each watched file a process is using: submitctl compares it with what it
# wrote, to say when every replica has a change (a mounted Secret reaches pods a minute or so
# after it is written).
LOADED = Gauge(
    "submitd_config_file_info",
    "The watched file in use: the SHA-256 of the content parsed last (1 for the content in use)",
    ["file", "sha256"],
)


def digest(data: bytes) -> str:
    """The identity of a file's content, as processes export it and submitctl computes it."""
    return hashlib.sha256(data).hexdigest()


def file_digest(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return digest(f.read())
    except OSError:
        return None


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

    def __init__(self, path: str, parse: Callable[[str], T], interval: float = 2.0, name: str | None = None) -> None:
        self.path = path
        self.parse = parse
        self.interval = interval
        self.name = name  # exported as submitd_config_file_info{file=name} when given
        self.digest: str | None = None
        self._stamp = self._stat()
        self.value: T = self._parse()
        self.last_error: str | None = None
        self._task: asyncio.Task | None = None

    def _parse(self) -> T:
        # The digest is taken before parsing: if the file changes in between, the stamp taken
        # before both differs from the file's, and the next check parses again.
        content_digest = file_digest(self.path)
        value = self.parse(self.path)
        if self.name:
            if self.digest is not None and self.digest != content_digest:
                LOADED.remove(self.name, self.digest)
            if content_digest is not None:
                LOADED.labels(self.name, content_digest).set(1)
        self.digest = content_digest
        return value

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
            self.value = self._parse()
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
