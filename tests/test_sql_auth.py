"""Logins from PostgreSQL through a whole stack: a real cluster (Debian's postgresql, made by the
dev kit) behind the policy (``DIRECTORIES=["sql"]``), a mail client on the submission port.
What a user sees: AUTH with each hash form, send-as from the second query, suspended accounts,
wrong passwords, PostgreSQL down (454, while logins in the cache keep working), and changes in
SQL seen within the directory cache's TTL, an old password included."""

from __future__ import annotations

import base64
import json
import smtplib
import time
import urllib.request
from collections.abc import Iterator

import pytest
from argon2 import PasswordHasher
from passlib.hash import bcrypt, sha512_crypt

from submitd_devkit import postgres
from submitd_devkit.stack import Stack
from submitd_devkit.testing.metrics import sample
from submitd_devkit.testing.plugin import TEST_ARGON2, module_stack
from submitd_devkit.testing.ctl import submitctl
from submitd_devkit.testing.smtp import connect
from submitd_devkit.testing.waiting import eventually

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(not postgres.available(), reason="PostgreSQL is not installed (apt-get install postgresql)")]

TTL = 1.0  # DIRECTORY_CACHE_SECONDS: a change in SQL is seen within it
ARGON2 = PasswordHasher(time_cost=TEST_ARGON2["time_cost"], memory_cost=TEST_ARGON2["memory_kib"],
                        parallelism=TEST_ARGON2["parallelism"])
USERS = {  # login: (password, hash as the site's table holds it)
    "alice@example.test": ("alice pw", lambda pw: ARGON2.hash(pw)),
    "bob@example.test": ("bob pw", lambda pw: bcrypt.using(rounds=4, ident="2y").hash(pw)),
    "carol@example.test": ("carol pw", lambda pw: "{SHA512-CRYPT}" + sha512_crypt.using(rounds=5000).hash(pw)),
}
ALICE, ALICE_PW = "alice@example.test", "alice pw"


@pytest.fixture(scope="module")
def pg() -> Iterator[postgres.Postgres]:
    with postgres.Postgres() as server:
        for login, (password, make) in USERS.items():
            server.add_user(login, make(password), [login, f"@{login.split('@')[0]}.example.test"])
        server.add_user("dora@example.test", ARGON2.hash("dora pw"), ["dora@example.test"], suspended=True)
        server.share("team@example.test", ALICE, "bob@example.test")
        yield server


@pytest.fixture(scope="module")
def sql_stack(pg, tmp_path_factory) -> Iterator[Stack]:
    env = pg.policy_env(DIRECTORIES='["sql"]', DIRECTORY_CACHE_SECONDS=str(TTL), DIRECTORY_GRACE_SECONDS="3600",
                        DIRECTORY_TIMEOUT="2", SQL_TIMEOUT="1", AUTH_FAILURE_DELAY="0.05",
                        AUTH_FAILURES_PER_CLIENT="1000", AUTH_FAILURES_PER_LOGIN="1000")
    root = tmp_path_factory.mktemp("sql-stack")
    (root / "admin-token").write_text("sql-admin-token\n")  # submitctl --local reads the users API with it
    relay = {"ADMIN_TOKEN_FILE": str(root / "admin-token")}
    yield from module_stack(root, users={}, env={"policy": env, "relay": relay})


def auth(stack: Stack, login: str, password: str) -> tuple[int, str]:
    """One AUTH PLAIN on a new session (smtplib's login() would try LOGIN after a refusal)."""
    with connect(stack) as client:
        return _auth(client, login, password)


def _auth(client: smtplib.SMTP, login: str, password: str) -> tuple[int, str]:
    token = base64.b64encode(f"\0{login}\0{password}".encode()).decode()
    code, text = client.docmd("AUTH", f"PLAIN {token}")
    return code, text.decode()


def mail_from(stack: Stack, login: str, password: str, address: str) -> tuple[int, str]:
    with connect(stack) as client:
        assert _auth(client, login, password)[0] == 235
        code, text = client.mail(address)
        return code, text.decode()


def refused_mail(client: smtplib.SMTP, address: str) -> str | None:
    """The refusal of MAIL FROM on an open session, or None (and the transaction reset)."""
    code, text = client.mail(address)
    if code == 250:
        client.rset()
        return None
    return f"{code} {text.decode()}"


@pytest.mark.parametrize("login", list(USERS))
def test_auth_with_each_hash_form_from_sql(sql_stack, login):
    password = USERS[login][0]
    assert auth(sql_stack, login, password) == (235, "2.7.0 Authentication successful")


def test_a_wrong_password_or_an_unknown_login_is_535(sql_stack):
    assert auth(sql_stack, ALICE, "not alice's") == (535, "5.7.8 Authentication credentials invalid")
    assert auth(sql_stack, "x' OR '1'='1", ALICE_PW)[0] == 535
    assert auth(sql_stack, "nobody@example.test", "pw")[0] == 535


def test_send_as_comes_from_the_second_query(sql_stack):
    for address in (ALICE, "anything@alice.example.test", "team@example.test"):
        assert mail_from(sql_stack, ALICE, ALICE_PW, address)[0] == 250, address
    code, text = mail_from(sql_stack, ALICE, ALICE_PW, "bob@example.test")
    assert code == 550 and text.startswith("5.7.1"), (code, text)
    assert mail_from(sql_stack, "carol@example.test", "carol pw", "team@example.test")[0] == 550


