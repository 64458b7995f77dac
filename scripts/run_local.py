"""`make run`: the whole submitd stack on this machine, with a demo user and a local next
hop that stores delivered mail in a Maildir under ./var (SUBMITD_RUN_VAR elsewhere). Ctrl-C
(SIGTERM, SIGHUP) stops everything; a second one kills everything at once."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

from submitd_devkit.oidc import OidcProvider
from submitd_devkit.ports import wait_port
from submitd_devkit.stack import Ports, Stack, StartAbandoned, User

ROOT = Path(__file__).resolve().parent.parent
VAR = Path(os.environ.get("SUBMITD_RUN_VAR") or ROOT / "var").resolve()
DEMO_USER = "demo@example.test"
UNKNOWN = "nobody@example.net"  # the local next hop refuses it: a way to see a bounce


def port(name: str, default: int) -> int:
    return int(os.environ.get(f"SUBMITD_RUN_{name.upper()}_PORT", default))


def demo_password() -> str:
    # Kept across runs so that a configured mail client keeps working.
    return kept_secret(VAR / "demo-password")


def kept_secret(path: Path) -> str:
    if not path.exists():
        VAR.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(12) + "\n")
        path.chmod(0o600)
    return path.read_text().strip()


def main() -> int:
    ports = Ports(
        nats=port("nats", 4222),
        policy=port("policy", 50051),
        rewriter=port("rewriter", 50052),
        submission=port("submission", 2587),
        submissions=port("submissions", 2465),
        internal_submission=port("internal_submission", 2588),
        frontend_http=port("frontend_http", 8081),
        relay_http=port("relay_http", 8082),
        policy_http=port("policy_http", 8083),
        rewriter_http=port("rewriter_http", 8084),
    )
    sink_port = port("sink", 2525)
    # The optional profile SUBMITD_RUN_OIDC=1: an OpenID Connect provider beside the stack, policy in jwt mode.
    oidc = OidcProvider(VAR / "oidc", port("oidc", 9400)) if os.environ.get("SUBMITD_RUN_OIDC") else None
    extra = {"oidc": oidc.port} if oidc else {}
    busy = [f"{n}={p}" for n, p in {**vars(ports), "sink": sink_port, **extra}.items() if wait_port("127.0.0.1", p, 0.05)]
    if busy:
        print(f"ports already in use: {', '.join(busy)}; set SUBMITD_RUN_<NAME>_PORT to move them", file=sys.stderr)
        return 1
    password = demo_password()
    admin_token_file = VAR / "admin-token"
    kept_secret(admin_token_file)
    maildir = VAR / "maildir"
    stack = Stack(
        VAR,
        next_hop=("127.0.0.1", sink_port),
        ports=ports,
        users={DEMO_USER: User(password, [DEMO_USER, "@example.test"])},
        # Bounces come from the signed domain: they are DKIM-signed by the rewriter like any message.
        env={"relay": {"ADMIN_TOKEN_FILE": str(admin_token_file), "BOUNCE_FROM": "postmaster@example.test"},
             **({"policy": oidc.policy_settings("jwt")} if oidc else {})},
        keep_users=True,  # users added with submitctl --local var stay across runs
        grpc_tls=True,  # as the chart runs them: a certificate per service, callers checked
    )
    dkim_records = stack.make_dkim_keys("example.test")
    try:
        with open(stack.log_path("sink"), "ab") as log:
            # In stack.procs, the sink is watched and stopped with the services.
            stack.procs["sink"] = subprocess.Popen(
                [sys.executable, "-m", "submitd_devkit.sink", "--port", str(sink_port), "--maildir", str(maildir),
                 "--unknown", UNKNOWN],
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        if oidc:
            stack.procs["oidc"] = oidc.start().proc  # watched and stopped with the services
        say("starting nats-server, policy, rewriter, relay and frontend ...")
        stack.start(abandon=stop_asked)
        say(
            f"""
submitd is running.

  submission (STARTTLS)  127.0.0.1:{ports.submission}
  submissions (TLS)      127.0.0.1:{ports.submissions}
  internal (STARTTLS)    127.0.0.1:{ports.internal_submission}  (never a PROXY header)
  user                   {DEMO_USER}
  password               {password}
  delivered mail         {maildir}/new/
  logs                   {VAR / 'log'}/
  health and metrics     http://127.0.0.1:{ports.frontend_http}/readyz  http://127.0.0.1:{ports.relay_http}/metrics
  NATS, as its admin     {stack.nats.url}  (each service has a user of its own)

Send a message:

  swaks --server 127.0.0.1:{ports.submission} --tls \\
        --auth-user {DEMO_USER} --auth-password '{password}' \\
        --from {DEMO_USER} --to someone@example.net

Mail to {UNKNOWN} is refused by the next hop: the bounce (RFC 3464, DKIM-signed) lands
in the same Maildir, addressed to you. The queue admin API (its OpenAPI description is at /openapi.json):

  curl -H "Authorization: Bearer $(cat {admin_token_file})" http://127.0.0.1:{ports.relay_http}/api/v1/queue/totals

Messages from @example.test are DKIM-signed (RSA and Ed25519); the DNS records would be:
  {chr(10).join('  ' + r[:110] + ('...' if len(r) > 110 else '') for r in dkim_records).lstrip()}

Ctrl-C stops everything; a second Ctrl-C kills everything at once.
"""
        )
        if stack.nats.gomemlimit:
            say(f"nats-server runs with GOMEMLIMIT={stack.nats.gomemlimit} (90% of the memory limit it runs under).\n")
        if oidc:
            say(f"""An OpenID Connect provider (oidc-provider-mock) runs at {oidc.issuer}; policy checks its
signed tokens (OAUTH_MODE=jwt). A token for the demo user, for OAUTHBEARER or XOAUTH2:

  .venv/bin/python -m submitd_devkit.oidc token {DEMO_USER} --port {oidc.port}
""")
        while not stop_asked():
            crashed = [n for n, p in stack.procs.items() if p.poll() is not None]
            if crashed:
                say(f"{crashed[0]} stopped unexpectedly; its log:\n{stack.log_tail(crashed[0])}", sys.stderr)
                return 1
            time.sleep(0.1)
    except StartAbandoned:
        pass
    except RuntimeError as e:
        say(f"submitd did not start: {e}", sys.stderr)
        return 1
    finally:
        say("stopping ... (Ctrl-C again to kill everything at once)")
        stack.stop(now=kill_asked)
    return 0


def say(text: str, stream=None) -> None:
    """Print, unless the terminal is gone (SIGHUP): stopping must not depend on it."""
    try:
        print(text, file=stream or sys.stdout, flush=True)
    except OSError:
        pass


# SIGINT, SIGTERM and SIGHUP as they arrive. The handler only appends to a list: that takes no
# lock and cannot block, so a signal arriving while the handler runs (a second Ctrl-C) only nests
# another append, and none is lost. (It was threading.Event.set(), which takes a lock: a second
# signal inside it waited on that lock for ever, and every process of the stack was left running.)
# The main loop, Stack.start and Stack.stop poll the list: one signal asks for a stop, two or
# more for everything killed at once.
received: list[int] = []


def stop_asked() -> bool:
    return len(received) > 0


def kill_asked() -> bool:
    return len(received) > 1


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

if __name__ == "__main__":
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda signum, _frame: received.append(signum))
    code = main()
    for sig in STOP_SIGNALS:  # everything has stopped: one more changes nothing
        signal.signal(sig, signal.SIG_IGN)
    sys.exit(code)
