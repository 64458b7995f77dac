"""The ldap directory against a real slapd (the dev kit's: Debian's OpenLDAP, a generated config
and a small test directory): bind and compare modes, send-as from attributes and groups,
suspended accounts, Active Directory's conventions, filter injection, TLS, a server that is
down, and changes made in the directory seen at the next request (the chain caches, not the
directory)."""

from __future__ import annotations

import asyncio
import logging
import re
import shlex
from pathlib import Path

import pytest

from submitd_common.users import verify_password
from submitd_devkit.ldap import (BASE, HASHES_DN, HASHES_PASSWORD, SEARCH_DN, SEARCH_PASSWORD, Slapd, dn_of,
                                 password_of)
from submitd_devkit.ports import free_port
from submitd_policy.directories import DirectoryUnavailable, build
from submitd_policy.settings import Settings

AD = {"ldap_user_filter": "(&(objectCategory=person)(objectClass=user)(sAMAccountName={login}))",
      "ldap_login_attribute": "sAMAccountName", "ldap_group_filter": "(&(objectClass=group)(member={dn}))"}


@pytest.fixture(scope="module")
def slapd(tmp_path_factory) -> Slapd:
    server = Slapd(tmp_path_factory.mktemp("slapd")).start()
    yield server
    server.stop()


@pytest.fixture
def secrets(tmp_path) -> Path:
    (tmp_path / "search").write_text(SEARCH_PASSWORD + "\n")  # as a Secret mounted from `echo` would hold it
    (tmp_path / "hashes").write_text(HASHES_PASSWORD)
    return tmp_path


@pytest.fixture
async def make(slapd, secrets):
    """``make(**settings)``: an ldap directory built from policy's settings (StartTLS against
    the dev kit's CA unless told otherwise), closed when the test ends."""
    made = []

    def factory(**overrides):
        values = dict(users_file=str(secrets / "users.yaml"), directories=["ldap"], ldap_url=slapd.url,
                      ldap_starttls=True, ldap_ca_file=str(slapd.ca_file), ldap_bind_dn=SEARCH_DN,
                      ldap_bind_password_file=str(secrets / "search"), ldap_base_dn=BASE, directory_timeout=5)
        directory = build("ldap", Settings(**values | overrides), None)
        made.append(directory)
        return directory

    yield factory
    for directory in made:
        await directory.close()


async def test_bind_mode_reads_the_users_rights_and_checks_the_password_by_binding_as_them(make):
    ldap = make()
    account = await ldap.lookup("alice")
    assert account.source == "ldap" and account.detail == dn_of("alice")
    assert account.user.password_hash == ""  # the directory never hands out a hash in this mode
    user = account.user
    assert user.login == "alice" and not user.suspended
    for address in ("alice@example.test", "alice.smith@example.test", "sales@example.test", "Alice+news@Example.TEST"):
        assert user.may_send_as(address), address
    assert not user.may_send_as("support@example.test") and not user.may_send_as("bob@example.test")
    assert await ldap.check_password(account, password_of("alice")) is True
    assert await ldap.check_password(account, "not the password") is False
    assert await ldap.check_password(account, "") is False  # never an unauthenticated bind
    assert await ldap.check_password(account, password_of("alice")) is True  # the same connection, bound again
    assert ldap.ready()


async def test_a_login_is_found_whatever_its_case_and_named_as_the_directory_spells_it(make):
    account = await make().lookup("ALICE")
    assert account.login == "alice"  # one user for limits and logs, however it is typed


@pytest.mark.parametrize("uid", ["alice", "bob", "carol"])  # {ARGON2}, {CRYPT}$6$, {CRYPT}$2b$
async def test_compare_mode_hands_out_the_hash_for_the_hashing_pool(make, secrets, uid):
    ldap = make(ldap_mode="compare", ldap_bind_dn=HASHES_DN, ldap_bind_password_file=str(secrets / "hashes"))
    account = await ldap.lookup(uid)
    hashed = account.user.password_hash
    assert hashed and not hashed.startswith("{")
    assert verify_password(hashed, password_of(uid))
    assert not verify_password(hashed, password_of(uid) + "x")
    assert account.user.may_send_as(f"{uid}@example.test")


async def test_compare_mode_without_read_access_to_hashes_refuses_every_password(make, caplog):
    # The search-only account cannot read userPassword: nothing to compare, so nothing matches.
    account = await make(ldap_mode="compare").lookup("alice")
    assert account.user.password_hash and not verify_password(account.user.password_hash, password_of("alice"))
    assert "has no userpassword submitd can check" in caplog.text.lower()


