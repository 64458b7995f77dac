"""Guessing one login's password from many addresses, and many right passwords at once (issue 25,
item 5), against the real stack: the frontend behind a PROXY balancer, so each session comes from
whatever address the test names, and the policy's counters in a real NATS.

- A login has a failure budget across all the addresses it never logged in from
  (AUTH_LOGIN_FAILURE_BUDGET per AUTH_LOGIN_BUDGET_SECONDS): a botnet gets that many password
  checks, then 454 4.7.0 without a hash, while the user goes on from where they log in.
- An IPv6 client is its /64 (AUTH_IPV6_PREFIX): a fresh address per guess does not help.
- The per-client limit is a reservation: parallel guesses cannot overshoot it.
- A burst of right-password logins with a cold cache: every one 235.
"""

from __future__ import annotations

import concurrent.futures

import pytest

from auth_clients import auth, password_checks, simultaneous
from submitd_devkit.stack import User
from submitd_devkit.testing.users import ALICE, ALICE_PASSWORD

pytestmark = pytest.mark.timeout(150)
BOB, BOB_PASSWORD = "bob@example.test", "bob password"
POLICY = {"AUTH_FAILURE_DELAY": "0.05"}  # every other limit at its default
# The test speaks for the balancer from 127.0.0.1, the one peer whose PROXY header is believed.
FRONTEND = {"PROXY_PROTOCOL": "true", "PROXY_TRUSTED_NETWORKS": "127.0.0.1/32", "MAX_CONNECTIONS_PER_CLIENT": "100"}


def proxied_stack(make_stack, users: dict[str, User] | None = None, **policy: str):
    users = users or {ALICE: User(ALICE_PASSWORD, [ALICE]), BOB: User(BOB_PASSWORD, [BOB])}
    return make_stack(users=users, env={"policy": POLICY | policy, "frontend": FRONTEND})


def in_parallel(function, items, workers: int = 16) -> list:
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(function, items))


def test_guesses_from_200_addresses_get_the_logins_budget_and_the_user_keeps_working(make_stack):
    stack = proxied_stack(make_stack)
    home = "198.51.100.7"
    assert auth(stack, home, ALICE, ALICE_PASSWORD) == 235, "where alice logs in"
    before = password_checks(stack)
    botnet = [f"203.0.{n // 200}.{n % 200 + 1}" for n in range(200)]
    codes = in_parallel(lambda n: auth(stack, botnet[n], ALICE, f"guess {n}"), range(200))
    assert (codes.count(535), codes.count(454)) == (50, 150), codes
    assert password_checks(stack) - before == 50, "a password check per guess in the budget, none after it"

    assert auth(stack, home, ALICE, ALICE_PASSWORD) == 235, "the attack does not lock alice out where she logs in"
    before = password_checks(stack)
    assert auth(stack, "192.0.2.99", ALICE, ALICE_PASSWORD) == 454, "a new place waits, even with the right password"
    assert auth(stack, botnet[0], ALICE, ALICE_PASSWORD) == 454
    assert password_checks(stack) == before, "refused before any hash"
    assert auth(stack, botnet[0], BOB, BOB_PASSWORD) == 235, "other logins from the same addresses are not affected"


def test_guesses_from_one_ipv6_64_count_as_one_client(make_stack):
    stack = proxied_stack(make_stack)
    before = password_checks(stack)
    codes = in_parallel(lambda n: auth(stack, f"2001:db8:1:2::{n:x}", ALICE, f"guess {n}"), range(1, 201))
    assert (codes.count(535), codes.count(454)) == (5, 195), sorted(codes)  # AUTH_FAILURES_PER_LOGIN from one client
    assert password_checks(stack) - before == 5
    # Other logins from the same /64: the client's limit (10 failures) counts the 5 above.
    codes = in_parallel(lambda n: auth(stack, f"2001:db8:1:2:{n:x}::1", f"u{n}@example.test", "guess"), range(30))
    assert (codes.count(535), codes.count(421)) == (5, 25), codes
    assert password_checks(stack) - before == 10
    assert auth(stack, "2001:db8:1:2:ffff::9", ALICE, ALICE_PASSWORD) == 421
    assert auth(stack, "2001:db8:1:3::1", ALICE, ALICE_PASSWORD) == 235, "the next /64 is another client"


def test_parallel_guesses_at_many_logins_from_one_address_cannot_overshoot_the_client_limit(make_stack):
    stack = proxied_stack(make_stack)
    before = password_checks(stack)
    codes = in_parallel(lambda n: auth(stack, "203.0.113.50", f"u{n}@example.test", "guess"), range(40), workers=40)
    assert (codes.count(535), codes.count(421)) == (10, 30), codes  # AUTH_FAILURES_PER_CLIENT
    assert password_checks(stack) - before == 10, "the limit is a reservation, not a read"


def test_fifty_simultaneous_right_password_logins_with_a_cold_cache_all_succeed(make_stack):
    # A user whose mail client opens 50 sessions at once, with nothing cached for them: a user
    # of their own for each round, so every round starts cold. 20 rounds.
    users = {f"user{r}@example.test": User(f"password {r}", [f"user{r}@example.test"]) for r in range(20)}
    stack = proxied_stack(make_stack, users)
    before = password_checks(stack)
    for r in range(20):
        codes = simultaneous(stack, "192.0.2.10", f"user{r}@example.test", f"password {r}", 50)
        assert codes == [235] * 50, f"round {r}: {sorted(map(str, codes))}"
    checks = password_checks(stack) - before
    print(f"\n1000 logins in 20 rounds of 50: {checks:.0f} password checks")
    assert checks < 100, "the sessions of a round share the check in flight"
