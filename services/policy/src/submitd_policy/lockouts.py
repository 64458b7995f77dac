"""AUTH lockouts: failed authentications counted per client address and per login from that
address, in a KV bucket shared by every policy replica whose entries expire
``auth_lockout_seconds`` after the last failure.

- A client address with ``auth_failures_per_client`` failures is told 421 4.7.0 at its next AUTH
  and disconnected.
- A login with ``auth_failures_per_login`` failures from one address gets 454 4.7.0 there, before
  any password is checked; the same login from elsewhere is not affected.
- A guess is counted *before* its password is checked, in one atomic step (``Attempt.admit``):
  N guesses in parallel get at most the limit of checks, never N. A right password, or a guess
  that was never checked (hashing busy), gives its count back.

Keys carry hashes of logins and addresses, never the values themselves.
"""

from __future__ import annotations

from .counters import Counters, key_part
from .settings import Settings


class Lockouts:
    def __init__(self, counters: Counters | None, settings: Settings) -> None:
        self.counters = counters  # None: no lockouts (tests, a site that wants none)
        self.per_client = settings.auth_failures_per_client
        self.per_login = settings.auth_failures_per_login

    async def client_locked(self, peer: str) -> bool:
        return self.counters is not None and await self.counters.get(self._client(peer)) >= self.per_client

    def attempt(self, login: str, peer: str) -> Attempt:
        return Attempt(self, login, peer)

    @staticmethod
    def _client(peer: str) -> str:
        return f"client.{key_part(peer)}"


class Attempt:
    """One login tried from one address."""

    def __init__(self, lockouts: Lockouts, login: str, peer: str) -> None:
        self.counters = lockouts.counters
        self.limit = lockouts.per_login
        self.client_key = lockouts._client(peer)
        self.login_key = f"login.{key_part(login + chr(0) + peer)}"
        self.reserved = False

    async def locked(self) -> bool:
        return self.counters is not None and await self.counters.get(self.login_key) >= self.limit

    async def admit(self) -> bool:
        """Count this guess as a failure until proven right; False when it is over the limit."""
        if self.counters is None:
            return True
        self.reserved = True
        return await self.counters.add(self.login_key, 1) <= self.limit

    async def unchecked(self) -> None:
        """The password was not checked (hashing busy, locked): the guess does not count."""
        await self._give_back()

    async def succeeded(self) -> None:
        await self._give_back()  # a right password is no failure

    async def failed(self) -> None:
        if self.counters is None:
            return
        if not self.reserved:
            await self.counters.incr(self.login_key)
        await self.counters.incr(self.client_key)

    async def _give_back(self) -> None:
        if self.reserved:
            self.reserved = False
            await self.counters.add(self.login_key, -1)
