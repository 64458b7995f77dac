"""One mailbox, many spellings: the canonical (queued) form and the compared form of an
address, and the users file's grants and recipient lists compared in it (issue 25, item 8)."""

from __future__ import annotations

import pytest

from submitd_common.addresses import address_key, parse_mailbox
from submitd_common.users import User, UserDB, normalize

CANONICAL = [
    # (as sent, as queued)
    ("ceo@example.net", "ceo@example.net"),
    ("ceo@EXAMPLE.Net", "ceo@example.net"),
    ("CEO@example.net", "CEO@example.net"),  # a local part's case is the destination's business
    ('"ceo"@example.net', "ceo@example.net"),
    ('"c\\eo"@example.net', "ceo@example.net"),  # a quoted pair is the character itself
    ('"first.last"@example.net', "first.last@example.net"),
    ('"john doe"@example.net', '"john doe"@example.net'),  # the quotes are needed: kept
    ('"a\\"b"@example.net', '"a\\"b"@example.net'),
    ('"a..b"@example.net', '"a..b"@example.net'),  # not a dot-atom unquoted
    ('""@example.net', '""@example.net'),
    ("@relay.example:ceo@example.net", "ceo@example.net"),  # RFC 5321 §3.3: a route is ignored
    ("@a.example,@b.example:ceo@example.net", "ceo@example.net"),
    ('@relay.example:"ceo"@EXAMPLE.net', "ceo@example.net"),
    ("user@[IPv6:2001:0DB8:0::1]", "user@[IPv6:2001:db8::1]"),
    ("user@[ipv6:2001:db8::1]", "user@[IPv6:2001:db8::1]"),
    ("user@[192.0.2.1]", "user@[192.0.2.1]"),
]


@pytest.mark.parametrize("sent,queued", CANONICAL, ids=[c[0] for c in CANONICAL])
def test_the_queued_form_drops_routes_and_needless_quotes(sent, queued):
    assert str(parse_mailbox(sent).canonical) == queued
    assert normalize(sent) == queued
    assert str(parse_mailbox(queued).canonical) == queued, "the canonical form is its own canonical form"


def test_utf8_forms():
    assert str(parse_mailbox('"jösé"@EXÄMPLE.net', utf8=True).canonical) == "jösé@exämple.net"
    assert address_key("ceo@bücher.example") == address_key("CEO@XN--BCHER-KVA.example") == "ceo@xn--bcher-kva.example"


KEYS = [
    # (entry in the users file, address a client sent, equal when local parts fold, when they do not)
    ("ceo@example.net", "CEO@example.net", True, False),
    ("ceo@example.net", '"ceo"@example.net', True, True),
    ("ceo@example.net", '"CEO"@EXAMPLE.NET', True, False),
    ("ceo@example.net", "@x.example:ceo@example.net", True, True),
    ("Ceo@Example.net", "cEO@example.NET", True, False),
    ("ceo@example.net", "ceo.x@example.net", False, False),
    ("ceo@example.net", '"ceo "@example.net', False, False),
    ("@example.net", "@EXAMPLE.NET", True, True),
    ('"john doe"@example.net', '"John Doe"@example.net', True, False),
]


@pytest.mark.parametrize("entry,sent,folded,exact", KEYS, ids=[f"{k[0]} vs {k[1]}" for k in KEYS])
def test_compared_form(entry, sent, folded, exact):
    assert (address_key(entry) == address_key(sent)) is folded
    assert (address_key(entry, fold_local=False) == address_key(sent, fold_local=False)) is exact


SPELLINGS_OF_CEO = ["ceo@example.net", "CEO@example.net", '"ceo"@example.net', "ceo@EXAMPLE.NET",
                    "@relay.example:ceo@example.net", '@a.example,@b.example:"Ceo"@Example.Net', "ceo+x@example.net"]


def users(text_local_parts: str | None = None) -> UserDB:
    data = {
        "users": {
            "alice@example.net": {"password": "x", "send_as": ["Team@Example.net", "@Sales.Example.net"],
                                  "recipients": {"deny": ["ceo@example.net", "@rival.example"]}},
            "bob": {"password": "x", "recipients": {"allow": ["Boss@example.net"]}},
        },
        "aliases": {"Desk@Example.net": ["bob"]},
    }
    if text_local_parts:
        data["local_parts"] = text_local_parts
    return UserDB.from_mapping(data)


@pytest.mark.parametrize("sent", SPELLINGS_OF_CEO)
def test_a_denied_recipient_is_denied_however_it_is_spelt(sent):
    alice = users().users["alice@example.net"]
    assert not alice.may_send_to(sent)
    assert alice.may_send_to("cfo@example.net")
    assert not alice.may_send_to("anyone@RIVAL.example")


def test_grants_allow_lists_and_aliases_compare_canonically():
    db = users()
    alice, bob = db.users["alice@example.net"], db.users["bob"]
    for sent in ("team@example.net", '"TEAM"@example.net', "@r.example:Team@example.net", "ALICE@example.net",
                 "x@SALES.example.net"):
        assert alice.may_send_as(sent, db.aliases), sent
    assert not alice.may_send_as("team2@example.net", db.aliases)
    assert bob.may_send_to('"boss"@EXAMPLE.net') and not bob.may_send_to("boss2@example.net")
    assert bob.may_send_as("desk@example.net", db.aliases) and bob.may_send_as('"DESK"@example.net', db.aliases)
    assert alice.send_as == {"Team@example.net", "@sales.example.net"}, "kept as written (a Sender header uses it)"


def test_case_sensitive_local_parts_by_one_setting():
    db = users("case-sensitive")
    alice, bob = db.users["alice@example.net"], db.users["bob"]
    assert alice.may_send_to("CEO@example.net"), "another mailbox where local parts are case-sensitive"
    for sent in ("ceo@example.net", '"ceo"@example.net', "@relay.example:ceo@EXAMPLE.net"):
        assert not alice.may_send_to(sent), sent  # still one mailbox: quotes, routes, domain case
    assert alice.may_send_as("Team@example.net", db.aliases) and not alice.may_send_as("team@example.net", db.aliases)
    assert bob.may_send_as("Desk@example.net", db.aliases) and not bob.may_send_as("desk@example.net", db.aliases)
    with pytest.raises(ValueError):
        users("sometimes")


def test_users_read_from_a_dovecot_file_follow_the_setting():
    dovecot = {"Carol@example.net": User("Carol@example.net", "x")}
    db = UserDB.from_mapping({"local_parts": "case-sensitive"}, dovecot)
    carol = db.users["Carol@example.net"]
    assert carol.may_send_as("Carol@EXAMPLE.net") and not carol.may_send_as("carol@example.net")
    assert UserDB.from_mapping({}, dovecot).users["Carol@example.net"].may_send_as("carol@example.net")
