"""AUTH lockouts, in NATS KV buckets shared by every policy replica.

- A *client* is an address, or for IPv6 its network of ``auth_ipv6_prefix`` bits (a /64 is one
  client: a fresh address per guess does not help).
- A client with ``auth_failures_per_client`` failures is told 421 4.7.0 and disconnected.
- A login with ``auth_failures_per_login`` failures from one client gets 454 4.7.0 there.
- A login has a budget of ``auth_login_failure_budget`` failures per ``auth_login_budget_seconds``
  (a sliding window) from all the clients it never logged in from: once it is spent, AUTH for
  that login from such a client gets 454 4.7.0, while clients it has logged in from (within
  ``auth_known_address_seconds``, kept in their own bucket) go on. A botnet gets the budget's
  worth of password checks per login, not one per address, and does not lock the user out.
- Every refusal above comes before any password is checked. A guess is counted *before* its
  check, atomically (compare-and-set, ``Attempt.admit``): N guesses in parallel get at most the
  room left, never N. A right password, or a guess that was never checked (hashing busy), gives
  its count back. A guess that finds no room while this replica has checks in flight on the
  same counter waits for their outcome (a right password frees its room) instead of being
  refused for the company it arrived in.

Failure counts expire ``auth_lockout_seconds`` after the last failure. Keys carry hashes of
logins and addresses, never the values themselves.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections import OrderedDict

from submitd_common.jetstream import BUDGET_KIND

from .counters import Counters, SlidingWindow, key_part
from .settings import Settings

CLIENT, LOGIN = "client", "login"  # which limit refused: 421 and disconnect, or 454
# At most this long for checks in flight on a full counter: well inside the frontend's POLICY_TIMEOUT
# (10 s), so that the wait ends in a reply from policy, not in the frontend's 421.
WAIT_FOR_CHECKS = 5.0
KNOWN_MEMORY = 100_000


def client_of(peer: str, ipv6_prefix: int = 64) -> str:
    """The client an address counts as: an IPv4 address itself (also when IPv4-mapped), an IPv6
    address its network of ``ipv6_prefix`` bits; anything else as given."""
    try:
        ip = ipaddress.ip_address(peer)
    except ValueError:
        return peer
    if ip.version == 6 and ip.ipv4_mapped:
        return str(ip.ipv4_mapped)
    if ip.version == 6:
        return str(ipaddress.ip_network((ip.packed, ipv6_prefix), strict=False))
    return str(ip)


class Lockouts:
    def __init__(self, failures: Counters | None, settings: Settings, windows: Counters | None = None,
                 known: Counters | None = None) -> None:
        self.failures = failures  # None: no lockouts (tests, a site that wants none)
        self.budget = SlidingWindow(windows, BUDGET_KIND, settings.auth_login_budget_seconds) if windows else None
        self.known = known
        self.per_client = settings.auth_failures_per_client
        self.per_login = settings.auth_failures_per_login
        self.budget_limit = settings.auth_login_failure_budget
        self.ipv6_prefix = settings.auth_ipv6_prefix
        # A known client's entry is rewritten (its expiry pushed back) at most this often.
        self.known_refresh = max(60.0, settings.auth_known_address_seconds / 30)
        self._marked: OrderedDict[str, float] = OrderedDict()
        self._in_flight: dict[str, int] = {}  # this replica's reservations not yet settled, per key
        self._settled: dict[str, asyncio.Event] = {}

    def client_key(self, peer: str) -> str:
        return f"client.{key_part(client_of(peer, self.ipv6_prefix))}"

    async def client_locked(self, peer: str) -> bool:
        """The client's failures are at its limit. Its checks in flight on this replica are
        reservations, not failures yet: an office whose logins are being checked is not locked out."""
        if self.failures is None:
            return False
        key = self.client_key(peer)
        return self.failed_count(await self.failures.get(key), key) >= self.per_client

    def failed_count(self, count: int, key: str) -> int:
        """A counter's value without this replica's reservations in flight on it."""
        return count - self._in_flight.get(key, 0)

    async def token_failed(self, peer: str) -> None:
        """A bearer token refused: counted against the client only (a token is not a password
        that could be guessed for one login)."""
        if self.failures is not None:
            await self.failures.incr(self.client_key(peer))

    def attempt(self, login: str, peer: str) -> Attempt:
        return Attempt(self, login, peer)

    async def reserve(self, counters: Counters, key: str, limit: int, already: int = 0) -> bool:
        """One unit of room under ``limit``; while there is none but this replica has
        reservations in flight on ``key``, wait for them to settle and try again."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_FOR_CHECKS
        while True:
            # Counted in flight before the counter moves: another attempt that finds the
            # counter full an instant later must know this replica holds part of it.
            self._in_flight[key] = self._in_flight.get(key, 0) + 1
            if await counters.reserve(key, limit, already):
                return True
            # Its own try, refused, frees nothing: the others waiting are not woken (a refusal the
            # mirror answers takes no round trip: waking each other, they would spin), unless
            # nothing is in flight any more, which ends their wait too.
            self.settle(key, wake=False)
            if not self._in_flight.get(key):
                self._wake(key)
                return False
            if loop.time() >= deadline:
                return False
            settled = self._settled.setdefault(key, asyncio.Event())
            try:
                await asyncio.wait_for(settled.wait(), deadline - loop.time())
            except asyncio.TimeoutError:
                return False

    def settle(self, key: str, wake: bool = True) -> None:
        left = self._in_flight.get(key, 0) - 1
        if left > 0:
            self._in_flight[key] = left
        else:
            self._in_flight.pop(key, None)
        if wake:
            self._wake(key)

    def _wake(self, key: str) -> None:
        event = self._settled.pop(key, None)
        if event is not None:
            event.set()

    async def remember(self, key: str) -> None:
        """A login succeeded from a client: known there (for ``auth_known_address_seconds``)."""
        if self.known is None:
            return
        now = time.monotonic()
        last = self._marked.get(key)
        if last is not None and now - last < self.known_refresh:
            return
        self._marked[key] = now
        self._marked.move_to_end(key)
        while len(self._marked) > KNOWN_MEMORY:
            self._marked.popitem(last=False)
        await self.known.mark(key)


