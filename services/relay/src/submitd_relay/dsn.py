"""Delivery status notifications (RFC 3464): bounces, delay notices and "relayed" reports.

A report is a multipart/report with a human-readable part, a message/delivery-status part
with one block per recipient, and the original's header section (text/rfc822-headers), or the
whole original (message/rfc822) when the sender asked for RET=FULL. For messages that were
sent with SMTPUTF8 the RFC 6533 types (message/global-headers, message/global) are used."""

from __future__ import annotations

import email.utils
import re
import secrets
from dataclasses import dataclass

from submitd.v1 import common_pb2
from submitd_common import received

_REPLY = re.compile(r"^\s*(\d)(\d\d)[ -]?(?:(\d)\.(\d{1,3})\.(\d{1,3})\b)?", re.S)

TITLES = {
    "failed": "Undelivered Mail Returned to Sender",
    "delayed": "Delayed Mail (still being retried)",
    "relayed": "Successful Mail Delivery Report (relayed)",
}
EXPLANATIONS = {
    "failed": "Your message could not be delivered to one or more recipients. It has been given up.",
    "delayed": (
        "Your message has not been delivered yet to one or more recipients. It is still being\n"
        "retried; you do not need to send it again. You will be told if it is finally given up."
    ),
    "relayed": (
        "Your message was handed to the next mail server, which does not return delivery\n"
        "notifications: no further report will come from there."
    ),
}


@dataclass
class RecipientStatus:
    recipient: common_pb2.Recipient
    action: str  # failed | delayed | relayed
    reply: str  # the next hop's (or our own) SMTP reply, "550 5.1.1 ..."
    remote_mta: str = ""
    status: str = ""  # instead of the one in the reply (4.4.7 for an expired message)
    note: str = ""  # for the human-readable part


def status_of(reply: str) -> str:
    """The enhanced status code (RFC 3463) in a reply, or the one its basic code implies."""
    m = _REPLY.match(reply or "")
    if not m:
        return "4.0.0"
    klass, _, e_class, subject, detail = m.groups()
    if e_class == klass:
        return f"{klass}.{subject}.{detail}"
    return f"{klass}.0.0"


def xtext_decode(value: str) -> str:
    return re.sub(r"\+([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), value)


def _field_value(xtext: str) -> str:
    """An xtext value decoded for a report field (RFC 3464 §2.2.1, §2.3.1), or left encoded when
    decoding would put a control character (a line break) into the report; never longer than a
    line may be."""
    decoded = xtext_decode(xtext)
    value = xtext if re.search(r"[\x00-\x1f\x7f]", decoded) else decoded
    return _one_line(re.sub(r"[\x00-\x1f\x7f]", "?", value))


def wants(recipient: common_pb2.Recipient, what: str) -> bool:
    """RFC 3461 §4.1: without NOTIFY, failures are reported and delays at our discretion (not)."""
    notify = [n.strip().upper() for n in recipient.notify.split(",") if n.strip()]
    if not notify:
        return what == "FAILURE"
    return what in notify


def header_section(message: bytes) -> bytes:
    end = message.find(b"\r\n\r\n")
    return message if end < 0 else message[: end + 2]


MAX_TEXT = 900  # a report line stays well under RFC 5322's 998 octets


def _one_line(text: str) -> str:
    text = " ".join(re.sub(r"[\x00-\x1f\x7f]", " ", text).split())
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 3] + "..."


def _ascii(text: str) -> str:
    return _one_line(text.encode("ascii", "replace").decode())


def returns_full(kind: str, envelope: common_pb2.Envelope) -> bool:
    """Whether the report carries the whole original (RET=FULL on a failure), not its header.
    Never for a REQUIRETLS message: its report returns the header section only (RFC 8689 §5)."""
    return kind == "failed" and envelope.dsn_ret.upper() == "FULL" and not envelope.require_tls


