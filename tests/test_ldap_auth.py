"""Users from LDAP end to end: a real slapd (the dev kit's) behind a whole stack whose policy has
``DIRECTORIES=["ldap"]``, driven by smtplib as a mail client would: AUTH by an LDAP bind, send-as
from the entry and its groups, a disabled account, a wrong password, slapd down (454, while a
login in the cache goes on), and changes made in slapd seen within the TTL, a changed password
included although the old one was in the credential cache."""

from __future__ import annotations

import base64
import json
import smtplib

import pytest

from submitd_devkit.ldap import BASE, HASHES_DN, HASHES_PASSWORD, SEARCH_DN, SEARCH_PASSWORD, Slapd, password_of
from submitd_devkit.testing.metrics import sample
from submitd_devkit.testing.plugin import module_stack
from submitd_devkit.testing.ctl import submitctl
from submitd_devkit.testing.smtp import connect, reply_of
from submitd_devkit.testing.waiting import eventually

pytestmark = pytest.mark.timeout(120)
TTL = 2.0  # DIRECTORY_CACHE_SECONDS: what a change in slapd may take to be seen
MSG = b"From: alice@example.test\r\nTo: someone@elsewhere.example\r\nSubject: ldap\r\n\r\nbody\r\n"


def ldap_env(slapd: Slapd, secrets, **more: str) -> dict[str, str]:
    (secrets / "search").write_text(SEARCH_PASSWORD + "\n")
    return {"DIRECTORIES": '["ldap"]', "LDAP_URL": slapd.url, "LDAP_STARTTLS": "true",
            "LDAP_CA_FILE": str(slapd.ca_file), "LDAP_BASE_DN": BASE, "LDAP_BIND_DN": SEARCH_DN,
            "LDAP_BIND_PASSWORD_FILE": str(secrets / "search"), "DIRECTORY_CACHE_SECONDS": str(TTL),
            # Failures answered at once and never locking this client out: a test waits on some.
            "AUTH_FAILURE_DELAY": "0.05", "AUTH_FAILURES_PER_CLIENT": "1000", "AUTH_FAILURES_PER_LOGIN": "1000",
            **more}


