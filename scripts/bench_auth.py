"""`make bench BENCH_ARGS="--only auth"`: what an AUTH costs with each directory, in one run.

For every directory (the users file, LDAP bind against slapd, SQL against PostgreSQL, a JWT from
an OpenID Connect provider): a stack that knows USERS logins there, and 20 concurrent clients doing
what a mail client does (connect, STARTTLS, EHLO, AUTH, one message, QUIT):

- cold: each login's first AUTH (the directory is asked; a hash is checked where the directory
  hands one out), one round over all the logins;
- cached: the same logins again and again (the credential cache and the chain's TTL cache);
- no msg: cached again, each connection AUTH and QUIT only (policy's cost of the AUTH itself
  and its session, without MAIL, RCPT and DATA).

Printed per directory and round: policy CPU per AUTH (ms, from /proc), AUTH latency p50/p99 (from
the AUTH line sent to its 235), msg/s. Issue 27's goals: a cached AUTH costs the same for every
directory (< 1 ms of policy CPU); a cold LDAP bind adds at most one directory round trip; JWT
validation < 1 ms of CPU once the keys are known.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from benchkit import _reply, client_tls, p50, percentile, proc_cpu, starttls_session
from submitd_devkit.sink import Sink

USERS = 200  # logins per directory
PASSWORD = "bench password {i}"
ARGON2 = {"time_cost": 2, "memory_kib": 19456, "parallelism": 1}  # OWASP's minimum: the cold round's hash


@dataclass
class Case:
    """A directory: ``start(work, sink)`` returns a started Stack (and whatever must be stopped
    after it), ``auth(i)`` the AUTH line's argument for login i."""

    name: str
    start: Callable
    auth: Callable[[int], bytes]
    stop: list = field(default_factory=list)


@dataclass
class AuthRound:
    auths: int = 0
    failed: int = 0
    seconds: float = 0.0
    cpu: float = 0.0
    latencies: list[float] = field(default_factory=list)
    refusals: dict[str, int] = field(default_factory=dict)


def login(i: int) -> str:
    return f"user{i}@example.test"


def plain(i: int) -> bytes:
    return b"PLAIN " + base64.b64encode(f"\0{login(i)}\0{PASSWORD.format(i=i)}".encode())


async def _one(port: int, i: int, line: bytes, ctx, result: AuthRound, message: bool = True) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await starttls_session(port, ctx, reader, writer)
        t0 = time.perf_counter()
        writer.write(b"AUTH " + line + b"\r\n")
        reply = await _reply(reader)
        result.latencies.append(time.perf_counter() - t0)
        if not reply.startswith(b"235"):
            result.failed += 1
            result.refusals[reply[:40].decode(errors="replace").strip()] = result.refusals.get(
                reply[:40].decode(errors="replace").strip(), 0) + 1
            return
        sender = login(i)
        if not message:
            writer.write(b"QUIT\r\n")
            await _reply(reader)
            result.auths += 1
            return
        writer.write(f"MAIL FROM:<{sender}>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n".encode())
        replies = [await _reply(reader) for _ in range(3)]
        if replies[2].startswith(b"354"):
            writer.write(f"From: {sender}\r\nSubject: auth bench\r\n\r\nhello\r\n.\r\n".encode())
            await _reply(reader)
        writer.write(b"QUIT\r\n")
        await _reply(reader)
        result.auths += 1
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def run_round(port: int, policy_pid: int, order: list[int], auth: Callable[[int], bytes], concurrency: int,
              message: bool = True) -> AuthRound:
    result = AuthRound()

    async def go() -> None:
        ctx = client_tls()
        work = iter(order)

        async def worker() -> None:
            for i in work:
                try:
                    await _one(port, i, auth(i), ctx, result, message)
                except (OSError, asyncio.IncompleteReadError):
                    result.failed += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))

    cpu0, t0 = proc_cpu(policy_pid), time.perf_counter()
    asyncio.run(go())
    result.seconds = time.perf_counter() - t0
    result.cpu = proc_cpu(policy_pid) - cpu0
    return result