def build_parts(
    *,
    kind: str,
    envelope: common_pb2.Envelope,
    report_id: str,
    header: bytes,
    statuses: list[RecipientStatus],
    reporting_mta: str,
    from_address: str,
    arrival: float,
    will_retry_until: float | None = None,
) -> tuple[bytes, bytes]:
    """The report around its attachment: what comes before the original (or its ``header``
    section, see returns_full) and what comes after it. The original itself is streamed in
    between by the caller, never held here."""
    utf8 = envelope.smtputf8 or not header.isascii()
    full = returns_full(kind, envelope)
    boundary = f"submitd-{secrets.token_hex(12)}"
    now = email.utils.formatdate(localtime=False)
    message_id = f"<{envelope.queue_id}.{kind}.{secrets.token_hex(4)}@{reporting_mta}>"
    lines: list[str] = [
        received.report_field(by=reporting_mta, queue_id=report_id).decode().rstrip("\r\n"),
        f"From: Mail Delivery System <{from_address}>",
        f"To: <{_one_line(envelope.return_path)}>" if envelope.return_path.isascii() else "To: undisclosed-recipients:;",
        f"Subject: {TITLES[kind]}",
        f"Date: {now}",
        f"Message-ID: {message_id}",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated delivery status notification.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=us-ascii",
        "Content-Description: Notification",
        "",
        f"This is the mail system at {reporting_mta}.",
        "",
        *EXPLANATIONS[kind].split("\n"),  # each line its own CRLF (a bare LF here went out in every delay report)
        "",
    ]
    for s in statuses:
        note = f" ({_one_line(s.note)})" if s.note else ""
        lines.append(f"<{_ascii(s.recipient.address)}>{note}: {_ascii(s.reply)}")
    lines += [
        "",
        f"Queue id: {envelope.queue_id}",
        "",
        f"--{boundary}",
        "Content-Type: message/global-delivery-status" if utf8 else "Content-Type: message/delivery-status",
        "Content-Description: Delivery report",
        "",
        f"Reporting-MTA: dns; {reporting_mta}",
        f"X-Submitd-Queue-ID: {envelope.queue_id}",
    ]
    if envelope.dsn_envid:
        lines.append(f"Original-Envelope-Id: {_field_value(envelope.dsn_envid)}")
    lines.append(f"Arrival-Date: {email.utils.formatdate(arrival)}")
    for s in statuses:
        address = s.recipient.address
        addr_type = "rfc822" if address.isascii() else "utf-8"
        lines.append("")
        if s.recipient.orcpt:
            kind_, _, value = s.recipient.orcpt.partition(";")
            lines.append(f"Original-Recipient: {_one_line(kind_)}; {_field_value(value)}")
        lines += [
            f"Final-Recipient: {addr_type}; {_one_line(address)}",
            f"Action: {s.action}",
            f"Status: {s.status or (status_of(s.reply) if s.action != 'relayed' else '2.0.0')}",
        ]
        if s.remote_mta:
            lines.append(f"Remote-MTA: dns; {_one_line(s.remote_mta)}")
        if s.reply:
            lines.append(f"Diagnostic-Code: smtp; {_ascii(s.reply) if not utf8 else _one_line(s.reply)}")
        lines.append(f"Last-Attempt-Date: {now}")
        if kind == "delayed" and will_retry_until:
            lines.append(f"Will-Retry-Until: {email.utils.formatdate(will_retry_until)}")
    lines += ["", f"--{boundary}"]
    if full:
        lines += ["Content-Type: message/global" if utf8 else "Content-Type: message/rfc822",
                  "Content-Description: Undelivered message" if kind == "failed" else "Content-Description: Message", ""]
    else:
        lines += ["Content-Type: message/global-headers" if utf8 else "Content-Type: text/rfc822-headers",
                  "Content-Description: Message headers", ""]
    head = "\r\n".join(lines).encode("utf-8") + b"\r\n"
    return head, f"\r\n--{boundary}--\r\n".encode()


def report_envelope(original: common_pb2.Envelope, queue_id: str, eight_bit: bool) -> common_pb2.Envelope:
    """The envelope of a report: from the null path (so it can never bounce back), to the
    original's return path, with NOTIFY=NEVER; the report of a REQUIRETLS message goes with
    REQUIRETLS too (RFC 8689 §5): what it quotes needs the same protection."""
    return common_pb2.Envelope(
        require_tls=original.require_tls,
        queue_id=queue_id,
        return_path="",
        recipients=[common_pb2.Recipient(address=original.return_path, notify="NEVER")],
        smtputf8=not original.return_path.isascii(),
        body_type="8BITMIME" if eight_bit else "7BIT",
    )
