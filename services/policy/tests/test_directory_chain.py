"""The chain of directories and the credential cache over it: what every directory shares (the
first that knows a login answers, the TTL, the grace while one is down, the timeout) and what
AUTH makes of it. The directories here are in memory; LDAP and SQL are tested against slapd and
PostgreSQL in their own modules."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
from argon2 import PasswordHasher

from submitd_common.users import User
from submitd_policy.credentials import Authenticator
from submitd_policy.directories.base import Account, Directory, DirectoryUnavailable
from submitd_policy.directories.chain import Directories

FAST = PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Held(Directory):
    """Logins held in a dict; ``down`` makes every request fail, ``slow`` makes it hang;
    ``passwords`` (login -> password) makes it a directory that checks passwords itself."""

    def __init__(self, name: str, users: dict[str, User], passwords: dict[str, str] | None = None) -> None:
        self.name = name
        self.users = users
        self.passwords = passwords
        self.down = False
        self.slow = False
        self.lookups = 0
        self.checks = 0

    async def _request(self) -> None:
        if self.slow:
            await asyncio.sleep(60)
        if self.down:
            raise DirectoryUnavailable(f"{self.name}: connection refused")

    async def lookup(self, login: str) -> Account | None:
        self.lookups += 1
        await self._request()
        user = self.users.get(login)
        return None if user is None else Account(user, self.name)

    async def check_password(self, account: Account, password: str) -> bool:
        self.checks += 1
        await self._request()
        return self.passwords.get(account.login) == password


def user(login: str, password: str | None = None, **kw) -> User:
    return User(login=login, password_hash=FAST.hash(password) if password else "", **kw)


def chain(*directories, clock=None, ttl=300.0, grace=3600.0, timeout=0.5) -> Directories:
    return Directories(list(directories), ttl=ttl, grace=grace, timeout=timeout, clock=clock or Clock())


async def test_the_first_directory_that_knows_a_login_answers():
    first = Held("ldap", {"alice@example.net": user("alice@example.net", send_as=frozenset({"a@example.net"}))})
    second = Held("sql", {"alice@example.net": user("alice@example.net"), "bob@example.net": user("bob@example.net")})
    dirs = chain(first, second)
    assert (await dirs.lookup("alice@example.net")).source == "ldap"
    assert (await dirs.lookup("bob@example.net")).source == "sql"
    assert await dirs.lookup("carol@example.net") is None


async def test_a_directory_that_is_down_before_the_one_that_knows_makes_the_lookup_unavailable():
    first, second = Held("ldap", {}), Held("sql", {"bob@example.net": user("bob@example.net")})
    first.down = True
    with pytest.raises(DirectoryUnavailable):
        await chain(first, second).lookup("bob@example.net")


async def test_answers_are_cached_for_the_ttl_and_read_again_after_it():
    clock = Clock()
    ldap = Held("ldap", {"alice@example.net": user("alice@example.net")})
    dirs = chain(ldap, clock=clock, ttl=300)
    await dirs.lookup("alice@example.net")
    await dirs.lookup("alice@example.net")
    assert ldap.lookups == 1
    ldap.users["alice@example.net"] = user("alice@example.net", suspended=True)
    clock.now += 299
    assert not (await dirs.lookup("alice@example.net")).user.suspended
    clock.now += 1
    assert (await dirs.lookup("alice@example.net")).user.suspended, "the change is seen once the TTL is over"
    assert ldap.lookups == 2


async def test_unknown_logins_are_cached_a_minute_at_most():
    clock = Clock()
    ldap = Held("ldap", {})
    dirs = chain(ldap, clock=clock, ttl=300)
    assert await dirs.lookup("new@example.net") is None
    ldap.users["new@example.net"] = user("new@example.net")
    clock.now += 59
    assert await dirs.lookup("new@example.net") is None
    clock.now += 1
    assert await dirs.lookup("new@example.net") is not None, "an account made in the directory is seen within a minute"


async def test_while_down_a_login_keeps_its_last_answer_for_the_grace_and_no_longer():
    clock = Clock()
    ldap = Held("ldap", {"alice@example.net": user("alice@example.net")})
    dirs = chain(ldap, clock=clock, ttl=300, grace=600)
    await dirs.lookup("alice@example.net")
    ldap.down = True
    clock.now += 850
    assert (await dirs.lookup("alice@example.net")).login == "alice@example.net"
    with pytest.raises(DirectoryUnavailable):
        await dirs.lookup("bob@example.net")  # never answered: no last answer to keep
    clock.now += 50
    with pytest.raises(DirectoryUnavailable):
        await dirs.lookup("alice@example.net")


async def test_a_slow_directory_is_unavailable_after_the_timeout_and_lookups_share_one_request():
    ldap = Held("ldap", {"alice@example.net": user("alice@example.net")})
    ldap.slow = True
    dirs = chain(ldap, timeout=0.2)
    outcomes = await asyncio.gather(*(dirs.lookup("alice@example.net") for _ in range(10)), return_exceptions=True)
    assert all(isinstance(o, DirectoryUnavailable) for o in outcomes)
    assert "0.2 s" in str(outcomes[0])
    assert ldap.lookups == 1, "ten sessions at once cost one request"


def authenticator(dirs: Directories) -> Authenticator:
    return Authenticator(dirs, concurrency=1, queue=4, cache_seconds=3600, cache_entries=100)


async def test_bound_logins_are_checked_again_after_the_ttl_so_an_old_password_stops_working():
    clock = Clock()
    ldap = Held("ldap", {"alice@example.net": user("alice@example.net")}, passwords={"alice@example.net": "old"})
    dirs = chain(ldap, clock=clock, ttl=300)
    auth = authenticator(dirs)
    auth.cache.clock = clock
    assert await auth.authenticate("alice@example.net", "old")
    assert await auth.authenticate("alice@example.net", "old") and ldap.checks == 1, "cached"
    ldap.passwords["alice@example.net"] = "new"
    clock.now += 300
    assert await auth.authenticate("alice@example.net", "old") is None, "the directory was asked again"
    assert await auth.authenticate("alice@example.net", "new")
    assert await auth.authenticate("alice@example.net", "") is None, "an empty password never reaches a bind"
    assert ldap.checks == 3


async def test_hashed_logins_miss_the_cache_when_the_directory_hands_out_a_new_hash():
    clock = Clock()
    sql = Held("sql", {"bob@example.net": user("bob@example.net", "old")})
    dirs = chain(sql, clock=clock, ttl=300)
    auth = authenticator(dirs)
    auth.cache.clock = clock
    assert await auth.authenticate("bob@example.net", "old")
    sql.users["bob@example.net"] = user("bob@example.net", "new")
    assert await auth.authenticate("bob@example.net", "old"), "within the TTL the old answer stands"
    clock.now += 300
    assert await auth.authenticate("bob@example.net", "old") is None
    assert await auth.authenticate("bob@example.net", "new")


async def test_while_down_cached_logins_keep_working_and_others_are_temporary_failures():
    clock = Clock()
    ldap = Held("ldap", {"alice@example.net": user("alice@example.net"), "bob@example.net": user("bob@example.net")},
                passwords={"alice@example.net": "pw", "bob@example.net": "pw"})
    dirs = chain(ldap, clock=clock, ttl=300, grace=3600)
    auth = authenticator(dirs)
    auth.cache.clock = clock
    assert await auth.authenticate("alice@example.net", "pw")
    ldap.down = True
    clock.now += 1000  # past the TTL: the bind would be asked again, and cannot be
    assert (await auth.authenticate("alice@example.net", "pw")).login == "alice@example.net"
    with pytest.raises(DirectoryUnavailable):  # not 535: the directory might know it
        await auth.authenticate("alice@example.net", "another password")

    with pytest.raises(DirectoryUnavailable):
        await auth.authenticate("bob@example.net", "pw")


async def test_a_suspended_account_is_refused_although_its_password_is_cached():
    clock = Clock()
    sql = Held("sql", {"bob@example.net": user("bob@example.net", "pw")})
    dirs = chain(sql, clock=clock, ttl=300)
    auth = authenticator(dirs)
    auth.cache.clock = clock
    assert await auth.authenticate("bob@example.net", "pw")
    sql.users["bob@example.net"] = replace(sql.users["bob@example.net"], suspended=True)
    clock.now += 300
    assert await auth.authenticate("bob@example.net", "pw") is None


async def test_the_grace_follows_the_login_as_it_was_asked_not_as_the_directory_spells_it():
    clock = Clock()
    alice = user("alice@example.net")  # the directory's spelling, whatever the client typed
    ldap = Held("ldap", {"Alice@example.net": alice}, passwords={"alice@example.net": "pw"})
    auth = authenticator(chain(ldap, clock=clock, ttl=300, grace=3600))
    auth.cache.clock = clock
    assert (await auth.authenticate("Alice@example.net", "pw")).login == "alice@example.net"
    ldap.down = True
    clock.now += 1000
    assert (await auth.authenticate("Alice@example.net", "pw")).login == "alice@example.net"