def file_case() -> Case:
    def start(work: Path, sink: Sink):
        from submitd_devkit.stack import Stack, User

        users = {login(i): User(PASSWORD.format(i=i), [login(i)]) for i in range(USERS)}
        stack = Stack(work, next_hop=("127.0.0.1", sink.port), users=users, argon2=ARGON2,
                      env={s: {"LOG_LEVEL": "WARNING"} for s in ("frontend", "relay", "policy", "rewriter")})
        return stack.start()

    return Case("file (argon2id t=2 m=19 MiB)", start, plain)


def token_case(mode: str) -> Case:
    """A token per login from the dev kit's OpenID Connect provider, got before the rounds: jwt
    (its signed ID token, checked in policy with its keys) or userinfo (its opaque access token,
    one request to the provider when not cached)."""
    from submitd_devkit.oidc import OidcProvider

    tokens: dict[int, str] = {}
    case = Case(f"{mode} (OAUTHBEARER)", None, lambda i: b"OAUTHBEARER " + base64.b64encode(
        f"n,,\x01auth=Bearer {tokens[i]}\x01\x01".encode()))

    def start(work: Path, sink: Sink):
        from submitd_devkit.stack import Stack, User

        provider = OidcProvider(work / "oidc").start()
        case.stop.append(provider.stop)
        for i in range(USERS):
            got = provider.tokens(login(i))
            tokens[i] = got.id_token if mode == "jwt" else got.access_token
        users = {login(i): User(PASSWORD.format(i=i), [login(i)]) for i in range(USERS)}
        env = {s: {"LOG_LEVEL": "WARNING"} for s in ("frontend", "relay", "policy", "rewriter")}
        env["policy"] |= provider.policy_settings(mode)
        stack = Stack(work, next_hop=("127.0.0.1", sink.port), users=users, argon2=ARGON2, env=env)
        return stack.start()

    case.start = start
    return case


def ldap_case(mode: str) -> Callable[[], Case]:
    """The dev kit's slapd with USERS more entries (found by mail, argon2id hashes at ARGON2), over
    StartTLS: bind mode (slapd checks the hash) or compare mode (policy's hashing pool does)."""

    def make() -> Case:
        from submitd_devkit.ldap import (BASE, HASHES_DN, HASHES_PASSWORD, PEOPLE_DN, SEARCH_DN, SEARCH_PASSWORD,
                                         Slapd, hash_password)

        servers: list[Slapd] = []

        def start(work: Path, sink: Sink):
            from submitd_devkit.stack import Stack

            slapd = Slapd(work / "slapd").start()
            servers.append(slapd)
            slapd.add(*({"dn": [f"uid=user{i},{PEOPLE_DN}"], "objectClass": ["inetOrgPerson"], "uid": [f"user{i}"],
                         "cn": [f"user {i}"], "sn": ["user"], "mail": [login(i)],
                         "userPassword": [hash_password(PASSWORD.format(i=i), "argon2")]} for i in range(USERS)))
            account, secret = (SEARCH_DN, SEARCH_PASSWORD) if mode == "bind" else (HASHES_DN, HASHES_PASSWORD)
            (work / "bind-password").write_text(secret)
            policy = {"DIRECTORIES": '["ldap"]', "LDAP_MODE": mode, "LDAP_URL": slapd.url, "LDAP_STARTTLS": "true",
                      "LDAP_CA_FILE": str(slapd.ca_file), "LDAP_BASE_DN": BASE, "LDAP_BIND_DN": account,
                      "LDAP_BIND_PASSWORD_FILE": str(work / "bind-password"), "LDAP_LOGIN_ATTRIBUTE": "mail",
                      "LDAP_USER_FILTER": "(&(objectClass=inetOrgPerson)(mail={login}))"}
            env = {s: {"LOG_LEVEL": "WARNING"} for s in ("frontend", "relay", "policy", "rewriter")}
            env["policy"] |= policy
            stack = Stack(work, next_hop=("127.0.0.1", sink.port), users={}, argon2=ARGON2, env=env)
            return stack.start()

        return Case(f"ldap-{mode} (slapd, StartTLS)", start, plain, stop=[lambda: [s.stop() for s in servers]])

    return make


