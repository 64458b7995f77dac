"""The Received field (RFC 5321 §4.4, RFC 3848, RFC 6531) and the hop limit, in memory: the exact
field for each way a message can come in, and what a client may not put in it."""

from datetime import datetime, timezone

import pytest

from submitd.v1 import common_pb2
from submitd_common import received
from submitd_rewriter.message import Options, Refused, rewrite_header

NOW = datetime(2026, 12, 7, 12, 0, 0, tzinfo=timezone.utc)
QID = "01M8K68S6JD127APNJY96T"
TLS = {"tls_version": "TLSv1.3", "tls_cipher": "TLS_AES_256_GCM_SHA384"}


def envelope(**kw) -> common_pb2.Envelope:
    values = {"queue_id": QID, "helo": "client.example", "client_address": "192.0.2.7", "esmtp": True,
              "recipients": [common_pb2.Recipient(address="bob@example.org")]}
    return common_pb2.Envelope(**(values | kw))


def stamp(env: common_pb2.Envelope, hide: bool = False) -> str:
    return received.field(env, by="msa.example.net", hide_client=hide, now=NOW).decode()


CASES = [  # (envelope, the `with` keyword): RFC 3848 and RFC 6531 §3.7.3
    (dict(authenticated_user="alice@example.net", **TLS), "ESMTPSA"),
    (dict(**TLS), "ESMTPS"),
    (dict(authenticated_user="alice@example.net"), "ESMTPA"),
    (dict(), "ESMTP"),
    (dict(esmtp=False), "SMTP"),
    (dict(smtputf8=True, authenticated_user="alice@example.net", **TLS), "UTF8SMTPSA"),
    (dict(smtputf8=True, **TLS), "UTF8SMTPS"),
    (dict(smtputf8=True, authenticated_user="alice@example.net"), "UTF8SMTPA"),
    (dict(smtputf8=True), "UTF8SMTP"),
]


@pytest.mark.parametrize("values,keyword", CASES, ids=[k for _, k in CASES])
def test_the_with_keyword_says_how_the_message_came_in(values, keyword):
    tls = ("\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384)\r\n" if "tls_version" in values else "")
    assert stamp(envelope(**values)) == (
        "Received: from client.example ([192.0.2.7])\r\n" + tls
        + f"\tby msa.example.net (submitd) with {keyword} id {QID}\r\n"
        "\tfor <bob@example.org>; Mon, 07 Dec 2026 12:00:00 +0000\r\n"
    ).replace("+0000", NOW.astimezone().strftime("%z"))


def test_for_names_the_recipient_only_when_there_is_one():
    env = envelope(recipients=[common_pb2.Recipient(address="bob@example.org"),
                               common_pb2.Recipient(address="carol@example.org")])
    text = stamp(env)
    assert "for <" not in text and "bob@" not in text
    assert text.splitlines()[-1].startswith(f"\tby msa.example.net (submitd) with ESMTP id {QID}; ")


def test_hidden_client_leaves_out_its_address():
    text = stamp(envelope(**TLS), hide=True)
    assert text.startswith("Received: from client.example\r\n\t(using TLSv1.3")
    assert "192.0.2.7" not in text
    # A client that names itself by its address literal is not named either.
    text = stamp(envelope(helo="[192.0.2.7]"), hide=True)
    assert text.startswith("Received: from unknown\r\n") and "192.0.2.7" not in text


def test_ipv6_client_is_an_ipv6_address_literal():
    assert stamp(envelope(client_address="2001:db8::7")).startswith("Received: from client.example ([IPv6:2001:db8::7])\r\n")


@pytest.mark.parametrize("helo", ["evil (by mx.bank.example); x", "a b", "caf\u00e9.example", "x\\y", "[not-literal"])
def test_a_helo_that_is_no_domain_is_not_copied(helo):
    text = stamp(envelope(helo=helo))
    assert text.startswith("Received: from unknown ([192.0.2.7])\r\n")
    assert helo not in text


def test_address_literal_helo_is_kept():
    assert stamp(envelope(helo="[192.0.2.7]")).startswith("Received: from [192.0.2.7] ([192.0.2.7])\r\n")


def test_every_line_is_short_and_ends_in_crlf():
    text = stamp(envelope(helo="a" * 63 + "." + "b" * 63 + ".example", **TLS))
    assert all(len(line) <= 998 for line in text.split("\r\n"))
    assert "\n" not in text.replace("\r\n", "")


def test_hops_counts_received_and_delivered_to_fields_not_continuations():
    header = (b"Received: from a\r\n by b; date\r\nDelivered-To: x@y\r\nreceived: by c; d\r\n"
              b"Subject: Received: no\r\nX-Received: no\r\n")
    assert received.hops(header) == 3


def rewrite(header: bytes, max_hops: int = 50, **kw) -> bytes:
    return rewrite_header(header, envelope(**kw), None, Options(domain="msa.example.net", max_hops=max_hops)).header


def test_the_rewriter_prepends_the_field_before_every_other():
    out = rewrite(b"From: a@example.net\r\nSubject: s\r\n", received_by="frontend.example.net")
    assert out.startswith(b"Received: from client.example ([192.0.2.7])\r\n\tby frontend.example.net (submitd) with ESMTP id ")
    assert b"\r\nFrom: a@example.net\r\nSubject: s\r\n" in out


def test_a_message_from_no_client_gets_no_field_here():
    # The relay's own reports carry the field the relay wrote; the rewriter adds none.
    out = rewrite_header(b"From: a@example.net\r\n", common_pb2.Envelope(queue_id=QID), None,
                         Options(domain="msa.example.net")).header
    assert b"Received:" not in out


def test_hop_limit_counts_the_field_it_would_add():
    ok = b"Received: from x by y; d\r\n" * 49 + b"From: a@example.net\r\n"
    assert received.hops(rewrite(ok)) == 50
    with pytest.raises(Refused) as refused:
        rewrite(b"Delivered-To: a@example.net\r\n" + ok)
    assert (refused.value.reply.code, refused.value.reply.enhanced) == (554, "5.4.6")
    assert "50 Received/Delivered-To" not in refused.value.reply.text and "51" in refused.value.reply.text
    with pytest.raises(Refused):
        rewrite(b"Received: by y; d\r\n" * 3 + b"From: a@example.net\r\n", max_hops=3)
