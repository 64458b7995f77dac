"""Who gets a password check, in memory (issue 25, item 5): the client an address counts as, the
lockouts' reservations (counters in memory with a round trip's pause, where the service has NATS
KV), and attempts that arrive together sharing one check (tests/test_auth_guessing.py has the
same end to end)."""

from __future__ import annotations

import asyncio

import pytest
import yaml
from argon2 import PasswordHasher

from submitd_common.files import WatchedFile
from submitd_common.users import UserDB
from submitd_policy.credentials import Authenticator, Locked
from submitd_policy.directories.chain import Directories
from submitd_policy.directories.file import FileDirectory

from submitd_policy.lockouts import CLIENT, LOGIN, Lockouts, client_of
from submitd_policy.settings import Settings


@pytest.mark.parametrize("peer,prefix,client", [
    ("192.0.2.7", 64, "192.0.2.7"),
    ("::ffff:192.0.2.7", 64, "192.0.2.7"),
    ("2001:db8:1:2:aaaa:bbbb:cccc:dddd", 64, "2001:db8:1:2::/64"),
    ("2001:db8:1:2::1", 64, "2001:db8:1:2::/64"),
    ("2001:db8:1:3::1", 64, "2001:db8:1:3::/64"),
    ("2001:db8:1:2:aaaa::1", 48, "2001:db8:1::/48"),
    ("2001:db8::1", 128, "2001:db8::1/128"),
    ("not an address", 64, "not an address"),
])
def test_the_client_an_address_counts_as(peer, prefix, client):
    assert client_of(peer, prefix) == client


class MemoryCounters:
    """Counters as the service keeps them in KV, in memory: every call pauses as a round trip would
    (``pause``; none for a refusal, as when the replica's mirror answers it)."""

    def __init__(self) -> None:
        self.values: dict[str, int] = {}
        self.pause = 0.001
        self.tries = 0

    async def get(self, key: str) -> int:
        await asyncio.sleep(0.001)
        return self.values.get(key, 0)

    async def add(self, key: str, delta: int) -> int:
        await asyncio.sleep(0.001)
        self.values[key] = max(0, self.values.get(key, 0) + delta)
        return self.values[key]

    async def incr(self, key: str) -> int:
        return await self.add(key, 1)

    async def reserve(self, key: str, limit: int, already: int = 0) -> bool:
        self.tries += 1
        if self.pause:
            await asyncio.sleep(self.pause)
        if self.values.get(key, 0) + already >= limit:
            return False
        self.values[key] = self.values.get(key, 0) + 1
        return True

    async def has(self, key: str) -> bool:
        await asyncio.sleep(0.001)
        return key in self.values

    async def mark(self, key: str) -> None:
        self.values[key] = 1


def lockouts(**settings) -> tuple[Lockouts, MemoryCounters, MemoryCounters, MemoryCounters]:
    failures, windows, known = MemoryCounters(), MemoryCounters(), MemoryCounters()
    options = {"auth_failures_per_login": 2, "auth_failures_per_client": 3, "auth_login_failure_budget": 4} | settings
    return Lockouts(failures, Settings(users_file="/dev/null", **options), windows, known), failures, windows, known


async def guess(lo: Lockouts, login: str, peer: str, right: bool = False, check: float = 0.02) -> str:
    """One AUTH as auth.py runs it, with a check that takes ``check`` seconds."""
    if await lo.client_locked(peer):  # auth.py's first question, at AUTH's start
        return "421"
    attempt = lo.attempt(login, peer)
    try:
        if await attempt.locked():
            return "454"
        if not await attempt.admit():
            await attempt.unchecked()
            return "421" if attempt.refused_by == CLIENT else "454"
        await asyncio.sleep(check)
        if right:
            await attempt.succeeded()
            return "235"
        await attempt.failed()
        return "535"
    finally:
        attempt.close()


async def test_parallel_guesses_get_no_more_checks_than_each_limit():
    lo, *_ = lockouts()
    one_login = await asyncio.gather(*(guess(lo, "alice", "192.0.2.1") for _ in range(10)))
    assert sorted(one_login) == ["454"] * 8 + ["535"] * 2
    many_logins = await asyncio.gather(*(guess(lo, f"u{n}", "192.0.2.1") for n in range(10)))
    assert sorted(many_logins) == ["421"] * 9 + ["535"], "3 failures per client, 2 of them spent on alice"


