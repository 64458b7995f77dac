"""What the rewriter does to one message's header section, as byte surgery.

Fields are located and edited as byte ranges; the fields it does not touch, and the body,
leave exactly as they came.
"""

from __future__ import annotations

import email.utils
import re
from dataclasses import dataclass, field

from submitd.v1 import common_pb2
from submitd_common import received
from submitd_common.addresses import Address, AddressError, parse_mailbox
from submitd_common.replies import reply
from submitd_common.users import UserDB

from .headers import HeaderField, TooManyFields, new_date, new_message_id, parse_fields

ORIGINATOR_FIELDS = {"from", "sender", "reply-to", "resent-from", "resent-sender"}
# RFC 6409 §6.3: who the message is from, and who sent (or resent) it, must be the user's.
OWNED_FIELDS = {"from", "sender", "resent-from", "resent-sender"}
ADDRESS_FIELDS = {
    "from", "sender", "reply-to", "to", "cc", "bcc",
    "resent-from", "resent-sender", "resent-to", "resent-cc", "resent-bcc",
}
# No leading \s*: [^:]+ takes leading white space too, and \s* before it backtracked
# quadratically (a minute for a From of 350,000 folded blank lines before its address).
_EMPTY_GROUP = re.compile(r"^[^:]+:\s*;\s*$")
_MSGID = re.compile(rb"^\s*<[^<>@\s\"]+@[^<>@\s]+>\s*$")


class Refused(Exception):
    def __init__(self, smtp_reply: common_pb2.Reply) -> None:
        super().__init__(smtp_reply.text)
        self.reply = smtp_reply


@dataclass
class Options:
    domain: str                      # for new Message-IDs
    add_date: bool = True
    fix_date: bool = True
    add_message_id: bool = True
    fix_message_id: bool = True
    add_sender: bool = True
    check_addresses: bool = True
    check_from: bool = True
    complete_domain: str | None = None
    max_hops: int = 50
    max_fields: int = 1000
    hide_client: bool = False  # the Received field without the client's address


@dataclass
class Result:
    header: bytes
    actions: list[str] = field(default_factory=list)
    fields: list[HeaderField] = field(default_factory=list)


def field_text(f: HeaderField, utf8: bool) -> str:
    value = f.raw.split(b":", 1)[1].replace(b"\r\n", b"")
    return value.decode("utf-8" if utf8 else "ascii", "surrogateescape")


def addresses_of(f: HeaderField, utf8: bool) -> list[Address]:
    """The addresses of an address field; Refused (554 5.6.0) naming the field if invalid."""
    text = field_text(f, utf8)
    if _EMPTY_GROUP.match(text):
        return []
    name = f.name.decode("ascii", "replace")
    try:
        pairs = email.utils.getaddresses([text])
    except RecursionError:
        # The stdlib parser recurses per nested comment "(" and group ":": a few hundred of them
        # in a line raised out of the service (451 to the client, and the end of a stream other
        # sessions' messages shared).
        raise Refused(reply(554, "5.6.0", f"Invalid address in {name} header: nested too deep")) from None
    out = []
    for _, addr in pairs:
        try:
            if not addr:
                raise AddressError("unparseable address list")
            out.append(parse_mailbox(addr, utf8=utf8))
        except AddressError as e:
            raise Refused(reply(554, "5.6.0", f"Invalid address in {name} header: {e}")) from e
    if not out:
        raise Refused(reply(554, "5.6.0", f"Invalid address in {name} header: no address"))
    return out


def _complete_in_field(f: HeaderField, addr: Address, completed: str) -> None:
    # Surgical: only "@<domain>" right after this local part changes.
    pattern = re.escape(f"{addr.local}@{addr.domain}".encode()) + rb"(?=[\s>,;)]|$)"
    f.raw = re.sub(pattern, f"{addr.local}@{completed}".encode(), f.raw, flags=re.IGNORECASE)


def apply_rules(fields: list[HeaderField], envelope: common_pb2.Envelope, rules, utf8: bool, result: "Result") -> None:
    """§8.8: rewrite matching addresses in the envelope and, where enabled, in header fields."""
    new = rules.rewrite(envelope.return_path)
    if new:
        envelope.return_path = new
        result.actions.append("envelope_rewritten")
    if rules.recipients:
        for r in envelope.recipients:
            new = rules.rewrite(r.address)
            if new:
                r.address = new
                result.actions.append("envelope_rewritten")
    if not rules.headers:
        return
    wanted = ORIGINATOR_FIELDS | (ADDRESS_FIELDS if rules.recipients else set())
    for f in fields:
        if f.key not in wanted:
            continue
        for addr in addresses_of(f, utf8):
            new = rules.rewrite(str(addr))
            if new:
                pattern = re.escape(f"{addr.local}@".encode()) + re.escape(addr.domain.encode()) + rb"(?=[\s>,;)]|$)"
                f.raw = re.sub(pattern, new.encode(), f.raw, flags=re.IGNORECASE)
                result.actions.append("header_rewritten")


