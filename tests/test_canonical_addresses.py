"""Addresses compared and queued in one form, end to end (issue 25, item 8): a deny rule is not
passed by another spelling of the same mailbox, and a source route (RFC 5321 §3.3: ignored) is
gone from what the next hop is given, not only from what the rules checked."""

from __future__ import annotations

import pytest

from submitd_devkit.stack import User
from submitd_devkit.testing.users import ALICE, ALICE_PASSWORD
from submitd_devkit.testing.smtp import logged_in, reply_of

pytestmark = pytest.mark.timeout(90)
MSG = b"From: alice@example.test\r\nTo: bob@example.net\r\nSubject: routes\r\n\r\nbody\r\n"


@pytest.fixture
def stack(make_stack):
    return make_stack(users={ALICE: User(ALICE_PASSWORD, [ALICE], extra={
        "recipients": {"deny": ["ceo@example.net"]}})})


def test_a_denied_recipient_is_refused_however_it_is_spelt(stack):
    with logged_in(stack) as c:
        assert c.mail(ALICE)[0] == 250
        for spelling in ("ceo@example.net", "CEO@example.net", '"ceo"@example.net', "ceo@EXAMPLE.NET",
                         "@relay.example:ceo@example.net", '@a.example,@b.example:"CEO"@Example.NET'):
            code, text = reply_of(c, f"RCPT TO:<{spelling}>")
            assert (code, text[:5]) == (550, "5.7.1"), f"{spelling}: {code} {text}"
        assert reply_of(c, "RCPT TO:<cfo@example.net>")[0] == 250, "the rule is no wider than its mailbox"


def test_a_source_route_never_reaches_the_next_hop(stack):
    with logged_in(stack) as c:
        assert reply_of(c, "MAIL FROM:<@relay.example:alice@example.test>")[0] == 250
        assert reply_of(c, "RCPT TO:<@relay.example,@other.example:bob@example.net>")[0] == 250
        assert reply_of(c, 'RCPT TO:<"carol"@EXAMPLE.net>')[0] == 250
        assert c.data(MSG)[0] == 250
    (received,) = stack.sink.handler.wait_for(1, timeout=20)
    assert received.mail_from == "alice@example.test"
    assert received.rcpt_tos == ["bob@example.net", "carol@example.net"]
