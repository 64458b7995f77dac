"""The Received field a real client's message leaves with (RFC 5321 §4.4, RFC 3848), the hop
limit at submission and at the relay, and the field on the relay's own reports."""

from __future__ import annotations

import email
import re
import smtplib

import pytest

from submitd_devkit.testing.plugin import module_stack
from submitd_devkit.testing.users import ALICE
from submitd_devkit.testing.smtp import insecure_context, logged_in

pytestmark = pytest.mark.timeout(90)

HEADER = b"From: Alice <alice@example.test>\r\nTo: bob@example.net\r\nSubject: traced\r\n"
DATE = r"[A-Z][a-z]{2}, \d\d [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d [+-]\d{4}"
TLS_COMMENT = r"\t\(using TLSv1\.[23] with cipher [A-Z0-9_-]+\)\r\n"


@pytest.fixture(scope="module")
def trusting_stack(tmp_path_factory):
    """A stack that lets 127.0.0.0/8 submit without AUTH, so that every `with` keyword can be seen."""
    yield from module_stack(tmp_path_factory.mktemp("stack"), trusted_networks=["127.0.0.0/8"])


def send(client: smtplib.SMTP, recipients=("bob@example.net",), header=HEADER, **kw) -> str:
    client.mail(ALICE, kw.get("mail_options", []))
    for r in recipients:
        assert client.rcpt(r)[0] == 250
    code, text = client.data(header + b"\r\nbody\r\n")
    assert code == 250, text
    return text.decode().rsplit(" ", 1)[1]


def delivered(stack, queue_id: str) -> bytes:
    [got] = stack.sink.handler.wait_for(1, 20)
    assert queue_id in got.data.decode("utf-8", "replace")
    return got.data


def first_trace_field(data: bytes) -> str:
    header = data.split(b"\r\n\r\n", 1)[0].decode("utf-8")
    fields = re.findall(r"^[^\s:]+:.*?\r\n(?![ \t])", header + "\r\n", re.M | re.S)
    traces = [f for f in fields if f.lower().startswith("received:")]
    assert traces, "a Received field"
    # Above ours only the DKIM signatures, which are added after it.
    assert all(f.lower().startswith("dkim-signature:") for f in fields[: fields.index(traces[0])])
    return traces[0]


def test_starttls_and_auth_is_esmtpsa_naming_client_queue_id_and_recipient(trusting_stack):
    stack = trusting_stack
    stack.sink.handler.reset()
    with logged_in(stack) as client:
        qid = send(client)
    assert re.fullmatch(
        r"Received: from client\.example\.test \(\[127\.0\.0\.1\]\)\r\n" + TLS_COMMENT
        + rf"\tby submitd\.localhost \(submitd\) with ESMTPSA id {qid}\r\n"
        rf"\tfor <bob@example\.net>; {DATE}\r\n", first_trace_field(delivered(stack, qid))), qid


def test_implicit_tls_and_auth_is_esmtpsa(trusting_stack):
    stack = trusting_stack
    stack.sink.handler.reset()
    with logged_in(stack, implicit_tls=True) as client:
        qid = send(client, recipients=("bob@example.net", "carol@example.net"))
    assert re.fullmatch(
        r"Received: from client\.example\.test \(\[127\.0\.0\.1\]\)\r\n" + TLS_COMMENT
        + rf"\tby submitd\.localhost \(submitd\) with ESMTPSA id {qid}; {DATE}\r\n",
        first_trace_field(delivered(stack, qid)))


@pytest.mark.parametrize("starttls,helo,keyword", [
    (True, "ehlo", "ESMTPS"), (False, "ehlo", "ESMTP"), (False, "helo", "SMTP")])
