"""Golden cases of header completion: odd but legal input and exactly what comes out."""

import pytest

from submitd.v1 import common_pb2
from submitd_common.users import User, UserDB
from submitd_rewriter import headers
from submitd_rewriter.message import Options, Refused, rewrite_header

DATE = b"Date: Tue, 01 Dec 2026 10:00:00 +0000"
MSGID = b"Message-ID: <fixed@mx.example.net>"
USERS = UserDB(
    {"alice@example.net": User("alice@example.net", "x", send_as=frozenset({"@shared.example.net"}))},
    {"team@example.net": frozenset({"alice@example.net"})},
)


@pytest.fixture(autouse=True)
def fixed_values(monkeypatch):
    monkeypatch.setattr(headers, "new_date", lambda now=None: DATE[6:].decode())
    monkeypatch.setattr(headers, "new_message_id", lambda domain: MSGID[12:].decode())
    import submitd_rewriter.message as message

    monkeypatch.setattr(message, "new_date", lambda now=None: DATE[6:].decode())
    monkeypatch.setattr(message, "new_message_id", lambda domain: MSGID[12:].decode())


def run(header: bytes, user: str = "alice@example.net", utf8: bool = False, **opts) -> bytes:
    envelope = common_pb2.Envelope(authenticated_user=user, smtputf8=utf8)
    return rewrite_header(header, envelope, USERS, Options(domain="mx.example.net", **opts)).header


GOLDEN = [
    (  # folded fields and encoded words stay as they are; the missing fields are appended
        b"From: =?utf-8?q?Al=C3=AFce?=\r\n <alice@example.net>\r\nSubject: a\r\n\tfolded subject\r\n",
        b"From: =?utf-8?q?Al=C3=AFce?=\r\n <alice@example.net>\r\nSubject: a\r\n\tfolded subject\r\n"
        + DATE + b"\r\n" + MSGID + b"\r\n",
    ),
    (  # group syntax and comments in addresses are valid
        b"From: alice@example.net (Alice in comments)\r\nTo: undisclosed-recipients:;\r\n"
        b"Cc: Team: a@example.org, (c) b@example.org;\r\n" + DATE + b"\r\n" + MSGID + b"\r\n",
        b"From: alice@example.net (Alice in comments)\r\nTo: undisclosed-recipients:;\r\n"
        b"Cc: Team: a@example.org, (c) b@example.org;\r\n" + DATE + b"\r\n" + MSGID + b"\r\n",
    ),
    (  # From a shared alias: Sender names the user (RFC 6409 §8.1)
        b"From: Team <team@example.net>\r\n" + DATE + b"\r\n" + MSGID + b"\r\n",
        b"From: Team <team@example.net>\r\n" + DATE + b"\r\n" + MSGID + b"\r\nSender: alice@example.net\r\n",
    ),
    (  # an unparseable Date and an invalid Message-ID are replaced in place
        b"Date: yesterday-ish\r\nFrom: alice@example.net\r\nMessage-ID: not an id\r\n",
        DATE + b"\r\nFrom: alice@example.net\r\n" + MSGID + b"\r\n",
    ),
]


@pytest.mark.parametrize("given,expected", GOLDEN, ids=["folded-encoded", "groups-comments", "sender", "fix"])
def test_golden(given, expected):
    assert run(given) == expected


def test_8bit_headers_under_smtputf8():
    given = "From: Zoë <alice@example.net>\r\nTo: jösé@exämple.org\r\n".encode() + DATE + b"\r\n" + MSGID + b"\r\n"
    assert run(given, utf8=True) == given
    with pytest.raises(Refused) as err:
        run(given, utf8=False)
    assert err.value.reply.code == 554


@pytest.mark.parametrize(
    "field,code,enhanced",
    [
        (b"To: bob@localhost\r\n", 554, "5.6.0"),
        (b"Cc: bob@@example.org\r\n", 554, "5.6.0"),
        (b"Reply-To: <>\r\n", 554, "5.6.0"),
        (b"Sender: mallory@evil.example\r\n", 550, "5.7.1"),
    ],
)
def test_refusals_name_the_header(field, code, enhanced):
    with pytest.raises(Refused) as err:
        run(b"From: alice@example.net\r\n" + field)
    assert (err.value.reply.code, err.value.reply.enhanced) == (code, enhanced)
    if code == 554:
        assert field.split(b":")[0].decode() in err.value.reply.text


def test_header_from_must_be_owned_unless_disabled():
    with pytest.raises(Refused) as err:
        run(b"From: ceo@example.net\r\n")
    assert (err.value.reply.code, err.value.reply.enhanced) == (550, "5.7.1")
    assert run(b"From: anyone@shared.example.net\r\n" + DATE + b"\r\n" + MSGID + b"\r\n").startswith(b"From: anyone@")
    assert run(b"From: ceo@example.net\r\n", check_from=False).startswith(b"From: ceo@")
    assert run(b"From: ceo@example.net\r\n", user="").startswith(b"From: ceo@"), "no user (trusted network)"