async def test_the_budget_stops_new_addresses_but_not_the_users_own():
    lo, *_ = lockouts()
    assert await guess(lo, "alice", "198.51.100.7", right=True) == "235"
    botnet = await asyncio.gather(*(guess(lo, "alice", f"203.0.113.{n}") for n in range(1, 21)))
    assert sorted(botnet) == ["454"] * 16 + ["535"] * 4
    assert await guess(lo, "alice", "198.51.100.7", right=True) == "235", "known: the budget does not apply"
    assert await guess(lo, "alice", "198.51.100.7") == "535", "a typo where alice logs in is checked"
    assert await guess(lo, "alice", "192.0.2.50", right=True) == "454", "a new address waits"
    assert await guess(lo, "alice", "2001:db8:1:2::1", right=True) == "454"
    assert await guess(lo, "bob", "203.0.113.1", right=True) == "235"


async def test_right_passwords_at_once_are_never_refused_for_the_company_they_arrive_in():
    # An office behind one address: five users log in at the same moment, each with a cold
    # cache, under a per-client limit of 3. Their checks hold the room in turn; none is refused.
    lo, failures, *_ = lockouts()
    results = await asyncio.gather(*(guess(lo, f"user{n}", "192.0.2.1", right=True) for n in range(5)))
    assert results == ["235"] * 5
    # Staggered: AUTHs that start while the others' checks hold all the room are not taken for
    # a client locked out (its checks in flight are not failures yet).
    async def later(n: int) -> str:
        await asyncio.sleep(0.005 * n)
        return await guess(lo, f"user{n}", "192.0.2.1", right=True, check=0.05)

    assert await asyncio.gather(*(later(n) for n in range(8))) == ["235"] * 8
    assert not any(failures.values.values()), "nothing left counted"
    # A right password holding the last room: the wrong guess beside it waits for that
    # outcome, and is then checked (not refused while the room was only lent).
    assert await guess(lo, "alice", "192.0.2.1") == "535"
    results = await asyncio.gather(guess(lo, "alice", "192.0.2.1", right=True), guess(lo, "alice", "192.0.2.1"))
    assert results == ["235", "535"]


async def test_attempts_waiting_for_room_try_again_when_a_check_ends_not_in_a_loop():
    # A refusal the replica's mirror answers takes no round trip: a refused try must not wake the
    # others waiting on the same counter (who would try, be refused and wake it in turn, spinning
    # the CPU until a check ends). Ten right passwords behind one address, room for three.
    lo, failures, *_ = lockouts()
    failures.pause = 0
    results = await asyncio.gather(*(guess(lo, f"user{n}", "192.0.2.1", right=True, check=0.05) for n in range(10)))
    assert results == ["235"] * 10
    print(f"\n{failures.tries} tries for 10 AUTHs")
    assert failures.tries < 100


def file_chain(path) -> Directories:
    return Directories([FileDirectory(WatchedFile(str(path), UserDB.load, interval=3600))], ttl=300, grace=3600, timeout=5)


def write_users(path, users: dict[str, str]) -> None:
    fast = PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1)
    path.write_text(yaml.safe_dump({"users": {login: {"password": fast.hash(pw)} for login, pw in users.items()}}))


async def test_attempts_that_arrive_while_the_first_is_being_admitted_share_its_check(tmp_path):
    path = tmp_path / "users.yaml"
    write_users(path, {"alice": "right"})
    auth = Authenticator(file_chain(path), concurrency=1, queue=1,
                         cache_seconds=60, cache_entries=10)
    admitted = 0

    async def admit() -> bool:  # a KV round trip, as the lockouts' reservation takes
        nonlocal admitted
        admitted += 1
        await asyncio.sleep(0.01)
        return True

    users = await asyncio.gather(*(auth.authenticate("alice", "right", admit=admit) for _ in range(50)))
    assert [u.login for u in users] == ["alice"] * 50
    assert admitted == 1, "the others joined the check in flight: no guess of their own"
    auth.close()


async def test_an_attempt_joining_one_refused_by_its_own_limits_is_admitted_on_its_own(tmp_path):
    path = tmp_path / "users.yaml"
    write_users(path, {"alice": "right"})
    auth = Authenticator(file_chain(path), concurrency=1, queue=1,
                         cache_seconds=60, cache_entries=10)

    async def refused() -> bool:  # from an address whose limits are spent
        await asyncio.sleep(0.01)
        return False

    async def admitted() -> bool:
        return True

    locked, joined = await asyncio.gather(auth.authenticate("alice", "right", admit=refused),
                                          auth.authenticate("alice", "right", admit=admitted),
                                          return_exceptions=True)
    assert isinstance(locked, Locked) and joined.login == "alice"
    auth.close()


def test_refusals_say_which_limit():
    assert {CLIENT, LOGIN} == {"client", "login"}