def sql_case() -> Case:
    """The same logins and hashes in PostgreSQL (the dev kit's cluster, the README's schema and
    default queries): a cold AUTH adds the directory's two queries to the hash."""
    from argon2 import PasswordHasher

    from submitd_devkit.postgres import Postgres

    pg = Postgres()
    case = Case("sql (PostgreSQL, argon2id)", None, plain, [pg.close])

    def start(work: Path, sink: Sink):
        from submitd_devkit.stack import Stack

        pg.start()
        hasher = PasswordHasher(time_cost=ARGON2["time_cost"], memory_cost=ARGON2["memory_kib"],
                                parallelism=ARGON2["parallelism"])
        # argon2 hashes hold only [A-Za-z0-9$=,+/]: written as literals in one statement
        rows = ", ".join(f"('{login(i)}', '{hasher.hash(PASSWORD.format(i=i))}')" for i in range(USERS))
        pg.sql(f"INSERT INTO users (login, password) VALUES {rows}")
        env = {s: {"LOG_LEVEL": "WARNING"} for s in ("frontend", "relay", "policy", "rewriter")}
        env["policy"] |= pg.policy_env(DIRECTORIES='["sql"]')
        stack = Stack(work, next_hop=("127.0.0.1", sink.port), users={}, argon2=ARGON2, env=env)
        return stack.start()

    case.start = start
    return case


CASES: list[Callable[[], Case]] = [file_case, ldap_case("bind"), ldap_case("compare"), sql_case,
                                   lambda: token_case("jwt"), lambda: token_case("userinfo")]


def bench_auth(work: Path, concurrency: int = 20, cached_rounds: int = 3) -> None:
    print(f"\nAUTH per directory: {USERS} logins, {concurrency} concurrent clients (STARTTLS + AUTH + one message "
          "per connection); policy CPU from /proc")
    print(f"{'directory':34s} {'round':7s} {'auths':>6s} {'policy CPU/AUTH':>16s} {'AUTH p50':>9s} {'p99':>9s} {'msg/s':>7s}")
    for make in CASES:
        case = make()
        sink = Sink().start()
        stack = None
        try:
            stack = case.start(work / case.name.split()[0], sink)
            policy_pid = stack.procs["policy"].pid
            port = stack.ports.submission
            order = list(range(USERS))
            rounds = [("cold", run_round(port, policy_pid, order, case.auth, concurrency))]
            for _ in range(cached_rounds):
                rounds.append(("cached", run_round(port, policy_pid, order, case.auth, concurrency)))
            cached = [r for name, r in rounds if name == "cached"]
            best = sorted(cached, key=lambda r: r.cpu)[len(cached) // 2]  # the median round
            alone = run_round(port, policy_pid, order, case.auth, concurrency, message=False)
            for name, r in (rounds[0], ("cached", best), ("no msg", alone)):
                per = r.cpu / max(r.auths, 1) * 1000
                print(f"{case.name:34s} {name:7s} {r.auths:6d} {per:13.2f} ms {p50(r.latencies) * 1000:6.1f} ms "
                      f"{percentile(r.latencies, 0.99) * 1000:6.1f} ms {r.auths / r.seconds:7.0f}"
                      + (f"  ({r.failed} failed: {r.refusals})" if r.failed else ""), flush=True)
        finally:
            if stack is not None:
                stack.stop()
            for stop in case.stop:
                with contextlib.suppress(Exception):
                    stop()
            sink.stop()
