"""submitctl: users, DKIM keys, the queue and the state of a submitd installation.

    submitctl [-n NAMESPACE] [--context CTX] [--release NAME]   a Helm release, through the Kubernetes API
    submitctl --local DIR                                       the directory of `make run` (./var)

Exit codes: 0 done; 1 refused (an unknown user, a selector still needed, a check that failed,
no such message); 2 the cluster or the stack could not be reached, or a usage error; 3 written,
but not every replica uses it yet after --timeout (it will: the write is done)."""

from __future__ import annotations

import argparse
import sys

from .commands import (
    REFUSED, UNREACHABLE,
    cmd_check, cmd_dkim_check, cmd_dkim_ls, cmd_dkim_retire, cmd_dkim_rotate, cmd_queue_ls, cmd_queue_show,
    cmd_queue_totals, cmd_status, cmd_user_add, cmd_user_ls, cmd_user_show, cmd_user_passwd, cmd_user_resume, cmd_user_rm,
    cmd_user_suspend, queue_action,
)
from .documents import ChangeError
from .site import SiteError

GLOBAL_DEFAULTS = {"local": None, "namespace": None, "context": None, "kubeconfig": None, "release": "submitd",
                   "output": "table", "handler": None}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name, value in GLOBAL_DEFAULTS.items():
        if not hasattr(args, name):
            setattr(args, name, value)
    if not args.handler:
        parser.print_help()
        return UNREACHABLE
    try:
        return args.handler(args)
    except ChangeError as e:
        print(f"submitctl: {e}", file=sys.stderr)
        return REFUSED
    except SiteError as e:
        print(f"submitctl: {e}", file=sys.stderr)
        return UNREACHABLE
    except KeyboardInterrupt:
        return 130


# -- the parser ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    where = common.add_argument_group("where")
    S = argparse.SUPPRESS
    where.add_argument("--local", metavar="DIR", default=S, help="the make run directory (./var) instead of a cluster")
    where.add_argument("-n", "--namespace", default=S, help="the release's namespace (default: the context's)")
    where.add_argument("--context", default=S, help="the kubeconfig context")
    where.add_argument("--kubeconfig", default=S, help="the kubeconfig file (default: $KUBECONFIG, ~/.kube/config)")
    where.add_argument("--release", default=S, help="the Helm release name (default: submitd)")
    where.add_argument("-o", "--output", choices=["table", "json", "yaml"], default=S)

    parser = argparse.ArgumentParser(prog="submitctl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, parents=[common])
    # Not set_defaults: the parent's actions are shared by every subcommand's parser, and a
    # default set here would overwrite an option given before the subcommand.
    groups = parser.add_subparsers(title="commands", metavar="COMMAND")

    def command(sub, name, handler, help_text, wait=False):
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[common])
        p.set_defaults(handler=handler)
        if wait:
            p.add_argument("--no-wait", action="store_true", help="do not wait for the services to load the change")
            p.add_argument("--timeout", type=float, default=120, help="seconds to wait for every replica (120)")
        return p

    user = groups.add_parser("user", help="users and passwords (the users Secret)").add_subparsers(metavar="ACTION")
    p = command(user, "add", cmd_user_add, "add a user; the password is prompted for or read with --password-stdin", True)
    p.add_argument("login")
    p.add_argument("--send-as", action="append", metavar="ADDRESS", help="another address (or @domain) it may send as")
    p.add_argument("--messages-per-hour", type=int)
    p.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    p = command(user, "passwd", cmd_user_passwd, "set a user's password", True)
    p.add_argument("login")
    p.add_argument("--password-stdin", action="store_true")
    for name, handler, text in (("suspend", cmd_user_suspend, "refuse the user's AUTH and mail (550) until resumed"),
                                ("resume", cmd_user_resume, "let a suspended user send again"),
                                ("rm", cmd_user_rm, "remove a user")):
        command(user, name, handler, text, True).add_argument("login")
    p = command(user, "ls", cmd_user_ls, "list the users of every directory, with where each comes from (never a hash)")
    p.add_argument("--limit", type=int, default=1000, help="at most this many from each directory (1000)")
    command(user, "show", cmd_user_show, "one login: which directory answers for it and what it may do").add_argument("login")

    dkim = groups.add_parser("dkim", help="DKIM keys (the DKIM Secret)").add_subparsers(metavar="ACTION")
    p = command(dkim, "rotate", cmd_dkim_rotate, "add a new key for DOMAIN beside its others; prints the DNS record", True)
    p.add_argument("domain")
    p.add_argument("--algorithm", choices=["ed25519", "rsa"], default="ed25519")
    p.add_argument("--selector", help="default: s<YYYYMM><e|r>")
    p = command(dkim, "retire", cmd_dkim_retire, "remove a selector once a newer key has signed for --grace", True)
    p.add_argument("domain")
    p.add_argument("selector")
    p.add_argument("--grace", default="2d", help="how long the newer key must have signed (default 2d)")
    command(dkim, "ls", cmd_dkim_ls, "list keys")
    p = command(dkim, "check", cmd_dkim_check, "compare each selector's DNS TXT record with its key")
    p.add_argument("domain")
    p.add_argument("--nameserver", help="ask this resolver (default: the system's)")
    p.add_argument("--dns-port", type=int, default=53)

    queue = groups.add_parser("queue", help="the queue (the relay's admin API)").add_subparsers(metavar="ACTION")
    p = command(queue, "ls", cmd_queue_ls, "list and search queued messages")
    p.add_argument("--sender")
    p.add_argument("--recipient")
    p.add_argument("--state", choices=["queued", "deferred"])
    p.add_argument("--min-age", type=float, metavar="SECONDS")
    p.add_argument("--limit", type=int)
    command(queue, "show", cmd_queue_show, "one message: envelope, headers, attempts").add_argument("id")
    for name, handler, text in (
        ("retry", lambda a: queue_action(a, "POST", "/retry"), "deliver now"),
        ("delete", lambda a: queue_action(a, "DELETE", ""), "delete without a report"),
        ("bounce", lambda a: queue_action(a, "POST", "/bounce"), "give up and send the sender a report"),
    ):
        command(queue, name, handler, text).add_argument("id")
    command(queue, "totals", cmd_queue_totals, "depth, bytes, oldest, in delivery, deferred")

    command(groups, "status", cmd_status, "services, autoscalers, disruption budgets and the queue, on one screen")
    p = command(groups, "check", cmd_check, "submit a test message (STARTTLS, AUTH) and ask the relay about it")
    p.add_argument("--server", metavar="HOST:PORT", help="default: the frontend Service's external address, 587")
    p.add_argument("--user", help="log in as this user (password prompted, or --password-stdin)")
    p.add_argument("--password-stdin", action="store_true")
    p.add_argument("--from", dest="sender")
    p.add_argument("--to", required=True)
    p.add_argument("--implicit-tls", action="store_true", help="port 465 style")
    p.add_argument("--insecure", action="store_true", help="do not verify the server's certificate")
    p.add_argument("--tls-name", help="the name the certificate must carry (default: the server's host)")
    return parser


if __name__ == "__main__":
    sys.exit(main())
