"""Checking AUTH credentials without letting password hashing decide the service's capacity.

An argon2id verification costs a quarter of a CPU-second and 64 MiB at the usual parameters, on
purpose. A mail client authenticates on every send, so the verified credentials are remembered
(as Dovecot's auth_cache does): a repeated AUTH with the same password is an HMAC, not a hash.

- Logins come from the directory chain (``directories``): the users file, LDAP, SQL. The
  account is looked up first (cached by the chain for ``directory_cache_seconds``); a directory
  that cannot answer raises DirectoryUnavailable (454 4.7.0, never 535).
- The cache holds, per login, an HMAC-SHA256 under a random per-process key of (login, the
  directory, the account's current password hash, the password): no password and no reusable
  verifier is stored, and a changed hash (a reloaded users file, a row or an LDAP entry read
  again after the chain's TTL) misses by construction. A directory that hands out no hash (an
  LDAP bind) is asked again once the entry is older than the chain's TTL: an old password stops
  working within it. While that directory is down, the entry keeps working for the chain's
  grace. Entries expire after ``auth_cache_seconds``; at most ``auth_cache_entries`` are kept
  (least recently used go first). A suspended account is refused whatever the cache holds.
- Hashes are verified in a pool of ``password_hash_concurrency`` threads (argon2-cffi releases
  the GIL), so the event loop never waits for one and memory is bounded by the concurrency
  times the hash's memory cost. At most ``password_hash_queue`` more wait for a thread; past
  that, AUTH answers 454 4.7.0 at once instead of queueing without bound.
- Only successes are cached. A failure always costs a full verification, which is why the
  lockout counters are read before any hash is computed (see lockouts.py).
- Attempts with the same login and password at the same moment share one verification (a client
  that opens 50 sessions at once after its cache entry expired costs one hash, and none of
  them is refused for a full queue or counted as a guess before its answer): the first one
  registers the check before it awaits anything, its admission by the lockouts included, and
  the others wait for it. A failed one counts against the lockouts once per attempt; one whose
  check was refused by the first attempt's limits is admitted on its own.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

from submitd_common.users import User, dummy_hash, verify_password

from . import metrics
from .directories.base import Account, DirectoryUnavailable
from .directories.chain import Directories


class HashingBusy(Exception):
    """More verifications are waiting than ``password_hash_queue`` allows."""


class VerifiedCache:
    def __init__(self, ttl: float, max_entries: int, clock=time.monotonic) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self.clock = clock
        self._key = os.urandom(32)
        self._entries: OrderedDict[str, tuple[bytes, float, float]] = OrderedDict()  # login -> (mac, expiry, checked)

    def _mac(self, account: Account, password: str) -> bytes:
        return self.key(account.login, f"{account.source}\0{account.verifier}", password)

    def key(self, login: str, verifier: str, password: str) -> bytes:
        """HMAC of (login, what the password is checked against, password) under this process's key."""
        material = b"\0".join((login.encode(), verifier.encode(), password.encode()))
        return hmac.new(self._key, material, hashlib.sha256).digest()

    def __len__(self) -> int:
        return len(self._entries)

    def hit(self, account: Account, password: str, max_age: float | None = None) -> bool:
        """Whether ``password`` was verified for the account as it is now, within ``max_age``
        seconds of its check when given."""
        entry = self._entries.get(account.login)
        if entry is None or self.ttl <= 0:
            return False
        mac, expiry, checked = entry
        now = self.clock()
        if now >= expiry:
            del self._entries[account.login]
            return False
        if not hmac.compare_digest(mac, self._mac(account, password)):
            return False
        if max_age is not None and now - checked >= max_age:
            return False
        self._entries.move_to_end(account.login)
        return True

    def remember(self, account: Account, password: str) -> None:
        if self.ttl <= 0 or self.max_entries <= 0:
            return
        now = self.clock()
        self._entries[account.login] = (self._mac(account, password), now + self.ttl, now)
        self._entries.move_to_end(account.login)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


