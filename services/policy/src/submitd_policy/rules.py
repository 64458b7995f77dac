"""Submission rules: pure checks. Each rule looks at the session, one event and what was read
for it (an ``Ask``) and returns a Verdict to refuse, or None to let the next rule decide; an
event that no rule refuses is accepted. Rules read nothing and change nothing: whatever they
need (the user's current record, the rate counter) is in the Ask, and counting happens once,
after every rule passed (``decisions.record``). So the order of a list only decides which
refusal a client sees first.

Adding a rule is adding a function to the list for its event.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass

from submitd.v1 import policy_pb2
from submitd_common.addresses import Address, AddressError, parse_mailbox
from submitd_common.replies import reply
from submitd_common.users import User, UserDB

from .counters import Counters
from .settings import Settings


@dataclass
class Context:
    settings: Settings
    users: UserDB
    counters: Counters | None = None


@dataclass
class SessionState:
    session_id: str = ""
    peer: str = ""
    tls: bool = False
    trusted: bool = False
    helo: str = ""
    user: User | None = None
    # False for an account made from a bearer token that no directory knows (oauth_unknown_users:
    # token): its rights are its login's address, with nothing in a directory to read again.
    user_in_directory: bool = True
    sasl: object | None = None
    mail_from: str | None = None
    recipients: int = 0
    # Unauthorized recipients were accepted under the postmaster exception (RFC 6409 §6.4):
    # the message may go to them, and only to them.
    postmaster_only: bool = False

    @property
    def authorized(self) -> bool:
        """RFC 6409 §4.3: authenticated, or connecting from a trusted network."""
        return self.user is not None or self.trusted

    def reset_transaction(self) -> None:
        self.mail_from = None
        self.recipients = 0
        self.postmaster_only = False


@dataclass(frozen=True)
class Ask:
    """One MAIL, RCPT or DATA to decide, with everything the rules need read beforehand."""

    event: object
    address: Address | None  # as parsed (and completed); None for the null return path and DATA
    user: User | None = None  # the session's user as the users file has it now; None if removed
    limit: int | None = None  # the user's rate limit that applies to this event; None: unlimited
    used: int = 0  # what the user has used of that limit in the current window


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


def complete(address: str, ctx: Context, *, utf8: bool) -> Address:
    """Parse into the canonical form (a source route dropped, quotes dropped where they change
    nothing: what the rules check is what is queued), and complete a single-label domain where
    the site says so (RFC 6409 §4.2). Multi-label domains are never completed: an incomplete
    one cannot be told from a real one."""
    addr = parse_mailbox(address, utf8=utf8).canonical
    if not addr.fully_qualified and ctx.settings.complete_domain and not addr.is_literal and "." not in addr.domain:
        addr = Address(addr.local, f"{addr.domain}.{ctx.settings.complete_domain.lower()}")
    return addr


def incomplete(addr: Address, ctx: Context) -> bool:
    """A multi-level domain that ends in one of the site's own single labels ('squeaky.sales')."""
    labels = addr.domain.split(".")
    return len(labels) > 1 and labels[-1] in {x.lower() for x in ctx.settings.local_subdomains}


def is_postmaster(addr: Address | None, ctx: Context) -> bool:
    if addr is None or addr.local.lower() != "postmaster":
        return False
    return addr.domain == "" or addr.domain in {d.lower() for d in ctx.settings.local_domains}


def rate_limit(ctx: Context, user: User | None, name: str) -> int | None:
    """The user's own limit, else the site's; None when nothing is counted (no user, no
    counters, no limit)."""
    if user is None or ctx.counters is None:
        return None
    own = getattr(user.limits, name)
    return own if own is not None else getattr(ctx.settings, name)


Rule = Callable[[Context, SessionState, Ask], policy_pb2.Verdict | None]

# -- MAIL ---------------------------------------------------------------------------------


def mail_authorized(ctx: Context, state: SessionState, ask: Ask):
    if state.authorized or ctx.settings.postmaster_without_auth:
        return None  # the postmaster exception is enforced recipient by recipient
    return refuse(530, "5.7.0", "Authentication required")