def test_single_label_header_domains_are_completed_in_place():
    out = run(b"From: alice@example.net\r\nTo: Bob <bob@sales>, carol@example.org\r\n", complete_domain="example.net")
    assert b"To: Bob <bob@sales.example.net>, carol@example.org\r\n" in out


def test_rewrite_rules_change_only_matching_addresses():
    from submitd_rewriter.rules import RewriteRules, Rule

    rules = RewriteRules(
        (Rule("jru@example.net", "J.Random.User@example.net"), Rule("@*.sales.example.net", "@example.net"))
    )
    envelope = common_pb2.Envelope(
        return_path="jru@example.net",
        recipients=[common_pb2.Recipient(address="x@east.sales.example.net")],
    )
    users = UserDB({})
    header = (
        b"From: Jay <jru@example.net>\r\nReply-To: team@east.sales.example.net\r\n"
        b"To: x@east.sales.example.net\r\nCc: jru@example.org\r\n" + DATE + b"\r\n" + MSGID + b"\r\n"
    )
    out = rewrite_header(header, envelope, users, Options(domain="mx.example.net"), rules).header
    assert out.startswith(b"From: Jay <J.Random.User@example.net>\r\nReply-To: team@example.net\r\n")
    assert b"To: x@east.sales.example.net\r\n" in out, "destinations are left alone unless asked"
    assert b"Cc: jru@example.org\r\n" in out, "no rule, no change"
    assert envelope.return_path == "J.Random.User@example.net"
    assert envelope.recipients[0].address == "x@east.sales.example.net"

    both = RewriteRules(rules.rules, headers=True, recipients=True)
    envelope.recipients[0].address = "x@east.sales.example.net"
    out = rewrite_header(header, envelope, users, Options(domain="mx.example.net"), both).header
    assert b"To: x@example.net\r\n" in out and envelope.recipients[0].address == "x@example.net"


def test_quoted_printable_streaming_matches_the_stdlib_decoder():
    import quopri

    from submitd_rewriter.encoding import QuotedPrintable

    body = "Grüße aus Köln = 100%\r\ntrailing space \r\n".encode() + ("é" * 60).encode() + b"\r\n"
    for size in (1, 7, 1000):
        qp, out = QuotedPrintable(), b""
        for i in range(0, len(body), size):
            out += qp.update(body[i : i + size])
        out += qp.finish()
        assert out.isascii() and max(len(line) for line in out.split(b"\r\n")) <= 76
        assert quopri.decodestring(out.replace(b"\r\n", b"\n")).replace(b"\n", b"\r\n") == body
        assert b"\n" not in out.replace(b"\r\n", b""), "CRLF line ends only"


async def test_message_without_final_crlf_is_completed_and_signed(signing):
    from submitd.v1 import rewriter_pb2
    from submitd_rewriter.service import RewriterService
    from submitd_rewriter.settings import Settings

    service = RewriterService(Settings(message_id_domain="mx.example.net"), keys=signing.keys)
    for message in (b"From: alice@example.net\r\nSubject: no body, no CRLF", b"From: a@example.net\r\n\r\nlast line"):
        result = service.rewrite_whole(rewriter_pb2.WholeMessage(envelope=common_pb2.Envelope(), message=message))
        out = result.accepted.message
        signatures, _, rest = out.partition(message[:6])
        assert rest.startswith(message.split(b"\r\n\r\n")[0].split(b"\r\nSubject")[0][6:])
        assert signatures.count(b"DKIM-Signature: ") == 2 and signatures.startswith(b"DKIM-Signature: ")
        assert signing.verified(out) == signing.selectors, "each key of the From domain signed it"
        assert signing.verified(out.replace(b"From: a", b"From: b")) == [], "the signatures cover it"
        assert b"\r\n" + DATE in out and b"\r\n" + MSGID in out
        if b"last line" in message:
            assert out.endswith(b"\r\n\r\nlast line"), "the body is left exactly as sent"
            assert signing.verified(out[:-1] + b"s") == [], "the signatures cover the last line"
        else:
            assert out.endswith(b"Subject: no body, no CRLF\r\n" + DATE + b"\r\n" + MSGID + b"\r\n")


@pytest.mark.parametrize("nesting", [b"(" * 600, (b"g:" * 400 + b"\r\n ") * 5], ids=["comments", "groups"])
@pytest.mark.parametrize("name", [b"From", b"Reply-To", b"Resent-From"])
def test_an_address_nested_past_the_parsers_depth_is_554_560(name, nesting):
    # email.utils recurses once per level: a RecursionError out of the service was a 451.
    with pytest.raises(Refused) as err:
        run(b"From: alice@example.net\r\n" + name + b": " + nesting + b"alice@example.net\r\n")
    assert (err.value.reply.code, err.value.reply.enhanced) == (554, "5.6.0")
    assert err.value.reply.text == f"Invalid address in {name.decode()} header: nested too deep"
