"""Policy's decisions in memory: the pure rules as a table, and the MAIL → RCPT → DATA flow of
``Decisions`` without rates (the rate counters need NATS KV: tests/test_policy.py)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from submitd.v1 import policy_pb2
from submitd_common.addresses import Address, parse_mailbox
from submitd_common.users import Limits, User, UserDB
from submitd_policy import rules
from submitd_policy.decisions import Decisions
from submitd_policy.rules import Ask, Context, SessionState
from submitd_policy.settings import Settings

ALICE_USER = User("alice", "x", send_as=frozenset({"alice@example.test"}), deny_recipients=frozenset({"@rival.test"}))
SUSPENDED = User("alice", "x", send_as=frozenset({"alice@example.test"}), suspended=True)
DB = UserDB({"alice": ALICE_USER}, aliases={"sales@example.test": frozenset({"alice"})})


def settings(**kw) -> Settings:
    return Settings(users_file="/dev/null", local_domains=["example.test"], local_subdomains=["sales"], **kw)


def ctx(**kw) -> Context:
    return Context(settings(**kw), DB)


def code(verdict) -> str | None:
    return None if verdict is None else f"{verdict.reply.code} {verdict.reply.enhanced}"


def addr(text: str) -> Address:
    return Address("postmaster", "") if text == "postmaster" else parse_mailbox(text, utf8=True)


AUTHED = SessionState(user=ALICE_USER)
ANON = SessionState()
TRUSTED = SessionState(trusted=True)

MAIL = [
    # (case, context settings, session, ask) → the refusal, or None
    ("anonymous", {}, ANON, Ask(None, addr("alice@example.test")), "530 5.7.0"),
    ("trusted network", {}, TRUSTED, Ask(None, addr("x@example.test")), None),
    ("anonymous, postmaster exception on", {"postmaster_without_auth": True}, ANON, Ask(None, addr("x@example.test")), None),
    ("own address", {}, AUTHED, Ask(None, addr("alice@example.test"), ALICE_USER), None),
    ("shared alias", {}, AUTHED, Ask(None, addr("sales@example.test"), ALICE_USER), None),
    ("someone else's", {}, AUTHED, Ask(None, addr("bob@example.test"), ALICE_USER), "550 5.7.1"),
    ("null return path", {}, AUTHED, Ask(None, None, ALICE_USER), None),
    ("suspended since AUTH", {}, AUTHED, Ask(None, addr("alice@example.test"), SUSPENDED), "550 5.7.1"),
    ("removed since AUTH", {}, AUTHED, Ask(None, addr("alice@example.test"), None), "550 5.7.1"),
    ("unqualified", {}, AUTHED, Ask(None, addr("alice@localhost"), ALICE_USER), "554 5.1.8"),
    ("incomplete multi-level", {}, AUTHED, Ask(None, addr("alice@squeaky.sales"), ALICE_USER), "554 5.1.8"),
    ("rate reached", {}, AUTHED, Ask(None, addr("alice@example.test"), ALICE_USER, limit=5, used=5), "450 4.7.1"),
    ("rate not reached", {}, AUTHED, Ask(None, addr("alice@example.test"), ALICE_USER, limit=5, used=4), None),
    # the first refusal in the list wins: ownership before the rate
    ("not owned and over rate", {}, AUTHED, Ask(None, addr("bob@example.test"), ALICE_USER, limit=1, used=9), "550 5.7.1"),
]

RCPT = [
    ("anonymous", {}, ANON, Ask(None, addr("bob@example.net")), "530 5.7.0"),
    ("anonymous to postmaster, exception off", {}, ANON, Ask(None, addr("postmaster")), "530 5.7.0"),
    ("anonymous to postmaster", {"postmaster_without_auth": True}, ANON, Ask(None, addr("postmaster")), None),
    ("anonymous to local postmaster@", {"postmaster_without_auth": True}, ANON, Ask(None, addr("postmaster@example.test")), None),
    ("anonymous to a foreign postmaster", {"postmaster_without_auth": True}, ANON, Ask(None, addr("postmaster@example.net")), "530 5.7.0"),
    ("authenticated", {}, AUTHED, Ask(None, addr("bob@example.net")), None),
    ("denied recipient domain", {}, AUTHED, Ask(None, addr("ceo@rival.test")), "550 5.7.1"),
    ("unqualified", {}, AUTHED, Ask(None, addr("bob@localhost")), "554 5.1.2"),
    ("incomplete multi-level", {}, AUTHED, Ask(None, addr("bob@east.sales")), "554 5.1.2"),
    ("rate reached", {}, AUTHED, Ask(None, addr("bob@example.net"), limit=3, used=3), "451 4.7.1"),
    ("unqualified and over rate", {}, AUTHED, Ask(None, addr("bob@localhost"), limit=3, used=3), "554 5.1.2"),
]


@pytest.mark.parametrize("case,kw,state,ask,expected", MAIL, ids=[c[0] for c in MAIL])
def test_mail_rules(case, kw, state, ask, expected):
    assert code(rules.first_refusal(rules.MAIL_RULES, ctx(**kw), state, ask)) == expected


@pytest.mark.parametrize("case,kw,state,ask,expected", RCPT, ids=[c[0] for c in RCPT])
def test_rcpt_rules(case, kw, state, ask, expected):
    assert code(rules.first_refusal(rules.RCPT_RULES, ctx(**kw), state, ask)) == expected


def test_rules_change_nothing():
    """A rule that refuses or accepts leaves the session as it was."""
    state = SessionState(user=ALICE_USER, mail_from="alice@example.test", recipients=2)
    before = repr(state)
    for table, checks in ((MAIL, rules.MAIL_RULES), (RCPT, rules.RCPT_RULES), (RCPT, rules.DATA_RULES)):
        for case, kw, _, ask, _ in table:
            rules.first_refusal(checks, ctx(**kw), state, ask)
    assert repr(state) == before


def decide(decisions: Decisions, state: SessionState, kind: str, **fields) -> policy_pb2.Verdict:
    return asyncio.run(decisions.decide(state, kind, SimpleNamespace(parameters=[], **fields)))


def watched(db: UserDB):
    return SimpleNamespace(value=db)


def test_postmaster_only_transaction_is_allowed_data_and_cleared_by_a_new_mail():
    decisions = Decisions(settings(postmaster_without_auth=True), watched(DB), None)
    state = SessionState()
    assert decide(decisions, state, "mail_from", address="someone@example.net").accept
    assert code(decide(decisions, state, "rcpt_to", address="bob@example.net")) == "530 5.7.0"
    verdict = decide(decisions, state, "rcpt_to", address="postmaster")
    assert verdict.accept and verdict.data_decided
    assert state.postmaster_only and state.recipients == 1
    assert decide(decisions, state, "data_start").accept
    decide(decisions, state, "mail_from", address="someone@example.net")
    assert not state.postmaster_only and state.recipients == 0
    assert code(decide(decisions, state, "data_start")) == "530 5.7.0"


def test_mail_uses_the_users_file_as_it_is_now():
    users = watched(DB)
    decisions = Decisions(settings(), users, None)
    state = SessionState(user=ALICE_USER)
    assert decide(decisions, state, "mail_from", address="alice@example.test").accept
    users.value = UserDB({"alice": SUSPENDED})
    assert code(decide(decisions, state, "mail_from", address="alice@example.test")) == "550 5.7.1"
    moved = User("alice", "x", send_as=frozenset({"a.lice@example.test"}), limits=Limits())
    users.value = UserDB({"alice": moved})
    assert code(decide(decisions, state, "mail_from", address="alice@example.test")) == "550 5.7.1"
    assert decide(decisions, state, "mail_from", address="a.lice@example.test").accept
    assert state.user is moved and state.mail_from == "a.lice@example.test"


def test_completed_domains_are_told_to_the_frontend():
    decisions = Decisions(settings(complete_domain="example.test"), watched(DB), None)
    state = SessionState(user=ALICE_USER)
    assert decide(decisions, state, "mail_from", address="alice@example.test").accept
    verdict = decide(decisions, state, "rcpt_to", address="bob@sales")
    assert verdict.accept and verdict.address == "bob@sales.example.test"
    assert decide(decisions, state, "rcpt_to", address="bob@example.net").address == ""


def test_tls_start_forgets_the_user_and_the_helo():
    decisions = Decisions(settings(), watched(DB), None)
    state = SessionState(user=ALICE_USER, helo="client.example")
    decide(decisions, state, "tls_started")
    assert state.user is None and state.helo == "" and state.tls
