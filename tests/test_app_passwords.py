"""SMTP-only app passwords (issue 27) against a real stack: made, listed and revoked with
``submitctl app-password`` (its own NATS user), checked by policy from its mirror of the NATS KV
bucket; revoked on every policy replica within a second."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import json
import re
import smtplib
import time

import pytest

from submitd_devkit import postgres
from submitd_devkit.ports import free_port
from submitd_devkit.stack import Stack, User
from submitd_devkit.testing.ctl import submitctl
from submitd_devkit.testing.plugin import module_stack
from submitd_devkit.testing.smtp import insecure_context
from submitd_devkit.testing.waiting import eventually, eventually_async
from submitd_ctl import apppasswords as ctl
from submitd_ctl.local import LocalSite

pytestmark = pytest.mark.timeout(180)

ALICE, BOB, CAROL, DAVE = (f"{n}@example.test" for n in ("alice", "bob", "carol", "dave"))
PASSWORDS = {ALICE: "alice's main passphrase", BOB: "bob's main passphrase", CAROL: "carol's main passphrase",
             DAVE: "dave's main passphrase"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    # Failures answered at once (the delay is tested elsewhere), and no per-client lockout from
    # the refusals this module provokes on purpose.
    yield from module_stack(
        tmp_path_factory.mktemp("stack"), users={u: User(p, [u]) for u, p in PASSWORDS.items()},
        env={"policy": {"AUTH_FAILURE_DELAY": "0.05", "AUTH_FAILURES_PER_CLIENT": "1000",
                         "AUTH_FAILURES_PER_LOGIN": "1000"}})


def add(stack: Stack, login: str, name: str) -> dict:
    out = submitctl(stack, "-o", "json", "app-password", "add", login, "--name", name)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def listing(stack: Stack, login: str) -> list[dict]:
    out = submitctl(stack, "-o", "json", "app-password", "ls", login)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def auth(port: int, login: str, password: str) -> int:
    """One AUTH PLAIN on a new connection: its reply code."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.example.test")
        client.starttls(context=insecure_context())
        client.ehlo("client.example.test")
        token = base64.b64encode(f"\0{login}\0{password}".encode()).decode()
        return client.docmd("AUTH", f"PLAIN {token}")[0]


