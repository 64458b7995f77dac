"""Nothing a client sends reaches the next hop with a line break of its own: the DSN injection
reproduced against `make run` (ENVID/ORCPT xtext decoding to CR, LF, NUL) is refused at MAIL and
RCPT, and the relay's writer refuses, whoever produced it, any message with a bare CR or LF, a
NUL or an over-long line. And the relay is aimed by DNS only at public addresses, and never
gives its smarthost password to a next hop without TLS."""

from __future__ import annotations

import json
import re

import pytest
from relay_helpers import envelope, parse_report, queue, relay_only, reports

from submitd_devkit.dns import DnsServer
from submitd_devkit.sink import Sink
from submitd_devkit.testing.metrics import sample
from submitd_devkit.testing.waiting import eventually
from submitd_devkit.testing.users import ALICE
from submitd_devkit.testing.smtp import logged_in, reply_of

pytestmark = pytest.mark.timeout(90)

ATTACK = "x+0A.+0AMAIL+20FROM:<ceo@bank.example>+0D+0A"


@pytest.mark.parametrize("command,reply", [
    (f"MAIL FROM:<{ALICE}> RET=HDRS ENVID={ATTACK}", "501 5.5.4 ENVID must be xtext of at most 100 printable characters"),
    (f"MAIL FROM:<{ALICE}> ENVID=a+00b", "501 5.5.4 ENVID must be xtext of at most 100 printable characters"),
    (f"MAIL FROM:<{ALICE}> ENVID=a+7Fb", "501 5.5.4 ENVID must be xtext of at most 100 printable characters"),
])
def test_envid_decoding_to_a_control_character_is_refused(stack, command, reply):
    with logged_in(stack) as client:
        code, text = reply_of(client, command)
        assert f"{code} {text}" == reply
        assert reply_of(client, f"MAIL FROM:<{ALICE}> ENVID=a+2Bb+20")[0] == 501, "a space is no ENVID character"
        assert reply_of(client, f"MAIL FROM:<{ALICE}> RET=HDRS ENVID=a+2Bb")[0] == 250, "the session goes on"
        code, text = reply_of(client, "RCPT TO:<bob@example.net> NOTIFY=FAILURE ORCPT=rfc822;bob+0D+0A.+0D+0A@example.net")
        assert f"{code} {text}" == "501 5.5.4 ORCPT must be addr-type;xtext of printable characters"
        assert reply_of(client, 'RCPT TO:<bob@example.net> ORCPT=rfc822;"b+20b"@example.net')[0] == 250


def test_relay_never_sends_a_body_with_a_bare_line_feed_and_tells_the_sender(make_stack, sink):
    """As if the frontend had let it through (or another producer queued it): the relay's own
    check stops it, the next hop never gets a complete message, the sender gets a 5.6.0 report."""
    stack = relay_only(make_stack)
    smuggled = (b"From: alice@example.test\r\nSubject: smuggled\r\n\r\nhi\n.\nMAIL FROM:<ceo@bank.example>\r\n")
    env = envelope()
    queue(stack, env, smuggled)
    [report] = [m for m in sink.handler.wait_for(1, 20)]
    assert report.mail_from == "" and report.rcpt_tos == [ALICE]
    assert all(b"ceo@bank" not in m.data or m.mail_from == "" for m in sink.handler.messages)
    _, blocks, _ = parse_report(report)
    assert blocks[-1]["Status"] == "5.6.0"
    assert "bare CR or LF" in blocks[-1]["Diagnostic-Code"]
    assert not re.search(rb"(?<!\r)\n|\r(?!\n)", report.data), "the report itself is clean"
    assert sample(stack.ports.relay_http, "submitd_delivery_unsendable_total") == 1
    assert env.queue_id in stack.log_path("relay").read_text()


def test_a_report_on_a_hostile_envid_carries_no_line_break(make_stack, sink):
    """An ENVID queued with raw line breaks (bypassing the frontend's check) is not sent on to the
    next hop as a parameter, and the bounce shows it encoded, on one line."""
    stack = relay_only(make_stack)
    env = envelope(envid="x\n.\nMAIL FROM:<ceo@bank.example>\r\n", ret="HDRS")
    queue(stack, env, b"From: alice@example.test\r\nSubject: envid\r\n\r\nhi\r\n")
    [report] = sink.handler.wait_for(1, 20)
    assert report.mail_from == "", "the original was never sent"
    assert not re.search(rb"(?<!\r)\n|\r(?!\n)", report.data)
    assert b"\r\n.\r\n" not in report.data
    assert b"\r\nOriginal-Envelope-Id: x?.?MAIL FROM:<ceo@bank.example>??\r\n" in report.data
    assert len(reports(sink)) == 1


def test_mx_hosts_on_loopback_or_private_addresses_are_never_connected_to(make_stack, sink):
    dns = DnsServer({"example.net": {"MX": ["10 mx.example.net."]}, "mx.example.net": {"A": ["127.0.0.1", "10.1.2.3"]},
                     "example.test": {"MX": ["10 mx.example.net."]}}).start()
    try:
        stack = relay_only(make_stack, NEXT_HOP_HOST="", MX_PORT=sink.port, DNS_NAMESERVERS=json.dumps(["127.0.0.1"]),
                           DNS_PORT=dns.port, CONNECT_TIMEOUT=2)
        queue(stack, envelope(["bob@example.net"]), b"From: alice@example.test\r\nSubject: internal\r\n\r\nhi\r\n")
        eventually(lambda: sample(stack.ports.relay_http, "submitd_delivery_recipients_total", result="failed") >= 1, 20)
        assert ("mx.example.net.", "A") in dns.queries
        assert sink.handler.ehlos == 0, "no connection to the loopback next hop DNS named"
        assert "have no public address" in stack.log_path("relay").read_text()
    finally:
        dns.stop()


# aiosmtpd warns of AUTH without TLS at every connection: that is the point here.
@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_the_smarthost_password_never_crosses_without_tls(make_stack):
    hop = Sink(login=("relay", "hop secret")).start()  # AUTH offered, no STARTTLS (stripped on the way)
    try:
        stack = relay_only(make_stack, hop, NEXT_HOP_TLS="opportunistic", NEXT_HOP_USERNAME="relay",
                           NEXT_HOP_PASSWORD="hop secret", RETRY_SCHEDULE="[0.5]")
        queue(stack, envelope(), b"From: alice@example.test\r\nSubject: secret\r\n\r\nhi\r\n")
        eventually(lambda: sample(stack.ports.relay_http, "submitd_delivery_attempts_total",
                                  result="deferred", next_hop=f"127.0.0.1:{hop.port}") >= 2, 20)
        assert hop.handler.messages == [], "deferred: never logged in, never delivered"
        assert "the smarthost password is not sent in clear" in stack.log_path("relay").read_text()
    finally:
        hop.stop()
