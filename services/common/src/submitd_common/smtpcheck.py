"""One real submission, as a mail client makes it: STARTTLS (or implicit TLS), AUTH, a short
message, and the queue id from the 250. ``submitctl check`` uses it from the operator's machine;
the chart's helm test pod runs it inside the cluster (``python -m submitd_common.smtpcheck``),
then asks the relay's admin API whether it holds the message."""

from __future__ import annotations

import argparse
import json
import re
import smtplib
import socket
import ssl
import sys
import urllib.error
import urllib.request
import uuid
from datetime import datetime, timezone
from email.utils import format_datetime, make_msgid
from pathlib import Path

_QUEUED = re.compile(r"queued as (\S+)")


class Refused(Exception):
    """The server answered, and not with what a submission needs."""


class Unreachable(Exception):
    """No SMTP conversation could be had."""


def submit(server: str, user: str | None, password: str | None, sender: str | None, to: str, *,
           implicit_tls: bool = False, verify: bool = True, tls_name: str | None = None,
           cafile: str | None = None, timeout: float = 30) -> tuple[str, str]:
    """(queue id, what was done) of one message."""
    host, _, port = server.rpartition(":")
    if not host or not port.isdigit():
        raise Unreachable(f"{server!r}: give HOST:PORT")
    context = ssl.create_default_context(cafile=cafile)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    token = uuid.uuid4().hex[:12]
    message = (
        f"From: {sender}\r\nTo: {to}\r\nSubject: submitd check {token}\r\n"
        f"Date: {format_datetime(datetime.now(timezone.utc))}\r\nMessage-ID: {make_msgid('submitd-check')}\r\n"
        f"\r\nA test message from the submitd check ({token}).\r\n"
    ).encode()
    steps = []
    name = tls_name or host

    # The certificate is checked against the public name (--tls-name), not the address dialled
    # (a Service's name inside the cluster): smtplib takes the name from its _host.
    class _SMTP(smtplib.SMTP):
        def starttls(self, *, context=None):
            self._host = name
            return super().starttls(context=context)

    class _SMTP_SSL(smtplib.SMTP_SSL):
        def _get_socket(self, host, port, timeout):
            self._host = name
            return super()._get_socket(host, port, timeout)

    try:
        if implicit_tls:
            client = _SMTP_SSL(host, int(port), timeout=timeout, context=context)
            steps.append("TLS")
        else:
            client = _SMTP(host, int(port), timeout=timeout)
        with client:
            client.ehlo("submitd.check")
            if not implicit_tls:
                client.starttls(context=context)
                client.ehlo("submitd.check")
                steps.append("STARTTLS")
            if user:
                client.login(user, password or "")
                steps.append(f"AUTH as {user}")
            client.mail(sender or "")
            code, reply = client.rcpt(to)
            if code != 250:
                raise Refused(f"RCPT TO:<{to}>: {code} {reply.decode(errors='replace')}")
            code, reply = client.data(message)
            if code != 250:
                raise Refused(f"end of data: {code} {reply.decode(errors='replace')}")
    except smtplib.SMTPResponseException as e:
        raise Refused(f"{e.smtp_code} {e.smtp_error.decode(errors='replace')}") from e
    except (OSError, smtplib.SMTPException, socket.timeout) as e:
        raise Unreachable(f"{server}: {e}") from e
    found = _QUEUED.search(reply.decode(errors="replace"))
    if not found:
        raise Refused(f"250 without a queue id: {reply.decode(errors='replace')}")
    return found.group(1), ", ".join(steps + ["submitted"])


def relay_holds(admin_url: str, token: str, queue_id: str) -> bool:
    """Whether the relay's admin API lists the message (queued or deferred) now."""
    request = urllib.request.Request(f"{admin_url.rstrip('/')}/api/v1/queue/messages/{queue_id}",
                                     headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            json.load(response)
            return True
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return False
        raise Unreachable(f"the queue admin API answered {e.code}") from e
    except (OSError, ValueError) as e:
        raise Unreachable(f"the queue admin API: {e}") from e


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m submitd_common.smtpcheck", description=__doc__)
    parser.add_argument("--server", required=True, metavar="HOST:PORT")
    parser.add_argument("--user")
    parser.add_argument("--password-file", help="the password, in a file (a mounted Secret)")
    parser.add_argument("--from", dest="sender")
    parser.add_argument("--to", required=True)
    parser.add_argument("--implicit-tls", action="store_true")
    parser.add_argument("--tls-name", help="the name the certificate must carry (default: the server's host)")
    parser.add_argument("--cafile", help="trust this CA bundle (default: the system's)")
    parser.add_argument("--insecure", action="store_true", help="do not verify the certificate")
    parser.add_argument("--admin-url", help="the relay's HTTP address, to ask whether it holds the message")
    parser.add_argument("--admin-token-file")
    args = parser.parse_args(argv)
    password = Path(args.password_file).read_text().strip() if args.password_file else None
    try:
        queue_id, done = submit(args.server, args.user, password, args.sender or args.user, args.to,
                                implicit_tls=args.implicit_tls, verify=not args.insecure, tls_name=args.tls_name,
                                cafile=args.cafile)
        print(f"{args.server}: {done}; queued as {queue_id}", flush=True)
        if args.admin_url:
            token = Path(args.admin_token_file).read_text().strip() if args.admin_token_file else ""
            held = relay_holds(args.admin_url, token, queue_id)
            print("the relay holds it (queued or deferred)" if held
                  else "the relay has it no more: delivered (or bounced) already")
    except (Refused, Unreachable) as e:
        print(f"check failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