def test_an_app_password_is_shown_once_submits_mail_and_is_listed_without_its_secret(stack):
    before = time.time()
    out = submitctl(stack, "app-password", "add", ALICE, "--name", "office printer")
    assert out.returncode == 0, out.stderr
    password = re.search(r"^  ([a-z2-7]{4}(?:-[a-z2-7]{4}){7})$", out.stdout, re.M).group(1)
    assert "shown only this once" in out.stdout

    # AUTH LOGIN, as a printer would, and a message accepted.
    with smtplib.SMTP("127.0.0.1", stack.ports.submission, timeout=30) as client:
        client.starttls(context=insecure_context())
        client.ehlo("printer.example.test")
        client.user, client.password = ALICE, password
        assert client.auth("LOGIN", client.auth_login, initial_response_ok=False)[0] == 235
        client.sendmail(ALICE, ["someone@example.net"], f"From: {ALICE}\r\nSubject: scan\r\n\r\nscanned\r\n")
    assert stack.sink.handler.wait_for(1, 20)[0].mail_from == ALICE
    # Typed without its dashes, in capitals: the same password. The main password still works.
    assert auth(stack.ports.submission, ALICE, password.replace("-", "").upper()) == 235
    assert auth(stack.ports.submission, ALICE, PASSWORDS[ALICE]) == 235

    # Listed with its name, when it was made and last used; never the secret, in any form.
    rows = eventually(lambda: [r for r in listing(stack, ALICE) if r["last_used"] != "never"])
    (row,) = rows
    assert set(row) == {"id", "name", "created", "last_used"} and row["name"] == "office printer"
    created = time.mktime(time.strptime(row["created"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    assert before - 1 <= created <= time.time() and row["last_used"] >= row["created"]
    table = submitctl(stack, "app-password", "ls", ALICE)
    assert table.stdout.split("\n")[0].split() == ["ID", "NAME", "CREATED", "LAST_USED"]
    assert row["id"] in table.stdout and "office printer" in table.stdout
    for text in (table.stdout, json.dumps(listing(stack, ALICE))):
        assert password not in text and password.replace("-", "") not in text and "verifier" not in text


def test_an_app_password_never_works_for_another_login(stack):
    secret = add(stack, ALICE, "phone")["password"]
    assert auth(stack.ports.submission, ALICE, secret) == 235
    assert auth(stack.ports.submission, BOB, secret) == 535
    assert auth(stack.ports.submission, "nobody@example.test", secret) == 535
    bobs = add(stack, BOB, "laptop")["password"]
    assert auth(stack.ports.submission, ALICE, bobs) == 535 and auth(stack.ports.submission, BOB, bobs) == 235


def test_a_main_password_change_keeps_app_passwords_and_a_suspension_stops_them(stack):
    secret = add(stack, CAROL, "script")["password"]
    assert auth(stack.ports.submission, CAROL, secret) == 235
    out = submitctl(stack, "user", "passwd", CAROL, "--password-stdin", stdin="carol's new passphrase\n")
    assert out.returncode == 0, out.stderr
    assert auth(stack.ports.submission, CAROL, PASSWORDS[CAROL]) == 535, "the old main password is refused"
    assert auth(stack.ports.submission, CAROL, "carol's new passphrase") == 235
    assert auth(stack.ports.submission, CAROL, secret) == 235, "the app password survives the change"

    assert submitctl(stack, "user", "suspend", CAROL).returncode == 0
    assert auth(stack.ports.submission, CAROL, secret) == 535, "a suspended user's app passwords are refused"
    assert submitctl(stack, "user", "resume", CAROL).returncode == 0
    assert auth(stack.ports.submission, CAROL, secret) == 235
    assert [r["name"] for r in listing(stack, CAROL)] == ["script"], "suspending revoked nothing"


def test_a_revoked_app_password_is_refused_within_a_second_by_every_policy_replica(stack):
    # A second policy replica on the same NATS, and a second frontend that asks only it: each
    # frontend's answer is its own replica's.
    grpc2, http2, smtp2, smtps2, internal2, fhttp2 = (free_port() for _ in range(6))
    stack.procs["policy2"] = stack.spawn("policy", stack.service_env("policy") | {
        "SUBMITD_POLICY_LISTEN": f"127.0.0.1:{grpc2}", "SUBMITD_POLICY_HTTP_LISTEN": f"127.0.0.1:{http2}"},
        str(stack.log_path("policy2")))
    stack.procs["frontend2"] = stack.spawn("frontend", stack.service_env("frontend") | {
        "SUBMITD_FRONTEND_POLICY_TARGET": f"127.0.0.1:{grpc2}",
        "SUBMITD_FRONTEND_SUBMISSION_LISTEN": f"127.0.0.1:{smtp2}",
        "SUBMITD_FRONTEND_SUBMISSIONS_LISTEN": f"127.0.0.1:{smtps2}",
        "SUBMITD_FRONTEND_INTERNAL_SUBMISSION_LISTEN": f"127.0.0.1:{internal2}",
        "SUBMITD_FRONTEND_HTTP_LISTEN": f"127.0.0.1:{fhttp2}"}, str(stack.log_path("frontend2")))
    try:
        ports = [stack.ports.submission, smtp2]
        made = add(stack, DAVE, "backup job")
        for port in ports:  # (the second replica is ready once it answers)
            eventually(lambda: _code(port, DAVE, made["password"]) == 235, timeout=30)

        # Sessions made ready beforehand (TLS up, EHLO done) on both frontends, so that what is
        # timed is the revocation reaching each replica, not a client's handshakes under load:
        # from the purge acknowledged to each replica's first 535, both asked in parallel.
        ready = {port: [_ready_session(port) for _ in range(5)] for port in ports}
        options = LocalSite(stack.root).nats_options()
        (gone,) = asyncio.run(ctl.revoke(options, DAVE, made["id"]))
        revoked = time.monotonic()
        assert gone.ident == made["id"]

        def first_refusal(port: int) -> float:
            token = base64.b64encode(f"\0{DAVE}\0{made['password']}".encode()).decode()
            while time.monotonic() - revoked < 5:
                client = ready[port].pop(0) if ready[port] else _ready_session(port)
                code = client.docmd("AUTH", f"PLAIN {token}")[0]
                client.close()
                if code == 535:
                    return time.monotonic() - revoked
                assert code == 235, code  # (asked before the revocation reached it)
            raise AssertionError(f"still accepted on {port} 5 s after the revocation")

        with concurrent.futures.ThreadPoolExecutor(len(ports)) as pool:
            took = dict(zip(ports, pool.map(first_refusal, ports)))
        for sessions in ready.values():
            for client in sessions:
                client.close()
        print(f"\nrevoked app password refused after {', '.join(f'{t * 1000:.0f} ms' for t in took.values())}")
        assert max(took.values()) < 1.0, took
        assert all(auth(port, DAVE, PASSWORDS[DAVE]) == 235 for port in ports), "the main password is untouched"
        assert listing(stack, DAVE) == []
    finally:
        stack.stop_service("frontend2")
        stack.stop_service("policy2")


def _ready_session(port: int) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", port, timeout=30)
    client.ehlo("client.example.test")
    client.starttls(context=insecure_context())
    client.ehlo("client.example.test")
    return client


def _code(port: int, login: str, password: str) -> int:
    try:
        return auth(port, login, password)
    except (OSError, smtplib.SMTPException):
        return 0  # not listening yet


def test_revoking_an_unknown_app_password_is_refused(stack):
    out = submitctl(stack, "app-password", "revoke", ALICE, "0123456789ab")
    assert out.returncode == 1 and "has no app password 0123456789ab" in out.stderr


class CuttableProxy:
    """TCP between policy and nats-server that the test can cut (every connection closed, new
    ones refused) and restore: policy loses NATS while submitctl still reaches it."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.server = None
        self.writers: set = set()

    async def start(self) -> None:

        async def pipe(reader, writer):
            try:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                writer.close()

        async def handle(client_reader, client_writer):
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            self.writers |= {client_writer, up_writer}
            await asyncio.gather(pipe(client_reader, up_writer), pipe(up_reader, client_writer))

        self.server = await asyncio.start_server(handle, "127.0.0.1", self.port)

    async def cut(self) -> None:
        self.server.close()
        for writer in self.writers:
            writer.close()
        self.writers.clear()
        await self.server.wait_closed()


def test_while_policy_may_have_missed_a_revocation_the_app_password_is_454_not_accepted(nats_server):
    asyncio.run(_missed_revocation(nats_server))


async def _missed_revocation(server) -> None:
    from submitd_common import jetstream, natsauth
    from submitd_policy.apppasswords import AppPasswords, AppPasswordsUnavailable

    proxy = CuttableProxy(server.port)
    await proxy.start()
    creds = server.credentials("policy")
    nc = await jetstream.connect("policy", {"servers": [f"nats://127.0.0.1:{proxy.port}"], "user": "policy",
                                            "password": creds["NATS_PASSWORD"], "inbox_prefix": creds["NATS_INBOX_PREFIX"]})
    await server.provision(buckets=[jetstream.KvSpec(jetstream.APPPASSWORDS_BUCKET, 0)])
    mirror = AppPasswords(nc)
    await mirror.start()
    operator = {"servers": [server.service_url], "user": "submitctl", "password": server.passwords["submitctl"],
                "inbox_prefix": natsauth.inbox_prefix("submitctl")}
    record, password = await ctl.add(operator, ALICE, "tablet")

    def answer():
        try:
            return "accepted" if mirror.check(ALICE, password) else "refused"
        except AppPasswordsUnavailable:
            return "unavailable"

    await eventually_async(lambda: answer() == "accepted")
    await proxy.cut()
    await eventually_async(lambda: not nc.is_connected)
    await ctl.revoke(operator, ALICE, record.ident)  # policy cannot hear it
    assert answer() == "unavailable", "a password that may have been revoked is not accepted (AUTH: 454)"
    assert mirror.check(ALICE, "any main password") is None, "main passwords go on to the directory"
    await proxy.start()  # NATS reachable again: the revocation was missed, the mirror is read again
    await eventually_async(lambda: answer() == "refused")
    assert len(mirror) == 0
    await mirror.close()
    await nc.close()
    proxy.server.close()


def test_user_rm_revokes_the_logins_app_passwords_so_a_login_made_again_finds_none(stack):
    erin = "erin@example.test"
    out = submitctl(stack, "user", "add", erin, "--password-stdin", stdin="erin's main passphrase\n")
    assert out.returncode == 0, out.stderr
    first, second = add(stack, erin, "one")["password"], add(stack, erin, "two")["password"]
    assert auth(stack.ports.submission, erin, first) == 235
    out = submitctl(stack, "user", "rm", erin)
    assert out.returncode == 0 and "2 app passwords of erin@example.test revoked" in out.stdout, out.stdout + out.stderr
    assert listing(stack, erin) == []
    out = submitctl(stack, "user", "add", erin, "--password-stdin", stdin="another erin's passphrase\n")
    assert out.returncode == 0, out.stderr
    assert auth(stack.ports.submission, erin, first) == 535 and auth(stack.ports.submission, erin, second) == 535
    # `revoke --all` for a login that lives elsewhere (LDAP, SQL), where submitctl removes no one.
    third = add(stack, erin, "three")["password"]
    out = submitctl(stack, "app-password", "revoke", erin, "--all")
    assert out.returncode == 0 and "(three) of erin@example.test revoked" in out.stdout, out.stderr
    assert auth(stack.ports.submission, erin, third) == 535


@pytest.mark.skipif(not postgres.available(), reason="PostgreSQL is not installed (apt-get install postgresql)")
def test_an_sql_login_uses_an_app_password_beside_its_sql_password_and_loses_it_when_suspended_in_sql(make_stack):
    # The login lives in PostgreSQL only (no users file entry): its app password works as well,
    # survives a new password in SQL, and stops when the row says suspended (within the TTL).
    from argon2 import PasswordHasher

    from submitd_devkit.testing.plugin import TEST_ARGON2

    hasher = PasswordHasher(time_cost=TEST_ARGON2["time_cost"], memory_cost=TEST_ARGON2["memory_kib"],
                            parallelism=TEST_ARGON2["parallelism"])
    frank = "frank@example.test"
    with postgres.Postgres() as pg:
        pg.add_user(frank, hasher.hash("frank's sql password"), [frank])
        stack = make_stack(users={}, env={"policy": pg.policy_env(
            DIRECTORIES='["sql"]', DIRECTORY_CACHE_SECONDS="1", AUTH_FAILURE_DELAY="0.05")})
        secret = add(stack, frank, "mail merge")["password"]
        assert auth(stack.ports.submission, frank, secret) == 235
        assert auth(stack.ports.submission, frank, "frank's sql password") == 235
        pg.set_password(frank, hasher.hash("frank's new sql password"))
        eventually(lambda: auth(stack.ports.submission, frank, "frank's sql password") == 535, timeout=10)
        assert auth(stack.ports.submission, frank, secret) == 235, "a new password in SQL revokes no app password"
        pg.suspend(frank)
        eventually(lambda: auth(stack.ports.submission, frank, secret) == 535, timeout=10)
        stack.stop(at_once=True)
