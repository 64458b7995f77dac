"""submitctl's commands: each takes the parsed arguments and returns the exit code."""

from __future__ import annotations

import getpass
import json
import sys
import time
from datetime import datetime, timedelta, timezone
from urllib.parse import quote

from . import documents, output
from .documents import ChangeError
from .site import Site, SiteError, edit, lagging, wait_loaded

OK, REFUSED, UNREACHABLE, NOT_CONFIRMED = 0, 1, 2, 3


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
    """Every directory's logins as policy sees them; the users file alone when policy cannot be asked."""
    try:
        _, body = admin_call(args, "GET", f"/api/v1/users?limit={args.limit}", "policy", "users")
    except SiteError as e:
        files, _ = site_of(args).read("users")
        rows = documents.user_rows(files)
        output.emit(args.output, rows, ["login", "send_as", "suspended", "limits"])
        print(f"(the users file only: policy could not be asked: {e})", file=sys.stderr)
        return OK
    rows = [user_row(u) for u in body["users"]] if args.output == "table" else body["users"]
    output.emit(args.output, rows, ["login", "source", "send_as", "suspended", "limits"])
    for name in body.get("unavailable") or []:
        print(f"(directory {name} could not be asked: its users are missing above)", file=sys.stderr)
    return OK


def cmd_user_show(args) -> int:
    status, body = admin_call(args, "GET", f"/api/v1/users/{quote(args.login, safe='@')}", "policy", "users")
    if status == 404:
        raise ChangeError(body.get("detail", f"no directory knows {args.login}"))
    if status == 503:
        raise SiteError(body.get("detail", "a directory is unavailable"))
    if args.output != "table":
        output.emit(args.output, body, [])
        return OK
    row = user_row(body)
    for key in ("login", "source", "detail", "scheme", "send_as", "act_as", "limits", "recipients", "suspended"):
        print(f"{key + ':':<11} {row.get(key) if row.get(key) not in (None, '') else '-'}")
    return OK


def user_row(u: dict) -> dict:
    limits = ", ".join(f"{k.replace('_per_hour', '')}/h {v}" for k, v in (u.get("limits") or {}).items())
    recipients = "any" if u.get("allow_recipients") is None else "only " + ", ".join(u["allow_recipients"])
    if u.get("deny_recipients"):
        recipients += "; never " + ", ".join(u["deny_recipients"])
    return {**u, "send_as": ", ".join(u["send_as"]), "act_as": ", ".join(u["act_as"]), "limits": limits or "-",
            "recipients": recipients, "suspended": "yes" if u["suspended"] else "no"}


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
    return admin_call(args, method, "/api/v1/queue" + path, "relay", "queue")


def admin_call(args, method: str, path: str, service: str, what: str) -> tuple[int, dict]:
    status, data = site_of(args).admin(method, path, service=service)
    try:
        body = json.loads(data) if data else {}
    except ValueError:
        body = {"detail": data[:200].decode(errors="replace")}
    if status in (401, 403):
        raise SiteError(f"the {what} admin API refused the token: {body.get('detail', status)}")
    if status >= 500 and status != 503:
        raise SiteError(f"the {what} admin API failed: {status} {body.get('detail', '')}")
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
