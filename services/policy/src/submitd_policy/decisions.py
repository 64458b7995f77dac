"""One session event → one verdict (AUTH aside: ``auth.py``).

For MAIL, RCPT and DATA, in this order and nowhere else:
1. parse the address (and complete its domain where the site says so), or refuse its syntax;
2. read what the rules need: the user's current record, the rate counter that applies;
3. run the event's pure rules (``rules.py``); the first refusal is the answer;
4. only when every rule passed, record it: count against the rate, update the session.
"""

from __future__ import annotations

import ipaddress

from submitd.v1 import policy_pb2
from submitd_common.files import WatchedFile
from submitd_common.users import UserDB

from . import rules
from .counters import Counters, window_key
from .directories import DirectoryUnavailable
from .directories.chain import Directories
from .directories.file import FileDirectory
from .rules import Ask, Context, SessionState
from .settings import Settings

ACCEPT = policy_pb2.Verdict(accept=True)

# Per event: the rate limit that applies and the counter it is kept in.
RATES = {
    "mail_from": ("messages_per_hour", "msgs"),
    "rcpt_to": ("recipients_per_hour", "rcpts"),
    "data_start": ("messages_per_hour", "msgs"),
}


class Decisions:
    def __init__(self, settings: Settings, users: WatchedFile[UserDB], rates: Counters | None,
                 directories: Directories | None = None) -> None:
        self.settings = settings
        self.users = users
        self.directories = directories or Directories(
            [FileDirectory(users)], ttl=settings.directory_cache_seconds, grace=settings.directory_grace_seconds,
            timeout=settings.directory_timeout)
        self.rates = rates
        self.trusted = [ipaddress.ip_network(n, strict=False) for n in settings.trusted_networks]

    def context(self) -> Context:
        return Context(self.settings, self.users.value, self.rates)

    async def decide(self, state: SessionState, kind: str, ev) -> policy_pb2.Verdict:
        if kind == "connect":
            state.session_id = ev.session_id
            state.peer = ev.proxy_address or ev.peer_address
            state.tls = ev.implicit_tls or bool(ev.tls.version)
            state.trusted = rules.in_networks(state.peer, self.trusted)
            return ACCEPT
        if kind == "helo":
            state.helo = ev.hostname
            return ACCEPT
        if kind == "tls_started":
            state.tls = True
            state.user = None
            state.helo = ""
            return ACCEPT
        if kind == "reset":
            state.reset_transaction()
            return ACCEPT
        if kind not in RATES:
            return rules.refuse(502, "5.5.1", "Command not implemented")
        ctx = self.context()
        if kind == "mail_from":
            state.reset_transaction()
            parsed = rules.parse_for(ev, ctx, sender=True, utf8="SMTPUTF8" in ev.parameters)
            checks = rules.MAIL_RULES
        elif kind == "rcpt_to":
            parsed = rules.parse_for(ev, ctx, sender=False, utf8=True)
            checks = rules.RCPT_RULES
        else:
            parsed, checks = None, rules.DATA_RULES
        if isinstance(parsed, policy_pb2.Verdict):
            return parsed
        try:
            ask = await self.read(ctx, state, kind, ev, parsed)
        except DirectoryUnavailable:
            return rules.refuse(451, "4.4.3", "Directory server temporarily unavailable, try again later")
        verdict = rules.first_refusal(checks, ctx, state, ask)
        if verdict is not None:
            return verdict
        await self.record(ctx, state, kind, ask)
        if kind == "data_start":
            return ACCEPT
        verdict = accept_address(ev.address, parsed)
        if kind == "rcpt_to" and self.data_needs_no_question(ctx, state):
            verdict = policy_pb2.Verdict(accept=True, address=verdict.address, data_decided=True)
        return verdict

    async def read(self, ctx: Context, state: SessionState, kind: str, ev, parsed) -> Ask:
        user = state.user
        if kind == "mail_from" and user is not None and state.user_in_directory:
            # The directory may have changed since AUTH (within its cache TTL for a remote one).
            account = await self.directories.lookup(user.login)
            user = account.user if account is not None else None
        name, _ = RATES[kind]
        limit = rules.rate_limit(ctx, user, name)
        used = 0
        if limit is not None and kind != "data_start":  # DATA counts; it is not refused for the rate
            used = await ctx.counters.get(self.rate_key(kind, user.login))
        return Ask(ev, parsed, user, limit, used)

    async def record(self, ctx: Context, state: SessionState, kind: str, ask: Ask) -> None:
        if kind == "mail_from":
            state.user = ask.user
            state.mail_from = str(ask.address) if ask.address else ""
        elif kind == "rcpt_to":
            state.recipients += 1
            if not state.authorized:
                state.postmaster_only = True
        if ask.limit is not None and kind != "mail_from":  # a message counts at DATA, not at MAIL
            await ctx.counters.incr(self.rate_key(kind, state.user.login))

    def rate_key(self, kind: str, login: str) -> str:
        return window_key(RATES[kind][1], login, self.settings.rate_window)

    @staticmethod
    def data_needs_no_question(ctx: Context, state: SessionState) -> bool:
        """After an accepted RCPT: DATA would be accepted and nothing counted at DATA, so the
        frontend need not ask."""
        return rules.data_authorized(ctx, state, None) is None and rules.rate_limit(ctx, state.user, "messages_per_hour") is None


def accept_address(given: str, parsed) -> policy_pb2.Verdict:
    """Accepted; tells the frontend the address to queue when it is not the one given: the
    canonical form the rules checked (a source route dropped, RFC 5321 §3.3; needless quotes
    dropped; the domain lowercased or completed)."""
    if parsed is not None and parsed.domain and str(parsed) != given:
        return policy_pb2.Verdict(accept=True, address=str(parsed))
    return ACCEPT
