"""``submitctl check``: one real submission, as a mail client makes it."""

from __future__ import annotations

import re
import smtplib
import socket
import ssl
import uuid
from email.utils import format_datetime, make_msgid
from datetime import datetime, timezone

from .documents import ChangeError
from .site import SiteError

_QUEUED = re.compile(r"queued as (\S+)")


def submit(server: str, user: str | None, password: str | None, sender: str | None, to: str, *,
           implicit_tls: bool = False, verify: bool = True, timeout: float = 30) -> tuple[str, str]:
    """(queue id, what was done) of one message; ChangeError when the server refuses it,
    SiteError when it cannot be reached."""
    host, _, port = server.rpartition(":")
    if not host:
        raise SiteError(f"{server!r}: give HOST:PORT")
    context = ssl.create_default_context()
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    token = uuid.uuid4().hex[:12]
    message = (
        f"From: {sender}\r\nTo: {to}\r\nSubject: submitctl check {token}\r\n"
        f"Date: {format_datetime(datetime.now(timezone.utc))}\r\nMessage-ID: {make_msgid('submitctl-check')}\r\n"
        f"\r\nA test message from submitctl check ({token}).\r\n"
    ).encode()
    steps = []
    try:
        if implicit_tls:
            client = smtplib.SMTP_SSL(host, int(port), timeout=timeout, context=context)
            steps.append("TLS")
        else:
            client = smtplib.SMTP(host, int(port), timeout=timeout)
        with client:
            client.ehlo("submitctl.check")
            if not implicit_tls:
                client.starttls(context=context)
                client.ehlo("submitctl.check")
                steps.append("STARTTLS")
            if user:
                client.login(user, password or "")
                steps.append(f"AUTH as {user}")
            client.mail(sender or "")
            code, reply = client.rcpt(to)
            if code != 250:
                raise ChangeError(f"RCPT TO:<{to}>: {code} {reply.decode(errors='replace')}")
            code, reply = client.data(message)
            if code != 250:
                raise ChangeError(f"end of data: {code} {reply.decode(errors='replace')}")
    except smtplib.SMTPResponseException as e:
        raise ChangeError(f"{e.smtp_code} {e.smtp_error.decode(errors='replace')}") from e
    except (OSError, smtplib.SMTPException, socket.timeout) as e:
        raise SiteError(f"{server}: {e}") from e
    found = _QUEUED.search(reply.decode(errors="replace"))
    if not found:
        raise ChangeError(f"250 without a queue id: {reply.decode(errors='replace')}")
    return found.group(1), ", ".join(steps + ["submitted"])