async def test_groups_give_their_members_the_groups_addresses(make):
    ldap = make()
    bob = (await ldap.lookup("bob")).user
    assert bob.may_send_as("sales@example.test") and bob.may_send_as("support@example.test")
    carol = (await ldap.lookup("carol")).user
    assert not carol.may_send_as("sales@example.test") and carol.may_send_as("carol@example.test")
    without_groups = (await make(ldap_group_filter="").lookup("bob")).user
    assert not without_groups.may_send_as("sales@example.test")


async def test_a_suspended_or_ad_disabled_account_is_suspended(make, slapd):
    ldap = make()
    assert (await ldap.lookup("dave")).user.suspended  # submitdSuspended: TRUE
    assert (await ldap.lookup("frank")).user.suspended  # userAccountControl 514: ACCOUNTDISABLE
    assert not (await ldap.lookup("erin")).user.suspended  # 512: a normal account
    slapd.replace("erin", "userAccountControl", ["66050"])  # disabled, password never expires
    try:
        assert (await ldap.lookup("erin")).user.suspended
    finally:
        slapd.replace("erin", "userAccountControl", ["512"])


async def test_active_directory_proxy_addresses_count_only_as_smtp_without_the_prefix(make):
    ldap = make(**AD)
    account = await ldap.lookup("erin")
    user = account.user
    assert user.login == "erin"
    assert user.may_send_as("erin@example.test") and user.may_send_as("e.jones@example.test")
    assert {a.lower() for a in user.send_as} == {"erin@example.test", "e.jones@example.test",  # no X500:, no sip:
                                                 "support@example.test"}  # her group's
    assert not user.may_send_as("erin.phone@example.test")  # her sip: address
    assert await ldap.check_password(account, password_of("erin"))
    assert await ldap.lookup("alice") is None  # not an AD user: the filter decides


async def test_limits_and_recipient_rules_come_from_attributes_and_default_when_absent(make):
    ldap = make()
    bob = (await ldap.lookup("bob")).user
    assert (bob.limits.messages_per_hour, bob.limits.recipients_per_hour) == (7, None)
    assert not bob.may_send_to("ceo@example.test") and bob.may_send_to("anyone@elsewhere.example")
    carol = (await ldap.lookup("carol")).user
    assert carol.may_send_to("bob@example.test") and not carol.may_send_to("someone@elsewhere.example")
    alice = (await ldap.lookup("alice")).user
    assert alice.allow_recipients is None and alice.limits.messages_per_hour is None


@pytest.mark.parametrize("login", ["*", "*)(uid=*", "al*", "*)(mail=alice@example.test", "alice)(|(uid=*",
                                   "alice\\", "alice\0", "(alice)"])
async def test_a_login_that_would_widen_the_filter_finds_nobody(make, login):
    # Unescaped, "al*" and "*)(mail=alice@example.test" would each find exactly alice.
    assert await make().lookup(login) is None


async def test_two_entries_for_one_login_are_refused_and_logged(make, caplog):
    with caplog.at_level(logging.WARNING, "submitd.policy"):
        assert await make().lookup("twin") is None
    assert "more than one entry matches login 'twin'" in caplog.text


async def test_a_directory_that_is_down_is_unavailable_never_unknown(make, slapd, caplog):
    ldap = make()
    alice = await ldap.lookup("alice")
    assert await ldap.check_password(alice, password_of("alice"))
    slapd.stop()
    try:
        with pytest.raises(DirectoryUnavailable) as down:
            await ldap.lookup("alice")
        with pytest.raises(DirectoryUnavailable):
            await ldap.lookup("nobody")
        with pytest.raises(DirectoryUnavailable) as check:
            await ldap.check_password(alice, password_of("alice"))
        assert not ldap.ready()
    finally:
        slapd.start()
    assert password_of("alice") not in str(down.value) + str(check.value) + caplog.text
    # Its kept connections were closed by the restart: new ones, no error for the user.
    assert (await ldap.lookup("alice")).login == "alice"
    assert await ldap.check_password(alice, password_of("alice"))
    assert ldap.ready()


async def test_a_second_url_answers_when_the_first_server_is_down(make, slapd):
    ldap = make(ldap_url=f"ldap://127.0.0.1:{free_port()} {slapd.url}")
    account = await ldap.lookup("alice")
    assert account.login == "alice" and await ldap.check_password(account, password_of("alice"))