class Attempt:
    """One login tried from one client."""

    def __init__(self, lockouts: Lockouts, login: str, peer: str) -> None:
        self.lockouts = lockouts
        self.login = login
        pair = key_part(login + chr(0) + client_of(peer, lockouts.ipv6_prefix))
        self.client_key = lockouts.client_key(peer)
        self.login_key = f"login.{pair}"
        self.known_key = f"known.{pair}"
        self.known: bool | None = None
        self.reserved: list[tuple[Counters, str]] = []
        self.refused_by: str | None = None

    async def locked(self) -> bool:
        """Refused before any password is checked: too many failures for this login from this
        client, or the login's budget spent and this client never logged in as it."""
        lo = self.lockouts
        if lo.failures is None:
            return False
        here, spent = await asyncio.gather(
            lo.failures.get(self.login_key), lo.budget.count(self.login) if lo.budget else _zero())
        if lo.failed_count(here, self.login_key) >= lo.per_login:
            return True
        return spent >= lo.budget_limit and not await self.is_known()

    async def is_known(self) -> bool:
        if self.known is None:
            self.known = self.lockouts.known is not None and await self.lockouts.known.has(self.known_key)
        return self.known

    async def admit(self) -> bool:
        """Count this guess as a failure until proven right (before its password is checked);
        False, with ``refused_by`` set, when a limit has no room for it."""
        lo = self.lockouts
        if lo.failures is None:
            return True
        # The narrowest limit first: a guess waiting for room under one holds no room under a
        # wider one meanwhile.
        if not await self._reserve(lo.failures, self.login_key, lo.per_login):
            return self._refuse(LOGIN)
        if lo.budget is not None and not await self.is_known():
            key, earlier = await lo.budget.parts(self.login)
            if not await self._reserve(lo.budget.counters, key, lo.budget_limit, earlier):
                return self._refuse(LOGIN)
        if not await self._reserve(lo.failures, self.client_key, lo.per_client):
            return self._refuse(CLIENT)
        return True

    async def _reserve(self, counters: Counters, key: str, limit: int, already: int = 0) -> bool:
        if not await self.lockouts.reserve(counters, key, limit, already):
            return False
        self.reserved.append((counters, key))
        return True

    def _refuse(self, which: str) -> bool:
        self.refused_by = which
        return False

    async def unchecked(self) -> None:
        """The password was not checked (hashing busy, no room): the guess does not count."""
        await self._give_back()

    async def succeeded(self) -> None:
        await self._give_back()  # a right password is no failure
        await self.lockouts.remember(self.known_key)

    async def failed(self) -> None:
        lo = self.lockouts
        if lo.failures is None:
            return
        if self.reserved:
            self.close()  # the reservations are the counts
            return
        # Joined another attempt's check (same login and password): it counts all the same.
        await lo.failures.incr(self.client_key)
        await lo.failures.incr(self.login_key)
        if lo.budget is not None and not await self.is_known():
            key, _ = await lo.budget.parts(self.login)
            await lo.budget.counters.incr(key)

    async def _give_back(self) -> None:
        while self.reserved:
            counters, key = self.reserved[-1]
            await counters.add(key, -1)
            self.reserved.pop()
            self.lockouts.settle(key)

    def close(self) -> None:
        """Whatever is still reserved stays counted; this replica stops waiting on it (also
        when the attempt is abandoned halfway: a stream that broke)."""
        while self.reserved:
            _, key = self.reserved.pop()
            self.lockouts.settle(key)


async def _zero() -> int:
    return 0
