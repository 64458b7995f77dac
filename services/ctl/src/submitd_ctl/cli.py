"""submitctl: users, DKIM keys, the queue and the state of a submitd installation.

    submitctl [-n NAMESPACE] [--context CTX] [--release NAME]   a Helm release, through the Kubernetes API
    submitctl --local DIR                                       the directory of `make run` (./var)

Exit codes: 0 done; 1 refused (an unknown user, a selector still needed, a check that failed,
no such message); 2 the cluster or the stack could not be reached, or a usage error; 3 written,
but not every replica uses it yet after --timeout (it will: the write is done)."""

from __future__ import annotations

import argparse
import getpass
import json
import sys
import time
from datetime import datetime, timedelta, timezone

from . import documents, output
from .documents import ChangeError
from .site import Site, SiteError, edit, lagging, wait_loaded

OK, REFUSED, UNREACHABLE, NOT_CONFIRMED = 0, 1, 2, 3
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


def site_of(args) -> Site:
    if args.local:
        from .local import LocalSite

        return LocalSite(args.local)
    from .kube import KubeSite

    return KubeSite(args.release, args.namespace, args.context, args.kubeconfig)


# -- users -----------------------------------------------------------------------------------


def read_password(args, login: str) -> str:
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    elif sys.stdin.isatty():
        password = getpass.getpass(f"password for {login}: ")
        if getpass.getpass("again: ") != password:
            raise ChangeError("the two passwords differ")
    else:
        raise ChangeError("no terminal to prompt on: give the password on standard input with --password-stdin")
    if len(password) < 8:
        raise ChangeError("a password of at least 8 characters is required")
    return password


def hashed(password: str) -> str:
    from submitd_common.users import hash_password

    return hash_password(password)  # argon2id, here on the operator's machine


def apply(args, what: str, change, done: str, site: Site | None = None) -> int:
    """Change the users or DKIM files over the version read, then confirm they are in use."""
    site = site or site_of(args)
    files = edit(site, what, change)
    return confirm(site, what, files, args, done)


def confirm(site: Site, what: str, files, args, done: str) -> int:
    """Say it is done once every replica uses the new file (or say which do not yet)."""
    if args.no_wait:
        print(f"{done} (written; not waiting for the services to load it)")
        return OK
    seen = wait_loaded(site, what, files, args.timeout)
    if all(v is None for replicas in seen.values() for v in replicas.values()):
        print(f"{done} (written; no {' or '.join(seen)} answered to confirm it: they read it when they start"
              f"{site.unreachable_hint})")
        return OK
    behind = lagging(seen, files, what)
    if behind:
        print(f"{done}: written, but not yet in use after {args.timeout:g} s by: {', '.join(behind)}"
              f"{site.lag_hint}", file=sys.stderr)
        return NOT_CONFIRMED
    replicas = sum(len(r) for r in seen.values())
    print(f"{done} (in use by {replicas} process{'es' if replicas != 1 else ''})")
    return OK


def cmd_user_add(args) -> int:
    site = site_of(args)
    documents.require_user(site.read("users")[0], args.login, exists=False)  # before the prompt
    password_hash = hashed(read_password(args, args.login))
    return apply(args, "users", lambda f: documents.add_user(f, args.login, password_hash, args.send_as,
                                                             args.messages_per_hour), f"user {args.login} added", site)


def cmd_user_passwd(args) -> int:
    site = site_of(args)
    documents.require_user(site.read("users")[0], args.login)  # before the prompt
    password_hash = hashed(read_password(args, args.login))
    return apply(args, "users", lambda f: documents.set_password(f, args.login, password_hash),
                 f"password of {args.login} changed", site)


def cmd_user_suspend(args) -> int:
    return apply(args, "users", lambda f: documents.set_suspended(f, args.login, True), f"user {args.login} suspended")


def cmd_user_resume(args) -> int:
    return apply(args, "users", lambda f: documents.set_suspended(f, args.login, False), f"user {args.login} resumed")


