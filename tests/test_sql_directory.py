"""The SQL directory against a real PostgreSQL (Debian's, a cluster the dev kit makes): what a
login's row gives, the hash formats, suspended accounts, logins that are SQL, and what the
directory says when PostgreSQL is down, slow, busy or its queries are wrong."""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from passlib.hash import bcrypt, sha512_crypt

from submitd_common.users import verify_password
from submitd_devkit import postgres
from submitd_devkit.certs import CertificateAuthority
from submitd_devkit.ports import free_port
from submitd_policy.directories import DirectoryUnavailable
from submitd_policy.directories import sql
from submitd_policy.settings import Settings

pytestmark = pytest.mark.skipif(not postgres.available(), reason="PostgreSQL is not installed (apt-get install postgresql)")

ROOT = Path(__file__).resolve().parent.parent
ARGON2 = PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1)
HASHES = {  # the forms the users file reads, as a site's SQL table holds them
    "argon2id": lambda pw: ARGON2.hash(pw),
    "bcrypt $2y$": lambda pw: bcrypt.using(rounds=4, ident="2y").hash(pw),
    "{BLF-CRYPT} $2b$": lambda pw: "{BLF-CRYPT}" + bcrypt.using(rounds=4, ident="2b").hash(pw),
    "{SHA512-CRYPT} $6$": lambda pw: "{SHA512-CRYPT}" + sha512_crypt.using(rounds=5000).hash(pw),
}
ALICE, ALICE_PW = "alice@example.test", "alice's own password"


@pytest.fixture(scope="module")
def pg():
    with postgres.Postgres() as server:
        server.add_user(ALICE, ARGON2.hash(ALICE_PW), [ALICE, "a.lias@example.test", "@sales.example.test"],
                        messages_per_hour=20, recipients_per_hour=100,
                        allow_recipients=["@example.test", "friend@example.org"], deny_recipients=["ceo@example.test"])
        server.add_user("bob", ARGON2.hash("bob pw"), ["bob@example.test"], suspended=True)
        server.add_user("carol@example.test", None)
        server.share("team@example.test", ALICE, "carol@example.test")
        for n, make in enumerate(HASHES.values()):
            server.add_user(f"hash{n}@example.test", make(f"pw {n}"))
        server.sql("CREATE TABLE private (login text, password text)")  # the role may not read it
        yield server


def settings(pg: postgres.Postgres, **overrides) -> Settings:
    values = {k.lower(): v for k, v in pg.policy_env().items()}
    return Settings(users_file="/dev/null", **(values | overrides))


@pytest.fixture
async def directory(pg):
    d = sql.build(settings(pg))
    await d.start()
    yield d
    await d.close()


async def test_a_login_has_its_hash_addresses_limits_and_recipients_from_its_rows(directory):
    account = await directory.lookup(ALICE)
    assert account is not None and account.source == "sql" and account.login == ALICE
    user = account.user
    assert verify_password(user.password_hash, ALICE_PW) and not verify_password(user.password_hash, "guess")
    # send_as rows, a shared address (the second table of the UNION), a whole domain
    for address in (ALICE, "a.lias@example.test", "A.Lias@Example.TEST", "anyone@sales.example.test", "team@example.test"):
        assert user.may_send_as(address), address
    assert not user.may_send_as("mallory@example.test") and not user.may_send_as("ceo@example.test")
    assert (user.limits.messages_per_hour, user.limits.recipients_per_hour) == (20, 100)
    assert user.may_send_to("bob@example.test") and user.may_send_to("friend@example.org")
    assert not user.may_send_to("ceo@example.test") and not user.may_send_to("someone@example.org")
    assert not user.suspended and "127.0.0.1" in account.detail and directory.ready()


@pytest.mark.parametrize("n,form", list(enumerate(HASHES)))
async def test_every_hash_form_of_the_users_file_verifies_from_sql(directory, n, form):
    account = await directory.lookup(f"hash{n}@example.test")
    assert verify_password(account.user.password_hash, f"pw {n}")
    assert not verify_password(account.user.password_hash, f"pw {n + 1}")


async def test_a_suspended_row_is_a_suspended_account(directory, pg):
    assert (await directory.lookup("bob")).user.suspended
    account = await directory.lookup("carol@example.test")  # NULL columns: the defaults
    assert not account.user.suspended and account.user.allow_recipients is None
    assert account.user.may_send_as("carol@example.test") and account.user.may_send_as("team@example.test")
    assert not verify_password(account.user.password_hash, "") and not verify_password(account.user.password_hash, "!")


@pytest.mark.parametrize("login", ["x' OR '1'='1", "' OR 1=1 --", "%", "alice@example.test' --", ALICE.upper(), ""])
async def test_a_login_that_is_sql_is_only_an_unknown_login(directory, pg, login):
    assert await directory.lookup(login) is None
    assert pg.sql("SELECT count(*) FROM users")[0][0] == str(3 + len(HASHES))