async def test_ldaps_and_starttls_verify_the_servers_certificate(make, slapd):
    account = await make(ldap_url=slapd.ldaps_url, ldap_starttls=False).lookup("alice")
    assert account.login == "alice"
    assert await make(ldap_url=slapd.ldaps_url, ldap_starttls=False).check_password(account, password_of("alice"))
    for untrusted in (make(ldap_url=slapd.ldaps_url, ldap_starttls=False, ldap_ca_file=None),
                      make(ldap_ca_file=None)):  # the system's CAs do not know the dev kit's
        with pytest.raises(DirectoryUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
            await untrusted.lookup("alice")


async def test_a_refused_or_missing_service_account_is_unavailable(make, secrets):
    (secrets / "wrong").write_text("not the service password")
    with pytest.raises(DirectoryUnavailable, match="service account was refused") as refused:
        await make(ldap_bind_password_file=str(secrets / "wrong")).lookup("alice")
    assert "not the service password" not in str(refused.value)
    with pytest.raises(DirectoryUnavailable, match="bind password file"):
        await make(ldap_bind_password_file=str(secrets / "absent")).lookup("alice")


async def test_a_change_in_the_directory_is_seen_at_the_next_request(make, slapd):
    ldap = make()
    bob = await ldap.lookup("bob")
    assert await ldap.check_password(bob, password_of("bob"))
    slapd.set_password("bob", "a new passphrase for bob")
    slapd.replace("bob", "mailAlternateAddress", ["robert@example.test"])
    try:
        assert not await ldap.check_password(bob, password_of("bob"))
        assert await ldap.check_password(bob, "a new passphrase for bob")
        assert (await ldap.lookup("bob")).user.may_send_as("robert@example.test")
    finally:
        slapd.set_password("bob", password_of("bob"))
        slapd.replace("bob", "mailAlternateAddress", [])


def established(port: int) -> int:
    """This machine's open TCP connections to ``port`` on 127.0.0.1 (/proc/net/tcp, state 01)."""
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return sum(1 for line in lines if line.split()[2] == f"0100007F:{port:04X}" and line.split()[3] == "01")


async def test_requests_share_a_bounded_pool_of_connections(make, slapd):
    ldap = make(ldap_pool_size=2)
    logins = ["alice", "bob", "carol", "erin"] * 8
    accounts = await asyncio.gather(*(ldap.lookup(login) for login in logins))
    assert [a.login for a in accounts] == logins
    checks = await asyncio.gather(*(ldap.check_password(a, password_of(a.login)) for a in accounts))
    assert all(checks)
    # 64 requests at once, at most two at a time: two threads, each with its search and bind connections.
    assert 1 <= established(slapd.port) <= 4


async def test_accounts_lists_the_directorys_users(make):
    ldap = make()
    everyone = await ldap.accounts()
    assert {"alice", "bob", "carol", "dave", "erin", "frank"} <= {a.login for a in everyone}
    alice = next(a for a in everyone if a.login == "alice")
    assert alice.user.may_send_as("sales@example.test") and alice.detail == dn_of("alice")
    assert len(await ldap.accounts(limit=3)) == 3


def readme_settings(containing: str) -> dict[str, str]:
    """The environment one of the README's LDAP examples sets (the block with ``containing``)."""
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    blocks = [b for b in re.findall(r"```sh\n(.*?)```", readme, re.S) if "SUBMITD_POLICY_LDAP_URL" in b and containing in b]
    assert len(blocks) == 1, containing
    return dict(line.split("=", 1) for line in shlex.split(blocks[0], comments=True))


@pytest.mark.parametrize("example", ["inetOrgPerson", "sAMAccountName"])
async def test_the_readmes_examples_map_the_dev_kits_directory(example, slapd, secrets, monkeypatch):
    """The README's OpenLDAP and Active Directory settings, as an operator pastes them, with only
    where the server is (URL, CA, service account, base DN) pointing at the dev kit's slapd."""
    env = readme_settings(example)
    env |= {"SUBMITD_POLICY_LDAP_URL": slapd.url, "SUBMITD_POLICY_LDAP_STARTTLS": "true",
            "SUBMITD_POLICY_LDAP_CA_FILE": str(slapd.ca_file), "SUBMITD_POLICY_LDAP_BIND_DN": SEARCH_DN,
            "SUBMITD_POLICY_LDAP_BIND_PASSWORD_FILE": str(secrets / "search"), "SUBMITD_POLICY_LDAP_BASE_DN": BASE,
            "SUBMITD_POLICY_USERS_FILE": str(secrets / "users.yaml")}
    if "SUBMITD_POLICY_LDAP_GROUP_BASE_DN" in env:
        env["SUBMITD_POLICY_LDAP_GROUP_BASE_DN"] = f"ou=groups,{BASE}"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert "ldap" in settings.directories
    ldap = build("ldap", settings, None)
    try:
        login = "alice" if example == "inetOrgPerson" else "erin"
        account = await ldap.lookup(login)
        assert account.login == login and await ldap.check_password(account, password_of(login))
        shared = "sales@example.test" if login == "alice" else "support@example.test"
        assert account.user.may_send_as(shared)
        if example == "sAMAccountName":
            assert account.user.may_send_as("e.jones@example.test")
            assert (await ldap.lookup("frank")).user.suspended
            assert await ldap.lookup("alice") is None  # not an AD user
    finally:
        await ldap.close()