def rewrite_header(
    header: bytes, envelope: common_pb2.Envelope, users: UserDB | None, opts: Options, rules=None
) -> Result:
    try:
        fields = parse_fields(header, opts.max_fields)
    except TooManyFields:
        raise Refused(reply(552, "5.3.4", f"Too many header fields (more than {opts.max_fields})")) from None
    result = Result(header=b"", fields=fields)
    utf8 = envelope.smtputf8
    by_key: dict[str, list[HeaderField]] = {}
    for f in fields:
        by_key.setdefault(f.key, []).append(f)
    # A message from a client gets our trace field; one submitd makes itself (a report) has its own.
    from_client = envelope.helo != ""
    count = sum(len(by_key.get(name, ())) for name in received.TRACE_FIELDS) + from_client
    if count > opts.max_hops:
        raise Refused(reply(554, "5.4.6", f"Too many hops ({count} Received/Delivered-To fields): a mail loop?"))
    # RFC 8689 §4.1: with MAIL FROM ... REQUIRETLS the header field is ignored (and kept, as
    # every field the rewriter does not own).
    envelope.tls_optional = not envelope.require_tls and tls_required_no(by_key.get("tls-required", []))

    parsed: dict[int, list[Address]] = {}  # a field's addresses (by position), each field parsed once
    if opts.check_addresses:
        for i, f in enumerate(fields):
            if f.key in ADDRESS_FIELDS:
                parsed[i] = _qualified(f, addresses_of(f, utf8), opts, result)

    def addresses(i: int, f: HeaderField) -> list[Address]:
        if i not in parsed:
            parsed[i] = addresses_of(f, utf8)
        return parsed[i]

    user = users.users.get(envelope.authenticated_user) if users and envelope.authenticated_user else None
    if user is not None and opts.check_from and user.header_from_check:
        # Whatever CHECK_HEADER_ADDRESSES says: the addresses are parsed here if it did not.
        for i, f in enumerate(fields):
            if f.key not in OWNED_FIELDS:
                continue
            for addr in addresses(i, f):
                if not user.may_send_as(str(addr), users.aliases):
                    name = f.name.decode("ascii", "replace")
                    raise Refused(reply(550, "5.7.1", f"{name} header address <{addr}> not owned by user {user.login}"))

    if rules is not None and rules.rules:
        apply_rules(fields, envelope, rules, utf8, result)

    added: list[HeaderField] = []
    if opts.add_sender and user is not None and user.address and not by_key.get("sender"):
        authors = {str(a) for i, f in enumerate(fields) if f.key == "from" for a in _quietly(addresses, i, f)}
        if user.address not in authors:
            added.append(HeaderField(b"Sender", b"Sender: " + user.address.encode() + b"\r\n"))
            result.actions.append("sender_added")

    dates = by_key.get("date", [])
    if not dates and opts.add_date:
        added.append(HeaderField(b"Date", b"Date: " + new_date().encode() + b"\r\n"))
        result.actions.append("date_added")
    elif dates and opts.fix_date and not _valid_date(dates[0]):
        dates[0].name, dates[0].raw = b"Date", b"Date: " + new_date().encode() + b"\r\n"
        result.actions.append("date_replaced")

    ids = by_key.get("message-id", [])
    if not ids and opts.add_message_id:
        added.append(HeaderField(b"Message-ID", b"Message-ID: " + new_message_id(opts.domain).encode() + b"\r\n"))
        result.actions.append("message_id_added")
    elif ids and opts.fix_message_id and not _MSGID.match(ids[0].raw.split(b":", 1)[1].replace(b"\r\n", b"")):
        ids[0].name, ids[0].raw = b"Message-ID", b"Message-ID: " + new_message_id(opts.domain).encode() + b"\r\n"
        result.actions.append("message_id_replaced")

    stamp = received.field(envelope, by=envelope.received_by or opts.domain, hide_client=opts.hide_client) if from_client else b""
    # Edits never move a field's bounds: the fields of the result are known without a second parse.
    result.fields = [*parse_fields(stamp), *fields, *added]
    result.header = b"".join(f.raw for f in result.fields)
    return result


def tls_required_no(fields: list[HeaderField]) -> bool:
    """RFC 8689 §3: the sender asks that TLS be optional with "TLS-Required: No" ("No" in any
    case, as an ABNF string). Only a plain No relaxes anything: any other value, or a field
    that says otherwise beside it, does not."""
    values = [field_text(f, True).strip(" \t") for f in fields]
    return bool(values) and all(v.isascii() and v.lower() == "no" for v in values)


def _qualified(f: HeaderField, addrs: list[Address], opts: Options, result: Result) -> list[Address]:
    """The field's addresses, single-label domains completed in place (COMPLETE_DOMAIN), or
    Refused (554 5.6.0) for a domain that is not fully qualified."""
    out = []
    for addr in addrs:
        if not addr.fully_qualified:
            if opts.complete_domain and "." not in addr.domain and not addr.is_literal:
                completed = f"{addr.domain}.{opts.complete_domain.lower()}"
                _complete_in_field(f, addr, completed)
                result.actions.append("domain_completed")
                addr = Address(addr.local, completed)
            else:
                name = f.name.decode("ascii", "replace")
                raise Refused(reply(554, "5.6.0", f"Domain {addr.domain} in {name} header is not fully qualified"))
        out.append(addr)
    return out


def _quietly(addresses, i: int, f: HeaderField) -> list[Address]:
    # For adding Sender only: a From that does not parse (with no check asked for) is nobody.
    try:
        return addresses(i, f)
    except Refused:
        return []


def _valid_date(f: HeaderField) -> bool:
    try:
        return email.utils.parsedate_to_datetime(field_text(f, True).strip()) is not None
    except (TypeError, ValueError, IndexError):
        return False