def test_unauthenticated_from_a_trusted_network(trusting_stack, starttls, helo, keyword):
    stack = trusting_stack
    stack.sink.handler.reset()
    client = smtplib.SMTP("127.0.0.1", stack.ports.submission, timeout=30)
    with client:
        if helo == "helo":
            client.helo("old.example.test")
        else:
            client.ehlo("client.example.test")
            if starttls:
                client.starttls(context=insecure_context())
                client.ehlo("client.example.test")
        qid = send(client)
    field = first_trace_field(delivered(stack, qid))
    name = "old" if helo == "helo" else "client"
    assert re.fullmatch(
        rf"Received: from {name}\.example\.test \(\[127\.0\.0\.1\]\)\r\n" + (TLS_COMMENT if starttls else "")
        + rf"\tby submitd\.localhost \(submitd\) with {keyword} id {qid}\r\n\tfor <bob@example\.net>; {DATE}\r\n",
        field), field


def test_smtputf8_is_utf8smtpsa(trusting_stack):
    stack = trusting_stack
    stack.sink.handler.reset()
    with logged_in(stack) as client:
        qid = send(client, recipients=("b\u00f6b@example.net",), mail_options=["SMTPUTF8", "BODY=8BITMIME"])
    field = first_trace_field(delivered(stack, qid))
    assert f"with UTF8SMTPSA id {qid}\r\n\tfor <b\u00f6b@example.net>; " in field


def test_message_at_the_hop_limit_is_refused_554_5_4_6_and_session_goes_on(trusting_stack):
    stack = trusting_stack
    stack.sink.handler.reset()
    loop = b"Received: from mx.example.net by msa.example.net; Mon, 7 Dec 2026 10:00:00 +0000\r\n" * 49
    with logged_in(stack) as client:
        client.mail(ALICE)
        client.rcpt("bob@example.net")
        code, text = client.data(b"Delivered-To: bob@example.net\r\n" + loop + HEADER + b"\r\nround and round\r\n")
        assert (code, text.decode().split(" ", 1)[0]) == (554, "5.4.6"), text
        qid = send(client, header=loop + HEADER)  # 49 + ours = 50: within the limit
    data = delivered(stack, qid)
    header = data.split(b"\r\n\r\n", 1)[0]
    assert len(re.findall(rb"^Received:", header, re.M)) == 50
    assert b"round and round" not in data


def test_relay_returns_a_looping_message_and_reports_carry_a_received_field(make_stack, sink):
    """A relay with a lower limit than the rewriter (a loop through a second site, or settings
    that differ between replicas) refuses to deliver: the sender gets a DSN saying 5.4.6, and
    the DSN has its own Received field. Here also: the client's address hidden."""
    stack = make_stack(env={"relay": {"MAX_HOPS": "3"}, "rewriter": {"RECEIVED_CLIENT": "hide"}})
    with logged_in(stack) as client:
        ok = send(client, header=b"Received: by a.example; Mon, 7 Dec 2026 10:00:00 +0000\r\n" + HEADER)
        looping = send(client, header=b"Received: by a.example; Mon, 7 Dec 2026 10:00:00 +0000\r\n" * 3 + HEADER)
    got = sink.handler.wait_for(2, 30)
    by_rcpt = {m.rcpt_tos[0]: m for m in got}
    assert set(by_rcpt) == {"bob@example.net", ALICE}, "the looping message is returned, not delivered"
    passed = by_rcpt["bob@example.net"].data
    assert ok.encode() in passed
    field = first_trace_field(passed)
    assert field.startswith("Received: from client.example.test\r\n\t(using TLSv1.")
    assert "127.0.0.1" not in field
    report = by_rcpt[ALICE]
    assert report.mail_from == ""
    assert re.fullmatch(rf"Received: by submitd\.localhost \(submitd\) id [0-9A-Z]{{22}}; {DATE}\r\n",
                        first_trace_field(report.data))
    parsed = email.message_from_bytes(report.data)
    status = [p for p in parsed.walk() if p.get_content_type() == "message/delivery-status"][0]
    text = status.as_string()
    assert "Status: 5.4.6" in text and looping in report.data.decode()
    assert "Too many hops (4 Received/Delivered-To fields)" in text