def cmd_user_rm(args) -> int:
    return apply(args, "users", lambda f: documents.remove_user(f, args.login), f"user {args.login} removed")


def cmd_user_ls(args) -> int:
    files, _ = site_of(args).read("users")
    rows = documents.user_rows(files)
    output.emit(args.output, rows, ["login", "send_as", "suspended", "limits"])
    return OK


# -- DKIM ------------------------------------------------------------------------------------


def cmd_dkim_rotate(args) -> int:
    site = site_of(args)
    made = {}

    def change(files):
        made["r"] = documents.rotate(files, args.domain, args.algorithm, datetime.now(timezone.utc), args.selector)
        return made["r"].files

    files = edit(site, "dkim", change)
    rotation = made["r"]
    print(f"Publish this DNS record (both keys sign meanwhile; retire the old selector once this one verifies):\n\n"
          f"  {rotation.record}\n")
    return confirm(site, "dkim", files, args, f"selector {rotation.selector} added to {args.domain.lower()}")


def cmd_dkim_retire(args) -> int:
    grace = parse_duration(args.grace)
    return apply(args, "dkim", lambda f: documents.retire(f, args.domain, args.selector,
                                                          datetime.now(timezone.utc), grace),
                 f"selector {args.selector} of {args.domain.lower()} retired")


def cmd_dkim_ls(args) -> int:
    files, _ = site_of(args).read("dkim")
    rows = [{"domain": k.domain, "selector": k.selector, "algorithm": k.algorithm,
             "created": k.created.isoformat() if k.created else ""} for k in documents.key_entries(files)]
    output.emit(args.output, rows, ["domain", "selector", "algorithm", "created"])
    return OK


def cmd_dkim_check(args) -> int:
    import dns.exception
    import dns.resolver

    files, _ = site_of(args).read("dkim")
    domain = args.domain.lower().rstrip(".")
    keys = documents.keys_document(files)["keys"]
    mine = [e for e in keys if str(e["domain"]).lower() == domain]
    if not mine:
        raise ChangeError(f"no DKIM key for {domain}")
    resolver = dns.resolver.Resolver(configure=not args.nameserver)
    if args.nameserver:
        resolver.nameservers = [args.nameserver]
        resolver.port = args.dns_port
    resolver.lifetime = 10
    rows, bad = [], 0
    for entry in mine:
        name = f"{entry['selector']}._domainkey.{domain}"
        try:
            answer = resolver.resolve(name, "TXT")
            texts = [b"".join(r.strings).decode() for r in answer]
            state = "ok" if any(documents.record_matches(documents.key_pem(files, entry), t) for t in texts) \
                else "differs"
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            state = "missing"
        except dns.exception.DNSException as e:
            raise SiteError(f"{name}: {e}") from e
        bad += state != "ok"
        rows.append({"name": name, "record": state})
    output.emit(args.output, rows, ["name", "record"])
    return REFUSED if bad else OK


def parse_duration(text: str) -> timedelta:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text[-1] in units:
            return timedelta(seconds=float(text[:-1]) * units[text[-1]])
        return timedelta(seconds=float(text))
    except (ValueError, IndexError):
        raise ChangeError(f"{text!r}: a duration is a number with s, m, h or d") from None


# -- queue -----------------------------------------------------------------------------------


def queue_call(args, method: str, path: str) -> tuple[int, dict]:
    status, data = site_of(args).admin(method, "/api/v1/queue" + path)
    try:
        body = json.loads(data) if data else {}
    except ValueError:
        body = {"detail": data[:200].decode(errors="replace")}
    if status in (401, 403):
        raise SiteError(f"the queue admin API refused the token: {body.get('detail', status)}")
    if status >= 500:
        raise SiteError(f"the queue admin API failed: {status} {body.get('detail', '')}")
    return status, body


