"""The chain of directories, and what every directory shares.

- The first directory that knows a login answers for it. One that cannot answer before that
  (down, slow) makes the lookup unavailable (454 4.7.0): whether a later one would have known the
  login does not matter, the earlier one might know it better.
- Answers from remote directories are cached ``ttl`` seconds (``directory_cache_seconds``): a
  change in the directory (a new password hash, a suspended account, new addresses) is seen within
  it. "Not known" is cached for at most a minute. The users file is in memory already and never
  cached here: its reload is seen at once.
- While a directory is unavailable, a login it answered for within ``ttl + grace`` keeps its
  last answer (``directory_grace_seconds``): sessions of users already known keep working.
- Every request has ``timeout`` seconds; slower is unavailable. Lookups of one login at one time
  share one request.
- Metrics per directory (requests by outcome, latency) and a span per request under the AUTH's.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict

from opentelemetry import trace

from .. import metrics
from .base import Account, Directory, DirectoryUnavailable

tracer = trace.get_tracer("submitd.policy")
NEGATIVE_SECONDS = 60.0


class Directories:
    def __init__(self, directories: list[Directory], *, ttl: float, grace: float, timeout: float,
                 max_entries: int = 100_000, clock=time.monotonic) -> None:
        if not directories:
            raise ValueError("no directory configured")
        self.directories = directories
        self.by_name = {d.name: d for d in directories}
        self.ttl, self.grace, self.timeout = ttl, grace, timeout
        self.max_entries = max_entries
        self.clock = clock
        self._cache: OrderedDict[str, tuple[Account | None, float]] = OrderedDict()  # login -> (answer, when)
        self._running: dict[str, asyncio.Future] = {}

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.directories]

    def ready(self) -> dict[str, bool]:
        return {d.name: d.ready() for d in self.directories}

    def forget(self, login: str) -> None:
        """Drop a login's cached answer (the users API shows the directory's answer now)."""
        self._cache.pop(login, None)

    async def lookup(self, login: str) -> Account | None:
        entry = self._cache.get(login)
        if entry is not None:
            account, when = entry
            age = self.clock() - when
            if age < (self.ttl if account is not None else min(self.ttl, NEGATIVE_SECONDS)):
                metrics.DIRECTORY_CACHE.labels("fresh").inc()
                self._cache.move_to_end(login)
                return account
        running = self._running.get(login)
        if running is None:
            running = self._running[login] = asyncio.ensure_future(self._lookup(login))
            running.add_done_callback(lambda f, login=login: self._finished(login, f))
        return await asyncio.shield(running)

    def _finished(self, login: str, future: asyncio.Future) -> None:
        if self._running.get(login) is future:
            del self._running[login]
        if not future.cancelled():
            future.exception()  # retrieved: every waiter may have gone

    async def _lookup(self, login: str) -> Account | None:
        remote = False
        for directory in self.directories:
            remote = remote or directory.remote
            try:
                account = await self._call(directory, "lookup", directory.lookup(login))
            except DirectoryUnavailable:
                stale = self._stale(login)
                if stale is not None:
                    metrics.DIRECTORY_CACHE.labels("stale").inc()
                    return stale
                raise
            if account is not None:
                if directory.remote:
                    self._remember(login, account)
                else:
                    self._cache.pop(login, None)
                metrics.DIRECTORY_CACHE.labels("miss").inc()
                return account
        if remote:
            self._remember(login, None)
        metrics.DIRECTORY_CACHE.labels("miss").inc()
        return None

    def _stale(self, login: str) -> Account | None:
        """The login's last answer while it is within ttl + grace (None for 'not known')."""
        entry = self._cache.get(login)
        if entry is None or entry[0] is None or self.clock() - entry[1] >= self.ttl + self.grace:
            return None
        return entry[0]

    def within_grace(self, login: str, account: Account) -> bool:
        """Whether a cached login (as it was asked: a directory may spell it otherwise, "Alice"
        for "alice") may still be served while its directory is down."""
        return self._stale(login) is not None or not self.by_name[account.source].remote

    def _remember(self, login: str, account: Account | None) -> None:
        self._cache[login] = (account, self.clock())
        self._cache.move_to_end(login)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)

    async def listing(self, directory: Directory, limit: int) -> list[Account]:
        """A page of the accounts ``directory`` knows (submitctl user ls)."""
        return await self._call(directory, "accounts", directory.accounts(limit))

    async def check_password(self, account: Account, password: str) -> bool:
        """Asks the account's own directory (accounts without a hash). Raises DirectoryUnavailable."""
        directory = self.by_name[account.source]
        return await self._call(directory, "check_password", directory.check_password(account, password))

    async def _call(self, directory: Directory, operation: str, request):
        """One request to a directory, timed out, traced and counted (one in memory, the users
        file, is neither: it cannot be slow or down, and a span per AUTH would be its whole cost)."""
        if not directory.remote:
            return await request
        started = time.perf_counter()
        with tracer.start_as_current_span(f"directory.{operation}", attributes={"submitd.directory": directory.name}) as span:
            try:
                async with asyncio.timeout(self.timeout):
                    result = await request
            except (DirectoryUnavailable, TimeoutError, OSError) as e:
                outcome = "unavailable"
                span.set_status(trace.StatusCode.ERROR, type(e).__name__)
                if not isinstance(e, DirectoryUnavailable):
                    e = DirectoryUnavailable(f"{directory.name}: no answer within {self.timeout:g} s"
                                             if isinstance(e, TimeoutError) else f"{directory.name}: {type(e).__name__}")
                raise e from None
            else:
                outcome = {"lookup": "found" if result is not None else "unknown",
                           "check_password": "match" if result else "mismatch"}.get(operation, "ok")
                return result
            finally:
                span.set_attribute("submitd.directory.outcome", outcome)
                metrics.DIRECTORY_REQUESTS.labels(directory.name, operation, outcome).inc()
                metrics.DIRECTORY_SECONDS.labels(directory.name, operation).observe(time.perf_counter() - started)

    async def close(self) -> None:
        for directory in self.directories:
            await directory.close()