@pytest.fixture(scope="module")
def slapd(tmp_path_factory):
    server = Slapd(tmp_path_factory.mktemp("slapd")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def ldap_stack(slapd, tmp_path_factory):
    root = tmp_path_factory.mktemp("stack")
    (root / "admin-token").write_text("ldap-admin-token\n")  # submitctl --local reads it
    yield from module_stack(root, users={}, env={"policy": ldap_env(slapd, root),
                                                 "relay": {"ADMIN_TOKEN_FILE": str(root / "admin-token")}})


def auth(stack, login: str, password: str) -> tuple[int, str, smtplib.SMTP]:
    """One AUTH PLAIN in a new session (smtplib's login() would try LOGIN after a refusal)."""
    client = connect(stack)
    token = base64.b64encode(f"\0{login}\0{password}".encode()).decode()
    code, text = reply_of(client, f"AUTH PLAIN {token}")
    return code, text, client


def auth_code(stack, login: str, password: str) -> tuple[int, str]:
    code, text, client = auth(stack, login, password)
    client.quit()
    return code, text


def mail_from(stack, login: str, address: str) -> tuple[int, str]:
    code, _, client = auth(stack, login, password_of(login))
    assert code == 235, code
    try:
        return reply_of(client, f"MAIL FROM:<{address}>")
    finally:
        client.quit()


def test_an_ldap_user_logs_in_with_the_directorys_password_and_sends(ldap_stack):
    client = connect(ldap_stack)
    client.login("alice", password_of("alice"))  # smtplib: AUTH PLAIN
    client.sendmail("alice@example.test", ["someone@elsewhere.example"], MSG)
    client.quit()
    got = ldap_stack.sink.handler.wait_for(1, 20)
    assert got[0].mail_from == "alice@example.test" and got[0].rcpt_tos == ["someone@elsewhere.example"]


@pytest.mark.parametrize("login,address", [("alice", "alice@example.test"),  # mail
                                           ("alice", "alice.smith@example.test"),  # mailAlternateAddress
                                           ("alice", "sales@example.test"),  # a group's mail
                                           ("bob", "support@example.test")])
def test_send_as_from_the_entry_and_its_groups(ldap_stack, login, address):
    assert mail_from(ldap_stack, login, address)[0] == 250


def test_a_foreign_address_is_refused(ldap_stack):
    # support@ is the group of bob's, not alice's
    for address in ("support@example.test", "bob@example.test", "alice@elsewhere.example"):
        code, text = mail_from(ldap_stack, "alice", address)
        assert (code, text[:5]) == (550, "5.7.1"), (address, code, text)


def test_a_wrong_password_or_a_disabled_account_is_refused(ldap_stack):
    assert auth_code(ldap_stack, "alice", "not alice's password") == (535, "5.7.8 Authentication credentials invalid")
    for login in ("dave", "frank"):  # submitdSuspended TRUE; AD userAccountControl with the disabled bit
        assert auth_code(ldap_stack, login, password_of(login))[0] == 535, login
    assert auth_code(ldap_stack, "nobody", "anything")[0] == 535
    assert auth_code(ldap_stack, "*", "anything")[0] == 535


def test_slapd_down_is_454_while_a_login_in_the_cache_goes_on(ldap_stack, slapd):
    assert auth_code(ldap_stack, "carol", password_of("carol"))[0] == 235
    policy_http = ldap_stack.ports.policy_http
    graced = sample(policy_http, "submitd_policy_auth_cache_total", result="grace")
    slapd.stop()
    try:
        assert auth_code(ldap_stack, "erin", password_of("erin")) == (
            454, "4.7.0 Temporary authentication failure, try again later")  # never 535: erin's password is right
        # carol keeps working before and after her entry's TTL, then through the grace.
        def carol_through_the_grace() -> bool:
            assert auth_code(ldap_stack, "carol", password_of("carol"))[0] == 235
            return sample(policy_http, "submitd_policy_auth_cache_total", result="grace") > graced

        eventually(carol_through_the_grace, TTL + 10, 0.3)
        assert mail_from(ldap_stack, "carol", "carol@example.test")[0] == 250
    finally:
        slapd.start()
    assert auth_code(ldap_stack, "erin", password_of("erin"))[0] == 235


def test_an_attribute_changed_in_slapd_is_seen_within_the_ttl(ldap_stack, slapd):
    assert mail_from(ldap_stack, "bob", "bob@example.test")[0] == 250
    assert mail_from(ldap_stack, "bob", "robert@example.test")[0] == 550
    slapd.replace("bob", "mailAlternateAddress", ["robert@example.test"])
    try:
        eventually(lambda: mail_from(ldap_stack, "bob", "robert@example.test")[0] == 250, TTL + 3)
    finally:
        slapd.replace("bob", "mailAlternateAddress", [])
    eventually(lambda: mail_from(ldap_stack, "bob", "robert@example.test")[0] == 550, TTL + 3)


def test_a_disabled_account_is_refused_within_the_ttl_though_its_password_is_cached(ldap_stack, slapd):
    assert auth_code(ldap_stack, "erin", password_of("erin"))[0] == 235
    slapd.replace("erin", "userAccountControl", ["514"])
    try:
        eventually(lambda: auth_code(ldap_stack, "erin", password_of("erin"))[0] == 535, TTL + 3)
    finally:
        slapd.replace("erin", "userAccountControl", ["512"])


def test_a_password_changed_in_slapd_replaces_the_cached_one_within_the_ttl(ldap_stack, slapd):
    new = "bob's new LDAP passphrase"
    assert auth_code(ldap_stack, "bob", password_of("bob"))[0] == 235  # now in the credential cache
    slapd.set_password("bob", new)
    try:
        # The old one goes on from the cache until the TTL, then is refused; the new one works at once then.
        eventually(lambda: auth_code(ldap_stack, "bob", password_of("bob"))[0] == 535, TTL + 3)
        assert auth_code(ldap_stack, "bob", new)[0] == 235
        assert auth_code(ldap_stack, "bob", password_of("bob"))[0] == 535
    finally:
        slapd.set_password("bob", password_of("bob"))


def test_compare_mode_over_ldaps_checks_the_hash_in_policy(make_stack, slapd, tmp_path):
    (tmp_path / "hashes").write_text(HASHES_PASSWORD)
    env = ldap_env(slapd, tmp_path, LDAP_MODE="compare", LDAP_URL=slapd.ldaps_url, LDAP_STARTTLS="false",
                   LDAP_BIND_DN=HASHES_DN, LDAP_BIND_PASSWORD_FILE=str(tmp_path / "hashes"))
    stack = make_stack(users={}, env={"policy": env})
    verified = sample(stack.ports.policy_http, "submitd_policy_password_verifications_total", result="match")
    for login in ("alice", "bob", "carol"):  # {ARGON2}, {CRYPT}$6$, {CRYPT}$2b$
        assert auth_code(stack, login, password_of(login))[0] == 235, login
    assert auth_code(stack, "alice", "not alice's password")[0] == 535
    # Checked by policy's hashing pool, not by a bind.
    assert sample(stack.ports.policy_http, "submitd_policy_password_verifications_total", result="match") == verified + 3
    assert mail_from(stack, "alice", "sales@example.test")[0] == 250


def test_submitctl_lists_the_directorys_users_with_their_rights(ldap_stack):
    listing = submitctl(ldap_stack, "user", "ls", "-o", "json")
    assert listing.returncode == 0, listing.stderr
    rows = {r["login"]: r for r in json.loads(listing.stdout)}
    assert {"alice", "bob", "carol", "dave", "erin", "frank"} <= set(rows)
    assert {r["source"] for r in rows.values()} == {"ldap"}
    assert "sales@example.test" in rows["alice"]["send_as"] and rows["alice"]["scheme"] == "directory"
    assert rows["dave"]["suspended"] and rows["frank"]["suspended"] and not rows["erin"]["suspended"]
    assert rows["bob"]["limits"] == {"messages_per_hour": 7} and rows["bob"]["deny_recipients"] == ["ceo@example.test"]
    shown = submitctl(ldap_stack, "user", "show", "erin")
    assert shown.returncode == 0, shown.stderr
    assert "source:     ldap" in shown.stdout and "uid=erin,ou=people,dc=example,dc=test" in shown.stdout
    assert "e.jones@example.test" in shown.stdout and "X500" not in shown.stdout