def cmd_queue_ls(args) -> int:
    from urllib.parse import urlencode

    query = {k: v for k, v in {"sender": args.sender, "recipient": args.recipient, "state": args.state,
                                "min_age": args.min_age, "limit": args.limit}.items() if v is not None}
    _, body = queue_call(args, "GET", "/messages" + ("?" + urlencode(query) if query else ""))
    rows = [{**m, "age": output.age(m["age_seconds"]), "to": ", ".join(m["recipients"])} for m in body["messages"]]
    if args.output == "table":
        output.table(rows, ["id", "state", "age", "size", "attempts", "sender", "to", "last_reply"])
        if body.get("truncated"):
            print(f"(the first {body['scanned']} entries were scanned; narrow the search)")
    else:
        output.emit(args.output, body, [])
    return OK


def cmd_queue_show(args) -> int:
    status, body = queue_call(args, "GET", f"/messages/{args.id}")
    if status == 404:
        raise ChangeError(f"no queued message {args.id}")
    output.emit("yaml" if args.output == "table" else args.output, body, [])
    return OK


def queue_action(args, method: str, suffix: str) -> int:
    status, body = queue_call(args, method, f"/messages/{args.id}{suffix}")
    if status == 404:
        raise ChangeError(f"no queued message {args.id}")
    if status >= 400:
        raise ChangeError(str(body.get("detail", status)))
    if args.output == "table":
        extra = f"; report {body['report_queue_id']}" if body.get("report_queue_id") else ""
        print(f"{body['id']}: {body['action']}{extra}")
    else:
        output.emit(args.output, body, [])
    return OK


def cmd_queue_totals(args) -> int:
    _, body = queue_call(args, "GET", "/totals")
    output.emit("yaml" if args.output == "table" else args.output, body, [])
    return OK


# -- status and check ------------------------------------------------------------------------


def cmd_status(args) -> int:
    site = site_of(args)
    report = site.status()
    try:
        status, body = queue_call(args, "GET", "/totals")
        report["queue"] = body if status == 200 else {"error": body.get("detail", status)}
    except SiteError as e:
        report["queue"] = {"error": str(e)}
    if args.output != "table":
        output.emit(args.output, report, [])
        return OK
    print(output.status_screen(report))
    return OK if all(s["ready"] >= 1 for s in report["services"]) else REFUSED


def cmd_check(args) -> int:
    from submitd_common import smtpcheck

    site = site_of(args)
    server = args.server or default_server(args, site)
    password = read_password(args, args.user) if args.user else None
    started = time.monotonic()
    try:
        queue_id, transcript = smtpcheck.submit(server, args.user, password, args.sender or args.user, args.to,
                                                implicit_tls=args.implicit_tls, verify=not args.insecure,
                                                tls_name=args.tls_name)
    except smtpcheck.Refused as e:
        raise ChangeError(str(e)) from e
    except smtpcheck.Unreachable as e:
        raise SiteError(str(e)) from e
    took = time.monotonic() - started
    print(f"{server}: {transcript}; queued as {queue_id} in {took * 1000:.0f} ms")
    try:
        status, _ = queue_call(args, "GET", f"/messages/{queue_id}")
    except SiteError as e:
        print(f"the relay could not be asked: {e}")
        return OK
    print("the relay holds it (queued or deferred)" if status == 200
          else "the relay has it no more: delivered (or bounced) already")
    return OK


def default_server(args, site) -> str:
    if args.local:
        return f"127.0.0.1:{site.ports['submission']}"
    service = site.get(site.ns(f"services/{site.fullname}-frontend"))
    ingress = (service.get("status", {}).get("loadBalancer", {}).get("ingress") or [{}])[0]
    host = ingress.get("ip") or ingress.get("hostname")
    if not host:
        raise SiteError(f"Service {site.fullname}-frontend has no external address yet: give --server HOST:PORT")
    return f"{host}:587"


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
    command(user, "ls", cmd_user_ls, "list users (never their hashes)")

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