async def test_text_columns_with_commas_read_as_lists(pg):
    query = ("SELECT password, suspended::text, array_to_string(allow_recipients, ', ') AS allow_recipients, "
             "array_to_string(deny_recipients, ',') AS deny_recipients, 'shared-box' AS act_as FROM users WHERE login = $1")
    send_as = "SELECT string_agg(address, ',') FROM send_as WHERE login = $1"
    d = sql.build(settings(pg, sql_user_query=query, sql_send_as_query=send_as))
    try:
        user = (await d.lookup(ALICE)).user
    finally:
        await d.close()
    assert user.may_send_to("friend@example.org") and not user.may_send_to("ceo@example.test")
    assert not user.may_send_to("someone@example.org")
    assert user.may_send_as("anyone@sales.example.test") and not user.may_send_as("team@example.test")
    assert user.act_as == {"shared-box"} and user.limits.messages_per_hour is None


async def test_two_rows_for_a_login_refuse_it_with_a_log_line(pg, caplog):
    d = sql.build(settings(pg, sql_user_query="SELECT password FROM users, generate_series(1, 2) WHERE login = $1"))
    try:
        with caplog.at_level(logging.WARNING, "submitd.policy.directories.sql"):
            assert await d.lookup(ALICE) is None
    finally:
        await d.close()
    assert any("2 rows" in r.getMessage() and ALICE in r.getMessage() for r in caplog.records)


async def test_postgresql_stopped_is_unavailable_never_unknown_and_it_recovers(pg, directory):
    assert await directory.lookup(ALICE) is not None  # a pooled connection, then the server goes
    pg.stop()
    try:
        for _ in range(2):  # the pooled connection (gone), then a new one (refused)
            with pytest.raises(DirectoryUnavailable):
                await directory.lookup(ALICE)
        with pytest.raises(DirectoryUnavailable, match="cannot reach postgresql 127.0.0.1"):
            await directory.lookup("nobody@example.test")
        assert not directory.ready()
    finally:
        pg.start()
    assert (await directory.lookup(ALICE)).login == ALICE and directory.ready()


async def test_a_lost_connection_is_replaced_and_a_rotated_password_read_from_its_file(pg, directory):
    assert await directory.lookup(ALICE) is not None
    pg.rotate_password()  # the Secret updated: new connections must use the new password
    assert pg.disconnect() == 1  # the pooled session ends (a failover, a restart)
    assert (await directory.lookup(ALICE)).login == ALICE  # at once: not one 454
    assert pg.disconnect() == 1 and directory.ready()


async def test_a_slow_query_is_unavailable(pg):
    d = sql.build(settings(pg, sql_timeout=0.5,
                           sql_user_query="SELECT password FROM users, pg_sleep(5) WHERE login = $1"))
    try:
        with pytest.raises(DirectoryUnavailable, match="no answer to a query within 0.5 s|57014"):
            await d.lookup(ALICE)
    finally:
        await d.close()


async def test_every_connection_busy_is_unavailable_for_those_that_waited_too_long(pg):
    # One connection, each lookup holding it 0.4 s, a second to get it: the first two are
    # served, the last of six has waited past its second.
    d = sql.build(settings(pg, sql_pool_size=1, sql_timeout=1.0,
                           sql_user_query="SELECT password FROM users, pg_sleep(0.4) WHERE login = $1"))
    try:
        await d.start()
        results = await asyncio.gather(*(d.lookup(ALICE) for _ in range(6)), return_exceptions=True)
    finally:
        await d.close()
    assert results[0].login == ALICE, results
    assert isinstance(results[-1], DirectoryUnavailable), results
    assert "all 1 connections of the pool busy for 1 s" in str(results[-1])
    assert all(r.login == ALICE if not isinstance(r, Exception) else isinstance(r, DirectoryUnavailable) for r in results)


@pytest.mark.parametrize("setting,query,message", [
    ("sql_user_query", "SELEC password FROM users WHERE login = $1", "syntax error"),
    ("sql_user_query", "SELECT password FROM userz WHERE login = $1", 'relation "userz" does not exist'),
    ("sql_user_query", "SELECT passwd AS password FROM users WHERE login = $1", 'column "passwd" does not exist'),
    ("sql_user_query", "SELECT password FROM private WHERE login = $1", "permission denied"),
    ("sql_user_query", "SELECT suspended FROM users WHERE login = $1", "no column named password"),
    ("sql_user_query", "SELECT password, suspended AS disabled FROM users WHERE login = $1", "does not read: disabled"),
    ("sql_user_query", "SELECT password FROM users WHERE login = $1 AND suspended = $2", "one parameter"),
    ("sql_user_query", "SELECT password FROM users LIMIT $1", "takes \\$1 as int8"),
    ("sql_send_as_query", "SELECT login, address FROM send_as WHERE login = $1", "one column"),
    ("sql_list_query", "SELECT login FROM users", "one parameter"),
])
async def test_a_wrong_query_fails_the_start_saying_which_and_why(pg, setting, query, message):
    d = sql.build(settings(pg, **{setting: query}))
    try:
        with pytest.raises(sql.QueryError, match=message) as raised:
            await d.start()
    finally:
        await d.close()
    assert setting in str(raised.value) and not d.ready()