def test_a_suspended_account_is_refused(sql_stack):
    assert auth(sql_stack, "dora@example.test", "dora pw")[0] == 535


def test_postgresql_down_is_454_while_a_cached_login_keeps_working(sql_stack, pg):
    pg.add_user("gina@example.test", ARGON2.hash("gina pw"), ["gina@example.test"])  # never looked up
    assert auth(sql_stack, "bob@example.test", "bob pw")[0] == 235  # cached: account and credential
    stale = sample(sql_stack.ports.policy_http, "submitd_policy_directory_cache_total", result="stale")
    pg.stop()
    try:
        assert auth(sql_stack, "gina@example.test", "gina pw") == (
            454, "4.7.0 Temporary authentication failure, try again later")
        # /readyz says so, and keeps policy in service: cached logins still work
        status, ready = readyz(sql_stack)
        assert status == 200 and ready["ready"] and ready["reports"] == {"directory_sql": False}, ready
        # past the TTL, bob's last answer stands in (the grace): the directory was asked and is down
        eventually(lambda: auth(sql_stack, "bob@example.test", "bob pw")[0] == 235 and sample(
            sql_stack.ports.policy_http, "submitd_policy_directory_cache_total", result="stale") > stale,
            timeout=TTL + 10)
        assert mail_from(sql_stack, "bob@example.test", "bob pw", "bob@example.test")[0] == 250
        assert auth(sql_stack, "bob@example.test", "wrong")[0] == 535  # the grace knows bob's hash
    finally:
        pg.start()
    assert auth(sql_stack, "gina@example.test", "gina pw")[0] == 235
    assert readyz(sql_stack)[1]["reports"] == {"directory_sql": True}


def readyz(stack) -> tuple[int, dict]:
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.ports.policy_http}/readyz", timeout=10) as answer:
        return answer.status, json.loads(answer.read())


def test_a_changed_row_is_seen_within_the_ttl(sql_stack, pg):
    login, password = "erin@example.test", "erin pw"
    pg.add_user(login, ARGON2.hash(password), [login])
    assert mail_from(sql_stack, login, password, "erin@shared.example.test")[0] == 550
    pg.add_send_as(login, "@shared.example.test")
    changed = time.monotonic()
    eventually(lambda: mail_from(sql_stack, login, password, "erin@shared.example.test")[0] == 250, timeout=TTL + 10)
    assert time.monotonic() - changed < TTL + 4
    # a session that is open when the account is suspended: its next MAIL is refused
    with connect(sql_stack) as client:
        assert _auth(client, login, password)[0] == 235
        pg.suspend(login)
        changed = time.monotonic()
        refusal = eventually(lambda: refused_mail(client, login), timeout=TTL + 10)
        assert time.monotonic() - changed < TTL + 4
    assert refusal == "550 5.7.1 Account suspended"
    assert auth(sql_stack, login, password)[0] == 535


def test_a_password_changed_in_sql_old_refused_new_accepted_within_the_ttl(sql_stack, pg):
    login, old, new = "fred@example.test", "fred old pw", "fred new pw"
    pg.add_user(login, ARGON2.hash(old), [login])
    assert auth(sql_stack, login, old)[0] == 235
    assert auth(sql_stack, login, old)[0] == 235  # now from the credential cache
    pg.set_password(login, bcrypt.using(rounds=4).hash(new))
    changed = time.monotonic()
    eventually(lambda: auth(sql_stack, login, old)[0] == 535, timeout=TTL + 10)
    assert time.monotonic() - changed < TTL + 4
    assert auth(sql_stack, login, new)[0] == 235
    assert auth(sql_stack, login, old)[0] == 535


def test_a_wrong_query_stops_policy_at_start_saying_why(pg, make_stack):
    env = pg.policy_env(DIRECTORIES='["sql"]', SQL_USER_QUERY="SELECT password FROM userz WHERE login = $1")
    stack = make_stack(start=False, users={}, env={"policy": env})
    with pytest.raises(RuntimeError, match="policy exited") as raised:
        stack.start(services=("policy",))
    assert 'sql_user_query is refused by PostgreSQL (42P01): relation "userz" does not exist' in str(raised.value)


def test_submitctl_user_ls_and_show_read_the_sql_logins(sql_stack, pg):
    listing = submitctl(sql_stack, "user", "ls", "-o", "json")
    assert listing.returncode == 0, listing.stderr
    rows = {r["login"]: r for r in json.loads(listing.stdout)}
    assert {*USERS, "dora@example.test"} <= set(rows) and {r["source"] for r in rows.values()} == {"sql"}
    assert rows["dora@example.test"]["suspended"] is True and rows["bob@example.test"]["scheme"] == "2y"
    assert "team@example.test" in rows[ALICE]["send_as"] and "$argon2" not in listing.stdout
    shown = submitctl(sql_stack, "user", "show", "carol@example.test")
    assert shown.returncode == 0, shown.stderr
    assert "source:     sql" in shown.stdout and f"postgresql 127.0.0.1:{pg.port}/mail" in shown.stdout