class Authenticator:
    def __init__(
        self,
        directories: Directories,
        *,
        concurrency: int,
        queue: int,
        cache_seconds: float,
        cache_entries: int,
    ) -> None:
        self.directories = directories
        self.cache = VerifiedCache(cache_seconds, cache_entries)
        self._pool = ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="password-hash")
        self._queue_limit = max(1, concurrency) + max(0, queue)
        self._pending = 0
        self._running: dict[bytes, asyncio.Future[bool]] = {}  # verifications in progress

    async def authenticate(self, login: str, password: str, admit=None) -> User | None:
        """The user if the password matches and the account is active, else None.

        ``admit``, if given, is awaited just before a password would be checked (not for a
        cached credential, nor for an attempt that joins a check in progress); False refuses
        with Locked. Raises HashingBusy when the verification queue is full, and
        DirectoryUnavailable when the login's directory cannot answer (and no cached credential
        may stand in for it).
        """
        account = await self.directories.lookup(login)
        if account is not None and account.user.suspended:
            account = None  # checked like an unknown login: the reply tells nothing
        bound = account is not None and not account.verifier  # the directory checks the password
        if account is not None and self.cache.hit(account, password, self.directories.ttl if bound else None):
            metrics.AUTH_CACHE.labels("hit").inc()
            return account.user
        metrics.AUTH_CACHE.labels("miss").inc()
        # An unknown login costs what a known one costs: its password is checked against a
        # dummy hash (None here: made, the first time, in the hashing thread, not on the loop).
        verifier = (f"{account.source}\0{account.verifier}") if account is not None else ""
        key = self.cache.key(login, verifier, password)
        while True:
            running = self._running.get(key)
            own = running is None
            if own:
                # Registered before anything is awaited, admission included: an attempt that
                # arrives while this one is still being admitted joins it, and reserves nothing.
                running = self._running[key] = asyncio.ensure_future(self._admit_and_verify(account, password, admit))
                running.add_done_callback(lambda future, key=key: self._finished(key, future))
            try:
                ok = await asyncio.shield(running)
                break
            except Locked:
                if own:
                    raise
                # That attempt's limits refused it, not ours: be admitted on our own.
                if self._running.get(key) is running:
                    del self._running[key]
            except DirectoryUnavailable:
                # A login whose directory checks passwords, verified before: within the grace.
                if bound and self.cache.hit(account, password) and self.directories.within_grace(login, account):
                    metrics.AUTH_CACHE.labels("grace").inc()
                    return account.user
                raise
        return account.user if ok and account is not None else None

    async def _admit_and_verify(self, account: Account | None, password: str, admit) -> bool:
        """Admission, one verification, and on a match the cache entry, before any waiter hears
        the answer (an attempt arriving just after it finds the cache, not an empty slot)."""
        if admit is not None and not await admit():
            raise Locked
        if account is not None and not account.verifier:
            ok = bool(password) and await self.directories.check_password(account, password)
        else:
            ok = await self._verify(account.verifier if account is not None else None, password)
        if ok and account is not None:
            self.cache.remember(account, password)
        return ok

    def _finished(self, key: bytes, future: asyncio.Future) -> None:
        if self._running.get(key) is future:
            del self._running[key]
        if not future.cancelled():
            future.exception()  # (retrieved: every waiter may have gone)

    async def _verify(self, hashed: str | None, password: str) -> bool:
        if self._pending >= self._queue_limit:
            metrics.PASSWORD_VERIFICATIONS.labels("busy").inc()
            raise HashingBusy
        self._pending += 1
        metrics.PASSWORD_HASH_PENDING.set(self._pending)
        try:
            with metrics.PASSWORD_HASH_SECONDS.time():
                ok = await asyncio.get_running_loop().run_in_executor(self._pool, _check, hashed, password)
        finally:
            self._pending -= 1
            metrics.PASSWORD_HASH_PENDING.set(self._pending)
        metrics.PASSWORD_VERIFICATIONS.labels("match" if ok else "mismatch").inc()
        return ok

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class Locked(Exception):
    """No room for another password check under the lockouts (``admit`` said no)."""


def _check(hashed: str | None, password: str) -> bool:
    return verify_password(hashed if hashed is not None else dummy_hash(), password)
