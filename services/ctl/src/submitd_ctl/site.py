"""What every command does the same way on a cluster and on a local directory: read the files,
change them, write them back only over the version read (retrying a concurrent change), and wait
until the services use what was written."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Protocol

from submitd_common.files import digest

from .documents import Files

# Which services read which file (and under which name they export its digest).
READERS = {
    "users": [("policy", "users"), ("rewriter", "users")],
    "dkim": [("rewriter", "dkim_keys")],
}
WATCHED = {"users": "users.yaml", "dkim": "keys.yaml"}
_LOADED = re.compile(r'^submitd_config_file_info\{([^}]*)\}\s+1(?:\.0)?\s*$', re.M)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


class SiteError(RuntimeError):
    """The cluster or the local stack cannot be reached or read: exit code 2."""


class Conflict(SiteError):
    """Somebody else changed the same files in between."""


class Site(Protocol):
    unreachable_hint: str  # said when no service answers
    lag_hint: str  # said when some replica does not use the change yet

    def read(self, what: str) -> tuple[Files, str]: ...
    def write(self, what: str, files: Files, version: str) -> None: ...
    def loaded(self, service: str, file: str) -> dict[str, str | None]: ...
    def admin(self, method: str, path: str, body: bytes | None = None, service: str = "relay") -> tuple[int, bytes]: ...
    def status(self) -> dict: ...


def parse_loaded(metrics_text: str) -> dict[str, str]:
    """``submitd_config_file_info`` samples of a /metrics page: file -> SHA-256 in use."""
    out = {}
    for match in _LOADED.finditer(metrics_text):
        labels = dict(_LABEL.findall(match.group(1)))
        if "file" in labels and "sha256" in labels:
            out[labels["file"]] = labels["sha256"]
    return out


def edit(site: Site, what: str, change: Callable[[Files], Files], attempts: int = 5) -> Files:
    """Apply ``change`` to the current files and write the result over exactly the version it
    was computed from. A concurrent writer makes the write fail; the change is then computed
    again from the new files (it may now refuse: e.g. the user was just added by someone else)."""
    for attempt in range(attempts):
        files, version = site.read(what)
        new = change(files)
        try:
            site.write(what, new, version)
            return new
        except Conflict:
            if attempt + 1 == attempts:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def wait_loaded(site: Site, what: str, files: Files, timeout: float,
                interval: float = 1.0) -> dict[str, dict[str, str | None]]:
    """Wait until every replica of every reader uses ``files``' version of the watched file.
    Returns service -> replica -> digest in use at the end (the caller says which lag)."""
    want = digest(files.get(WATCHED[what], b""))
    deadline = time.monotonic() + timeout
    while True:
        seen = {service: site.loaded(service, name) for service, name in READERS[what]}
        if all(v == want for replicas in seen.values() for v in replicas.values()) and all(seen.values()):
            return seen
        if all(v is None for replicas in seen.values() for v in replicas.values()):
            return seen  # nothing answers (not running, or not reachable): nothing to wait for
        if time.monotonic() >= deadline:
            return seen
        time.sleep(interval)


def lagging(seen: dict[str, dict[str, str | None]], files: Files, what: str) -> list[str]:
    want = digest(files.get(WATCHED[what], b""))
    return [f"{service}/{replica}" + (" (unreachable)" if v is None else "")
            for service, replicas in seen.items() for replica, v in replicas.items() if v != want] + [
        f"{service} (no replica)" for service, replicas in seen.items() if not replicas]
