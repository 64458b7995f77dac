"""The AUTH credential cache and the bounded hashing pool, on real argon2id hashes and a real
users file reloaded from disk."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import yaml
from argon2 import PasswordHasher
from prometheus_client import REGISTRY

from submitd_common.files import WatchedFile
from submitd_common.users import UserDB, check_argon2_parameters, configure_hashing, verify_password
from submitd_policy import credentials, metrics  # noqa: F401  (metrics: registers the counters read below)
from submitd_policy.credentials import Authenticator, HashingBusy, VerifiedCache
from submitd_policy.directories.base import Account
from submitd_policy.directories.chain import Directories
from submitd_policy.directories.file import FileDirectory

# OWASP's minimum (19 MiB, t=2): fast enough for tests, and a hash the defaults must still verify.
FAST = PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1)


def verifications() -> float:
    return sum(
        REGISTRY.get_sample_value("submitd_policy_password_verifications_total", {"result": r})
        for r in ("match", "mismatch")
    )


def write_users(path, **users) -> None:
    data = {"users": {login: {"password": FAST.hash(pw), **extra} for login, (pw, extra) in users.items()}}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(data))
    tmp.replace(path)


@pytest.fixture
def users_file(tmp_path):
    path = tmp_path / "users.yaml"
    write_users(path, alice=("s3cret", {}), bob=("pw", {"suspended": True}))
    return path


def authenticator(path, **kw) -> tuple[Authenticator, WatchedFile]:
    watched = WatchedFile(str(path), UserDB.load, interval=3600)
    options = dict(concurrency=2, queue=8, cache_seconds=60, cache_entries=100) | kw
    chain = Directories([FileDirectory(watched)], ttl=300, grace=3600, timeout=5)
    return Authenticator(chain, **options), watched


async def test_repeated_auth_is_served_from_the_cache_without_a_hash(users_file):
    auth, _ = authenticator(users_file)
    assert (await auth.authenticate("alice", "s3cret")).login == "alice"
    before = verifications()
    cpu0 = time.process_time()
    for _ in range(200):
        assert (await auth.authenticate("alice", "s3cret")).login == "alice"
    per_auth_ms = (time.process_time() - cpu0) / 200 * 1000
    assert verifications() == before, "no hash verified for a cached login"
    assert per_auth_ms < 1.0, f"a cached AUTH cost {per_auth_ms:.3f} ms of CPU"


async def test_wrong_unknown_and_suspended_are_refused_and_never_cached(users_file):
    auth, _ = authenticator(users_file)
    assert await auth.authenticate("alice", "s3cret")
    before = verifications()
    assert await auth.authenticate("alice", "wrong") is None, "a cached login does not let another password in"
    assert await auth.authenticate("nobody", "s3cret") is None
    assert await auth.authenticate("bob", "pw") is None, "a suspended user cannot log in"
    assert await auth.authenticate("bob", "pw") is None
    assert verifications() == before + 4, "every failure costs a full verification (the lockouts bound them)"


async def test_changed_users_entry_empties_its_cache_entry(users_file):
    auth, watched = authenticator(users_file)
    assert await auth.authenticate("alice", "s3cret")
    write_users(users_file, alice=("new password", {"send_as": ["alias@example.net"]}), bob=("pw", {}))
    assert watched.reload_if_changed()
    assert await auth.authenticate("alice", "s3cret") is None, "the old password stops working at once"
    user = await auth.authenticate("alice", "new password")
    assert user is not None and "alias@example.net" in user.send_as
    assert len(auth.cache) == 1
    # A change that leaves the hash alone (here only a grant) keeps the verification and is seen at once.
    text = users_file.read_text().replace("alias@example.net", "other@example.net")
    users_file.write_text(text)
    watched.reload_if_changed()
    before = verifications()
    user = await auth.authenticate("alice", "new password")
    assert user is not None and user.send_as == {"other@example.net"}
    assert verifications() == before


async def test_suspension_after_caching_refuses(users_file):
    auth, watched = authenticator(users_file)
    assert await auth.authenticate("alice", "s3cret")
    text = users_file.read_text().replace("alice:\n", "alice:\n    suspended: true\n", 1)
    users_file.write_text(text)
    assert watched.reload_if_changed()
    assert await auth.authenticate("alice", "s3cret") is None


def test_cache_expires_is_bounded_and_holds_no_password():
    now = [0.0]
    cache = VerifiedCache(ttl=10, max_entries=2, clock=lambda: now[0])
    users = UserDB.from_mapping({"users": {f"u{i}": {"password": f"$argon2id$hash{i}"} for i in range(3)}})
    u0, u1, u2 = (Account(users.users[f"u{i}"], "file") for i in range(3))
    cache.remember(u0, "password zero")
    assert cache.hit(u0, "password zero")
    now[0] = 10.0
    assert not cache.hit(u0, "password zero"), "expired"
    for u in (u0, u1, u2):
        cache.remember(u, f"password {u.login}")
    assert len(cache) == 2 and not cache.hit(u0, "password u0"), "least recently used went first"
    dump = repr(cache.__dict__["_entries"]).encode()
    assert b"password" not in dump and b"hash" not in dump


async def test_hashing_is_bounded_and_never_blocks_the_loop(users_file, monkeypatch):
    # Fresh parameters: the dummy hash unknown logins are checked against is not made yet,
    # and making it must not happen on the event loop either.
    configure_hashing(time_cost=3, memory_kib=65536, parallelism=4)
    auth, _ = authenticator(users_file, concurrency=1, queue=2)
    # Where each argon2 computation ran (the dummy hash made, each verification): a thread's
    # name, read as the work starts. Which thread hashed is the deterministic half of the proof;
    # the loop's lag below is what a client would notice, bounded well under one hash's time.
    ran_on: list[tuple[str, str]] = []
    for name in ("verify_password", "dummy_hash"):
        real = getattr(credentials, name)

        def recorded(*args, real=real, name=name):
            ran_on.append((name, threading.current_thread().name))
            return real(*args)

        monkeypatch.setattr(credentials, name, recorded)
    lags: list[float] = []

    async def probe() -> None:
        for _ in range(40):
            t0 = time.perf_counter()
            await asyncio.sleep(0.005)
            lags.append(time.perf_counter() - t0 - 0.005)

    probing = asyncio.create_task(probe())
    await asyncio.sleep(0.01)
    t0 = time.perf_counter()
    outcomes = await asyncio.gather(
        *(auth.authenticate(f"nobody{i}", "guess") for i in range(6)), return_exceptions=True
    )
    one_hash = (time.perf_counter() - t0) / 4  # three checks against the dummy hash, and making it
    await probing
    assert sum(isinstance(r, HashingBusy) for r in outcomes) == 3, "1 running + 2 waiting, the rest refused at once"
    assert all(r is None for r in outcomes if not isinstance(r, HashingBusy))
    assert [f for f, _ in ran_on].count("verify_password") == 3, ran_on
    assert all(t.startswith("password-hash") for _, t in ran_on), f"hashed on {ran_on}, not the hashing threads"
    # A loop that hashed would stall for a whole hash (~130 ms here, idle); a busy machine's
    # scheduler stalls it for tens of milliseconds at most.
    assert max(lags) < max(0.1, one_hash * 0.75), (
        f"the event loop stalled {max(lags) * 1000:.0f} ms while hashing (a hash took {one_hash * 1000:.0f} ms)")
    auth.close()


def test_argon2_parameters_below_owasp_minimum_are_refused_and_old_hashes_verify():
    check_argon2_parameters(2, 19456, 1)
    check_argon2_parameters(3, 65536, 4)
    for weak in ((1, 19456, 1), (2, 8192, 1), (5, 4096, 1)):
        with pytest.raises(ValueError):
            check_argon2_parameters(*weak)
    strong = PasswordHasher(time_cost=3, memory_cost=65536, parallelism=4).hash("pw")
    assert verify_password(strong, "pw") and verify_password(FAST.hash("pw"), "pw")


async def test_simultaneous_logins_with_one_password_share_one_verification(users_file):
    # A client opening many sessions at once with a cold cache: one hash, nobody refused for a
    # full queue (1 thread, 1 waiting place here), and each attempt still gets its own answer.
    auth, _ = authenticator(users_file, concurrency=1, queue=1)
    before = verifications()
    outcomes = await asyncio.gather(*(auth.authenticate("alice", "s3cret") for _ in range(20)),
                                    return_exceptions=True)
    assert [u.login if u else u for u in outcomes] == ["alice"] * 20
    assert verifications() == before + 1
    wrong = await asyncio.gather(*(auth.authenticate("alice", "wrong") for _ in range(5)),
                                 auth.authenticate("alice", "other"), return_exceptions=True)
    assert wrong == [None] * 6
    assert verifications() == before + 3, "one check per distinct password"
    auth.close()
