"""Checking AUTH credentials without letting password hashing decide the service's capacity.

An argon2id verification costs a quarter of a CPU-second and 64 MiB at the usual parameters, on
purpose. A mail client authenticates on every send, so the verified credentials are remembered
(as Dovecot's auth_cache does): a repeated AUTH with the same password is an HMAC, not a hash.

- The cache holds, per login, an HMAC-SHA256 under a random per-process key of (login, the
  user's current password hash, the password): no password and no reusable verifier is stored,
  and a changed hash in the users file misses by construction. Entries expire after
  ``auth_cache_seconds``; at most ``auth_cache_entries`` are kept (least recently used go first);
  when the users file changes, the entries of every user whose entry changed are dropped.
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

from submitd_common.files import WatchedFile
from submitd_common.users import User, UserDB, dummy_hash, verify_password

from . import metrics


class HashingBusy(Exception):
    """More verifications are waiting than ``password_hash_queue`` allows."""


class VerifiedCache:
    def __init__(self, ttl: float, max_entries: int, clock=time.monotonic) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self.clock = clock
        self._key = os.urandom(32)
        self._entries: OrderedDict[str, tuple[bytes, float]] = OrderedDict()  # login -> (mac, expiry)

    def _mac(self, user: User, password: str) -> bytes:
        return self.key(user.login, user.password_hash, password)

    def key(self, login: str, password_hash: str, password: str) -> bytes:
        """HMAC of (login, current hash, password) under this process's random key."""
        material = b"\0".join((login.encode(), password_hash.encode(), password.encode()))
        return hmac.new(self._key, material, hashlib.sha256).digest()

    def __len__(self) -> int:
        return len(self._entries)

    def hit(self, user: User, password: str) -> bool:
        entry = self._entries.get(user.login)
        if entry is None or self.ttl <= 0:
            return False
        mac, expiry = entry
        if self.clock() >= expiry:
            del self._entries[user.login]
            return False
        if not hmac.compare_digest(mac, self._mac(user, password)):
            return False
        self._entries.move_to_end(user.login)
        return True

    def remember(self, user: User, password: str) -> None:
        if self.ttl <= 0 or self.max_entries <= 0:
            return
        self._entries[user.login] = (self._mac(user, password), self.clock() + self.ttl)
        self._entries.move_to_end(user.login)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def forget_changed(self, old: UserDB, new: UserDB) -> int:
        """Drop the entries of users whose entry differs between ``old`` and ``new``."""
        changed = [login for login in self._entries if old.users.get(login) != new.users.get(login)]
        for login in changed:
            del self._entries[login]
        return len(changed)


class Authenticator:
    def __init__(
        self,
        users: WatchedFile[UserDB],
        *,
        concurrency: int,
        queue: int,
        cache_seconds: float,
        cache_entries: int,
    ) -> None:
        self.users = users
        self.cache = VerifiedCache(cache_seconds, cache_entries)
        self._pool = ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="password-hash")
        self._queue_limit = max(1, concurrency) + max(0, queue)
        self._pending = 0
        self._running: dict[bytes, asyncio.Future[bool]] = {}  # verifications in progress
        self._db_seen = users.value

    def _follow_reloads(self, db: UserDB) -> None:
        if db is not self._db_seen:
            self.cache.forget_changed(self._db_seen, db)
            self._db_seen = db

    async def authenticate(self, login: str, password: str, admit=None) -> User | None:
        """The user if the password matches and the account is active, else None.

        ``admit``, if given, is awaited just before a password would be checked (not for a
        cached credential, nor for an attempt that joins a check in progress); False refuses
        with Locked. Raises HashingBusy when the verification queue is full.
        """
        db = self.users.value
        self._follow_reloads(db)
        user = db.users.get(login)
        if user is not None and not user.suspended and self.cache.hit(user, password):
            metrics.AUTH_CACHE.labels("hit").inc()
            return user
        metrics.AUTH_CACHE.labels("miss").inc()
        # An unknown login costs what a known one costs: its password is checked against a
        # dummy hash (None here: made, the first time, in the hashing thread, not on the loop).
        hashed = user.password_hash if user is not None else None
        key = self.cache.key(login, hashed or "", password)
        while True:
            running = self._running.get(key)
            if running is None:
                # Registered before anything is awaited, admission included: an attempt that
                # arrives while this one is still being admitted joins it, and reserves nothing.
                running = self._running[key] = asyncio.ensure_future(self._admit_and_verify(user, hashed, password, admit))
                running.add_done_callback(lambda future, key=key: self._finished(key, future))
                ok = await asyncio.shield(running)
                break
            try:
                ok = await asyncio.shield(running)
                break
            except Locked:  # that attempt's limits refused it, not ours: be admitted on our own
                if self._running.get(key) is running:
                    del self._running[key]
        if not ok or user is None or user.suspended:
            return None
        return user

    async def _admit_and_verify(self, user: User | None, hashed: str | None, password: str, admit) -> bool:
        """Admission, one verification, and on a match the cache entry, before any waiter hears
        the answer (an attempt arriving just after it finds the cache, not an empty slot)."""
        if admit is not None and not await admit():
            raise Locked
        ok = await self._verify(hashed, password)
        if ok and user is not None and not user.suspended:
            self.cache.remember(user, password)
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