def user_active(ctx: Context, state: SessionState, ask: Ask):
    if state.user is not None and (ask.user is None or ask.user.suspended):
        return refuse(550, "5.7.1", "Account suspended")
    return None


def sender_domain(ctx: Context, state: SessionState, ask: Ask):
    if ask.address is not None and (not ask.address.fully_qualified or incomplete(ask.address, ctx)):
        return refuse(554, "5.1.8", f"Sender domain {ask.address.domain} is not fully qualified")
    return None


def sender_owned(ctx: Context, state: SessionState, ask: Ask):
    if ask.address is None or ask.user is None:
        return None
    if not ask.user.may_send_as(str(ask.address), ctx.users.aliases):
        return refuse(550, "5.7.1", f"Sender address <{ask.address}> not owned by user {ask.user.login}")
    return None


def message_rate(ctx: Context, state: SessionState, ask: Ask):
    if ask.limit is not None and ask.used >= ask.limit:
        return refuse(450, "4.7.1", "Message rate limit exceeded, try again later")
    return None


# -- RCPT ---------------------------------------------------------------------------------


def rcpt_authorized(ctx: Context, state: SessionState, ask: Ask):
    if state.authorized:
        return None
    if ctx.settings.postmaster_without_auth and is_postmaster(ask.address, ctx):
        return None
    return refuse(530, "5.7.0", "Authentication required")


def recipient_domain(ctx: Context, state: SessionState, ask: Ask):
    if is_postmaster(ask.address, ctx):
        return None  # <postmaster> without a domain is valid (RFC 5321 §4.1.1.3)
    if not ask.address.fully_qualified or incomplete(ask.address, ctx):
        return refuse(554, "5.1.2", f"Recipient domain {ask.address.domain} is not fully qualified")
    return None


def recipient_permitted(ctx: Context, state: SessionState, ask: Ask):
    if state.user is None or state.user.may_send_to(str(ask.address)):
        return None
    return refuse(550, "5.7.1", f"Recipient <{ask.address}> not permitted for user {state.user.login}")


def recipient_rate(ctx: Context, state: SessionState, ask: Ask):
    if ask.limit is not None and ask.used >= ask.limit:
        return refuse(451, "4.7.1", "Recipient rate limit exceeded, try again later")
    return None


# -- DATA ---------------------------------------------------------------------------------


def data_authorized(ctx: Context, state: SessionState, ask: Ask | None):
    if state.authorized or state.postmaster_only:
        return None
    return refuse(530, "5.7.0", "Authentication required")


MAIL_RULES: list[Rule] = [mail_authorized, user_active, sender_domain, sender_owned, message_rate]
RCPT_RULES: list[Rule] = [rcpt_authorized, recipient_domain, recipient_permitted, recipient_rate]
DATA_RULES: list[Rule] = [data_authorized]


def first_refusal(rules: list[Rule], ctx: Context, state: SessionState, ask: Ask) -> policy_pb2.Verdict | None:
    for rule in rules:
        verdict = rule(ctx, state, ask)
        if verdict is not None:
            return verdict
    return None


def parse_for(event, ctx: Context, *, sender: bool, utf8: bool) -> Address | None | policy_pb2.Verdict:
    """The event's address parsed and completed, None for <>, or the Verdict refusing it."""
    if sender and not event.address:
        return None  # the null return path is always acceptable (RFC 6409 §3.2)
    if not sender and event.address.lower() == "postmaster":
        return Address("postmaster", "")
    if "@" not in event.address:
        if sender:
            return refuse(550, "5.1.7", f"No return path can be determined from <{event.address}>")
        return refuse(501, "5.1.3", "Bad recipient address syntax: expected local-part@domain")
    try:
        return complete(event.address, ctx, utf8=utf8)
    except AddressError as e:
        return refuse(501, "5.1.7" if sender else "5.1.3", f"Bad {'sender' if sender else 'recipient'} address syntax: {e}")
