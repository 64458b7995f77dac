"""Policy decides on an address in the form it will be queued in, and tells the frontend that
form (issue 25, item 8): another spelling of a denied recipient is still denied, and a source
route is gone before the rules see the address and before it is queued."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from submitd_common.users import UserDB
from submitd_policy.decisions import Decisions
from submitd_policy.rules import SessionState
from submitd_policy.settings import Settings

DB = UserDB.from_mapping({"users": {"alice@example.test": {
    "password": "x", "send_as": ["Desk@example.test"],
    "recipients": {"deny": ["ceo@example.net", "@rival.test"]}}}})
ALICE = DB.users["alice@example.test"]


def decide(kind: str, address: str, state: SessionState | None = None):
    decisions = Decisions(Settings(users_file="/dev/null"), SimpleNamespace(value=DB), None)
    state = state or SessionState(user=ALICE)
    return asyncio.run(decisions.decide(state, kind, SimpleNamespace(parameters=[], address=address))), state


def code(verdict) -> str:
    return "accepted" if verdict.accept else f"{verdict.reply.code} {verdict.reply.enhanced}"


RCPT = [
    # (RCPT TO as sent, the reply, the address queued when accepted: "" = as sent)
    ("ceo@example.net", "550 5.7.1", None),
    ("CEO@example.net", "550 5.7.1", None),
    ('"ceo"@example.net', "550 5.7.1", None),
    ("ceo@EXAMPLE.NET", "550 5.7.1", None),
    ("@relay.example:ceo@example.net", "550 5.7.1", None),
    ('@a.example,@b.example:"CEO"@Example.Net', "550 5.7.1", None),
    ("ceo+urgent@example.net", "550 5.7.1", None),
    ("x@RIVAL.test", "550 5.7.1", None),
    ("bob@example.net", "accepted", ""),
    ("@relay.example:bob@example.net", "accepted", "bob@example.net"),
    ('"bob"@example.net', "accepted", "bob@example.net"),
    ("Bob@Example.NET", "accepted", "Bob@example.net"),
    ('"bob smith"@example.net', "accepted", ""),
]


@pytest.mark.parametrize("sent,reply,queued", RCPT, ids=[c[0] for c in RCPT])
def test_rcpt(sent, reply, queued):
    verdict, _ = decide("rcpt_to", sent)
    assert code(verdict) == reply
    if queued is not None:
        assert verdict.address == queued


MAIL = [
    ("alice@example.test", "accepted", ""),
    ("@relay.example:alice@example.test", "accepted", "alice@example.test"),
    ('"alice"@example.test', "accepted", "alice@example.test"),
    ("ALICE@example.test", "accepted", ""),
    ("desk@EXAMPLE.test", "accepted", "desk@example.test"),
    ("@relay.example:bob@example.test", "550 5.7.1", None),
]


@pytest.mark.parametrize("sent,reply,queued", MAIL, ids=[c[0] for c in MAIL])
def test_mail(sent, reply, queued):
    verdict, state = decide("mail_from", sent)
    assert code(verdict) == reply
    if queued is not None:
        assert verdict.address == queued
        assert state.mail_from == (queued or sent)