async def test_postgresql_down_at_start_is_logged_and_lookups_are_unavailable(pg, caplog):
    d = sql.build(settings(pg, sql_dsn=f"postgresql://submitd@127.0.0.1:{free_port()}/mail", sql_timeout=1))
    try:
        with caplog.at_level(logging.WARNING, "submitd.policy.directories.sql"):
            await d.start()  # does not raise: policy starts, /readyz tells
        with pytest.raises(DirectoryUnavailable, match="ConnectionRefusedError"):
            await d.lookup(ALICE)
    finally:
        await d.close()
    assert any("454 4.7.0" in r.getMessage() for r in caplog.records) and not d.ready()


async def test_the_service_account_refused_is_unavailable_and_the_password_never_said(pg, tmp_path):
    wrong = tmp_path / "password"
    wrong.write_text("not-the-password-4711\n")
    d = sql.build(settings(pg, sql_password_file=str(wrong)))
    try:
        with pytest.raises(DirectoryUnavailable, match="28P01") as raised:  # invalid_password
            await d.lookup(ALICE)
    finally:
        await d.close()
    assert "4711" not in str(raised.value) and pg.password not in str(raised.value)


async def test_submitctl_user_ls_lists_logins_with_their_rights(directory):
    accounts = await directory.accounts(3)
    assert [a.login for a in accounts] == sorted([ALICE, "bob", "carol@example.test"])
    assert accounts[0].user.may_send_as("a.lias@example.test") and accounts[1].user.suspended


def test_a_dsn_with_a_password_or_tls_options_is_refused_without_quoting_it():
    for dsn in ("postgresql://submitd:hunter2@db/mail", "postgresql://submitd@db/mail?password=hunter2",
                "postgresql://submitd@db/mail?sslmode=disable"):
        with pytest.raises(ValueError) as raised:
            sql.build(Settings(users_file="/dev/null", sql_dsn=dsn))
        assert "hunter2" not in str(raised.value) and "SQL_" in str(raised.value)


async def test_the_readmes_example_schema_role_and_rows_work_with_the_default_queries(pg, tmp_path):
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Users from SQL"):]
    section = section[:section.index("\n## ")]
    for field in ("sql_user_query", "sql_send_as_query", "sql_list_query"):
        assert f"`{Settings.model_fields[field].default}`" in section, field
    schema, setup = re.findall(r"```sql\n(.*?)```", section, re.S)[:2]
    assert schema == postgres.EXAMPLE_SCHEMA
    # As the README says, in a database and with a role of their own (the cluster has a submitd role)
    pg.sql("CREATE DATABASE readme", "postgres")
    pg.sql(schema, "readme")
    setup = (setup.replace("submitd", "readme_reader").replace("PASSWORD '...'", "PASSWORD :'password'")
             .replace("'$argon2id$v=19$m=65536,t=3,p=4$...'", ":'hash'"))
    pg.sql(setup, "readme", password="readme pw", hash=ARGON2.hash("alice's password"))
    (tmp_path / "password").write_text("readme pw\n")
    d = sql.build(settings(pg, sql_dsn=f"postgresql://readme_reader@127.0.0.1:{pg.port}/readme",
                           sql_password_file=str(tmp_path / "password")))
    try:
        await d.start()
        user = (await d.lookup("alice@example.net")).user
    finally:
        await d.close()
    assert verify_password(user.password_hash, "alice's password")
    assert user.may_send_as("alice@example.net") and user.may_send_as("anyone@sales.example.net")
    assert not user.may_send_as("bob@example.net")


@pytest.fixture(scope="module")
def tls_pg(tmp_path_factory):
    ca = CertificateAuthority(tmp_path_factory.mktemp("pg-ca"), "submitd test PostgreSQL CA")
    with postgres.Postgres(tls=ca.issue("postgres")) as server:
        server.add_user(ALICE, ARGON2.hash(ALICE_PW), [ALICE])
        yield server, ca


@pytest.mark.parametrize("sslmode", ["verify-full", "verify-ca", "require"])
async def test_tls_to_postgresql_with_the_sites_ca(tls_pg, sslmode):
    server, ca = tls_pg
    d = sql.build(settings(server, sql_sslmode=sslmode, sql_ca_file=str(ca.path)))
    try:
        assert (await d.lookup(ALICE)).login == ALICE
        assert server.sql("SELECT bool_and(ssl) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) "
                          "WHERE usename = 'submitd'") == [["t"]]
    finally:
        await d.close()


async def test_tls_with_another_ca_or_to_a_server_without_tls_is_unavailable(tls_pg, pg, tmp_path):
    server, _ = tls_pg
    other = CertificateAuthority(tmp_path / "other", "someone else's CA")
    for target, sslmode, ca_file in ((server, "verify-full", str(other.path)), (pg, "require", None)):
        d = sql.build(settings(target, sql_sslmode=sslmode, sql_ca_file=ca_file))
        try:
            with pytest.raises(DirectoryUnavailable):
                await d.lookup(ALICE)
        finally:
            await d.close()
