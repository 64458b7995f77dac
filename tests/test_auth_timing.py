"""A failed AUTH takes as long whether the login exists or not and whatever its hash (issue 25,
item 9): otherwise the reply time tells an attacker which logins exist, and which are on a
cheap legacy hash. Measured from outside, as an attacker would: the time from AUTH to its reply,
medians over interleaved rounds."""

from __future__ import annotations

import base64
import smtplib
import statistics
import time

import pytest
from passlib.hash import bcrypt, sha512_crypt

from submitd_devkit.stack import User
from submitd_devkit.testing.users import ALICE, ALICE_PASSWORD
from submitd_devkit.testing.smtp import connect
from submitd_policy.settings import Settings

pytestmark = pytest.mark.timeout(120)
DELAY = Settings.model_fields["auth_failure_delay"].default  # the default: 1 s
ROUNDS = 6


def timed_auth(client: smtplib.SMTP, login: str, password: str) -> tuple[int, float]:
    token = base64.b64encode(f"\0{login}\0{password}".encode()).decode()
    started = time.perf_counter()
    code = client.docmd("AUTH", f"PLAIN {token}")[0]
    return code, time.perf_counter() - started


def test_a_failed_auth_takes_as_long_for_any_login_and_any_hash(make_stack):
    # Four kinds of failure: argon2id at the configured cost, bcrypt at cost 11 (~0.13 s of CPU
    # here), SHA512-CRYPT at 5,000 rounds (~3 ms) and a login that does not exist.
    users = {
        ALICE: User(ALICE_PASSWORD, [ALICE]),
        "legacy-bcrypt@example.test": User("", [], hashed=bcrypt.using(rounds=11).hash("right")),
        "legacy-sha@example.test": User("", [], hashed=sha512_crypt.using(rounds=5000).hash("right")),
    }
    stack = make_stack(users=users, env={"policy": {
        "AUTH_FAILURES_PER_LOGIN": "1000", "AUTH_FAILURES_PER_CLIENT": "1000",
        "AUTH_LOGIN_FAILURE_BUDGET": "1000"}})
    kinds = [ALICE, "legacy-bcrypt@example.test", "legacy-sha@example.test", "nobody@example.test"]
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(ROUNDS):
        with connect(stack) as client:
            for kind in kinds[r % 4:] + kinds[:r % 4]:  # each kind first, second ... in turn
                code, seconds = timed_auth(client, kind, f"wrong {r}")
                assert code == 535
                times[kind].append(seconds)
    medians = {k: statistics.median(v) for k, v in times.items()}
    print("\nfailed AUTH, median of %d: %s" % (ROUNDS, ", ".join(f"{k.split('@')[0]} {v * 1000:.0f} ms" for k, v in medians.items())))
    assert min(min(v) for v in times.values()) >= DELAY - 0.01, "every failure waits AUTH_FAILURE_DELAY"
    spread = max(medians.values()) - min(medians.values())
    assert spread < 0.05, f"medians differ by {spread * 1000:.0f} ms: {medians}"
