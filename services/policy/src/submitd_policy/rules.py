"""Submission rules. Each rule looks at the session and one event and returns a Verdict to
refuse (or None to let the next rule decide); an event that no rule refuses is accepted.

Adding a rule is adding a function to the list for its event.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field

from submitd.v1 import policy_pb2
from submitd_common.addresses import AddressError, parse_mailbox
from submitd_common.replies import reply

from .users import User


@dataclass
class SessionState:
    session_id: str = ""
    peer: str = ""
    tls: bool = False
    trusted: bool = False
    helo: str = ""
    user: User | None = None
    sasl: object | None = None
    mail_from: str | None = None
    recipients: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def authorized(self) -> bool:
        """RFC 6409 §4.3: authenticated, or connecting from a trusted network."""
        return self.user is not None or self.trusted


def refuse(code: int, enhanced: str, text: str, disconnect: bool = False) -> policy_pb2.Verdict:
    return policy_pb2.Verdict(accept=False, reply=reply(code, enhanced, text), disconnect=disconnect)


def in_networks(address: str, networks: list[ipaddress._BaseNetwork]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks)


Rule = Callable[[SessionState, object], policy_pb2.Verdict | None]


def require_authorization(state: SessionState, _event) -> policy_pb2.Verdict | None:
    if not state.authorized:
        return refuse(530, "5.7.0", "Authentication required")
    return None


def sender_syntax(state: SessionState, event: policy_pb2.MailFrom) -> policy_pb2.Verdict | None:
    if not event.address:  # the null return path is always acceptable (RFC 6409 §3.2)
        return None
    try:
        addr = parse_mailbox(event.address, utf8="SMTPUTF8" in event.parameters)
    except AddressError as e:
        return refuse(501, "5.1.7", f"Bad sender address syntax: {e}")
    if not addr.fully_qualified:
        return refuse(554, "5.1.8", f"Sender domain {addr.domain} is not fully qualified")
    return None


def sender_owned(state: SessionState, event: policy_pb2.MailFrom) -> policy_pb2.Verdict | None:
    if not event.address or state.user is None:
        return None
    if not state.user.may_send_as(event.address):
        return refuse(550, "5.7.1", f"Sender address <{event.address}> not owned by user {state.user.login}")
    return None


def recipient_syntax(state: SessionState, event: policy_pb2.RcptTo) -> policy_pb2.Verdict | None:
    try:
        addr = parse_mailbox(event.address, utf8=True)
    except AddressError as e:
        return refuse(501, "5.1.3", f"Bad recipient address syntax: {e}")
    if not addr.fully_qualified:
        return refuse(554, "5.1.2", f"Recipient domain {addr.domain} is not fully qualified")
    return None


MAIL_RULES: list[Rule] = [require_authorization, sender_syntax, sender_owned]
RCPT_RULES: list[Rule] = [require_authorization, recipient_syntax]
DATA_RULES: list[Rule] = [require_authorization]


def first_refusal(rules: list[Rule], state: SessionState, event) -> policy_pb2.Verdict | None:
    for rule in rules:
        verdict = rule(state, event)
        if verdict is not None:
            return verdict
    return None
