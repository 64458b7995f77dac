"""The relay against a real nats-server and real SMTP next hops: what leaves, routing by MX,
DSNs (RFC 3464), outcome events and the queue admin API."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
import urllib.request

import nats
import pytest
from relay_helpers import (
    ALICE, admin, body, envelope, metric, ordinary, parse_report, queue, queue_async, queue_depth, queue_many,
    relay_only,
    reports,
)

from submitd_common import jetstream
from submitd_devkit.dns import DnsServer
from submitd_devkit.sink import Sink
from submitd_devkit.testing.waiting import eventually, eventually_async

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def dsn_sink():
    s = Sink(dsn=True).start()
    yield s
    s.stop()


def test_what_leaves_is_byte_identical_dot_stuffed_and_one_transaction_each(make_stack, sink):
    stack = relay_only(make_stack)
    # Lines a careless client would end the data with or lose a dot from, 8-bit text, a
    # 990-octet line and a last line that is a single dot.
    data = body("exact") + b".\r\n..two dots\r\n.one dot\r\n" + "café 8-bit\r\n".encode() + b"x" * 990 + b"\r\n.\r\n"
    queue(stack, envelope(["bob@example.net", "carol@example.net"], eight_bit=True), data)
    for i in range(5):
        queue(stack, envelope(), body(f"n{i}"))
    got = sink.handler.wait_for(6, 20)
    exact = [m for m in got if b"Subject: exact" in m.data]
    assert len(exact) == 1, "one transaction for both recipients"
    assert exact[0].data == data, "the next hop receives exactly the queued bytes"
    assert exact[0].rcpt_tos == ["bob@example.net", "carol@example.net"]
    assert "BODY=8BITMIME" in exact[0].mail_options
    assert len(got) == 6
    eventually(lambda: queue_depth(stack) == 0)


def test_per_destination_concurrency_limit_and_connection_reuse(make_stack, sink):
    stack = relay_only(make_stack, DESTINATION_CONCURRENCY=2)
    sink.handler.data_delay = 0.2
    queue_many(stack, [(envelope(), body(f"c{i}")) for i in range(12)])
    sink.handler.wait_for(12, 30)
    assert sink.handler.max_concurrent == 2, "never more than DESTINATION_CONCURRENCY transactions at once"
    assert sink.handler.ehlos <= 3, f"connections are reused ({sink.handler.ehlos} EHLOs for 12 messages)"


def test_permanent_failure_bounces_one_recipient_with_a_report(make_stack, sink):
    stack = relay_only(make_stack)
    sink.handler.rcpt_replies["nobody@example.net"] = "550 5.1.1 <nobody@example.net>: Recipient address rejected"
    qid = queue(
        stack,
        envelope(["bob@example.net", "nobody@example.net"], envid="ENV+2B1", orcpt="rfc822;nobody@example.net"),
        body("bounce me"),
    )
    sink.handler.wait_for(2, 20)
    eventually(lambda: queue_depth(stack) == 0)
    assert [m.rcpt_tos for m in ordinary(sink)] == [["bob@example.net"]], "the good recipient got it once"
    (report,) = reports(sink)
    assert report.rcpt_tos == [ALICE] and report.mail_from == "", "to the return path, from the null path"
    msg, blocks, returned = parse_report(report)
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert blocks[0]["Reporting-MTA"] == "dns; submitd.localhost"
    assert blocks[0]["Original-Envelope-Id"] == "ENV+1", "ENVID is xtext-decoded"
    assert blocks[0]["X-Submitd-Queue-ID"] == qid
    rcpt = blocks[1]
    assert rcpt["Final-Recipient"] == "rfc822; nobody@example.net"
    assert rcpt["Original-Recipient"] == "rfc822; nobody@example.net"
    assert rcpt["Action"] == "failed" and rcpt["Status"] == "5.1.1"
    assert rcpt["Diagnostic-Code"].startswith("smtp; 550 5.1.1")
    assert rcpt["Remote-MTA"] == "dns; 127.0.0.1"
    assert len(blocks) == 2, "only the failed recipient is reported"
    assert returned.get_content_type() == "text/rfc822-headers"
    assert "Subject: bounce me" in returned.get_payload() and "hello" not in returned.get_payload()


def test_ret_full_returns_the_whole_message(make_stack, sink):
    stack = relay_only(make_stack)
    sink.handler.rcpt_replies["nobody@example.net"] = "550 5.1.1 no such user"
    queue(stack, envelope(["nobody@example.net"], ret="FULL"), body("full", "the whole body"))
    sink.handler.wait_for(1, 20)
    _, _, returned = parse_report(reports(sink)[0])
    assert returned.get_content_type() == "message/rfc822"
    assert returned.get_payload()[0]["Subject"] == "full"
    assert "the whole body" in returned.get_payload()[0].get_payload()


def test_no_report_to_null_return_path_or_for_notify_never(make_stack, sink):
    stack = relay_only(make_stack)
    sink.handler.rcpt_replies["nobody@example.net"] = "550 5.1.1 no such user"
    queue(stack, envelope(["nobody@example.net"], sender=""), body("from null"))
    queue(stack, envelope(["nobody@example.net"], notify="NEVER"), body("never"))
    queue(stack, envelope(["nobody@example.net"], notify="SUCCESS"), body("success only"))
    eventually(lambda: queue_depth(stack) == 0)
    eventually(lambda: metric(stack, "submitd_delivery_events_total", 'event="bounced"') == 3)
    assert sink.handler.messages == [], "no report for any of them, and nothing stays queued"


def test_max_lifetime_gives_up_with_a_4_4_7_report(make_stack, sink):
    stack = relay_only(make_stack, MAX_LIFETIME=1.5)
    sink.handler.rcpt_replies["bob@example.net"] = "451 4.3.0 mailbox busy"
    queue(stack, envelope(), body("too late"))
    sink.handler.wait_for(1, 20)
    (report,) = reports(sink)
    _, blocks, _ = parse_report(report)
    assert blocks[1]["Action"] == "failed" and blocks[1]["Status"] == "4.4.7"
    assert blocks[1]["Diagnostic-Code"] == "smtp; 451 4.3.0 mailbox busy", "the last reply is kept"
    assert b"given up after" in report.data
    eventually(lambda: queue_depth(stack) == 0)


def test_delay_notice_once_when_asked_then_delivered(make_stack, sink):
    stack = relay_only(make_stack, DELAY_WARNING_AFTER=0.3, RETRY_SCHEDULE="[0.4]")
    sink.handler.data_replies.extend(["451 4.3.0 busy"] * 4)
    env = envelope(["bob@example.net"], notify="DELAY,FAILURE")
    env.recipients.add(address="carol@example.net")  # no NOTIFY: no delay notice for her
    queue(stack, env, body("slow"))
    eventually(lambda: len(ordinary(sink)) == 1, 30)
    assert ordinary(sink)[0].rcpt_tos == ["bob@example.net", "carol@example.net"]
    (notice,) = reports(sink)
    msg, blocks, _ = parse_report(notice)
    assert msg["Subject"].startswith("Delayed Mail")
    assert [b["Final-Recipient"] for b in blocks[1:]] == ["rfc822; bob@example.net"]
    assert blocks[1]["Action"] == "delayed" and blocks[1]["Status"] == "4.3.0"
    assert "Will-Retry-Until" in blocks[1]


def test_relayed_report_when_notify_success_meets_a_next_hop_without_dsn(make_stack, sink):
    stack = relay_only(make_stack)
    queue(stack, envelope(["bob@example.net"], notify="SUCCESS,FAILURE"), body("tell me"))
    sink.handler.wait_for(2, 20)
    assert "NOTIFY=SUCCESS,FAILURE" not in ordinary(sink)[0].rcpt_options, "not passed to a next hop without DSN"
    msg, blocks, _ = parse_report(reports(sink)[0])
    assert msg["Subject"].startswith("Successful Mail Delivery Report")
    assert blocks[1]["Action"] == "relayed" and blocks[1]["Status"] == "2.0.0"


def test_dsn_parameters_go_to_a_next_hop_that_offers_dsn(make_stack, dsn_sink):
    stack = relay_only(make_stack, dsn_sink)
    queue(stack, envelope(["bob@example.net"], notify="SUCCESS,FAILURE", orcpt="rfc822;bob@example.net",
                          ret="HDRS", envid="abc123"), body("dsn"))
    (got,) = dsn_sink.handler.wait_for(1, 20)
    assert "RET=HDRS" in got.mail_options and "ENVID=abc123" in got.mail_options
    assert "NOTIFY=SUCCESS,FAILURE" in got.rcpt_options and "ORCPT=rfc822;bob@example.net" in got.rcpt_options
    eventually(lambda: queue_depth(stack) == 0)
    assert len(dsn_sink.handler.messages) == 1, "the next hop reports success; the relay sends no DSN of its own"


@pytest.mark.parametrize("kind", ["8bit", "smtputf8"])
def test_message_the_next_hop_cannot_take_bounces_with_a_clear_reason(make_stack, kind):
    hop = Sink(eightbitmime=kind != "8bit", smtputf8=kind != "smtputf8").start()
    try:
        stack = relay_only(make_stack, hop)
        if kind == "8bit":
            queue(stack, envelope(eight_bit=True), body("eight", "caf\u00e9".encode().decode("latin-1")))
        else:
            queue(stack, envelope(["b\u00f8b@example.net"], smtputf8=True), body("utf8"))
        (report,) = hop.handler.wait_for(1, 20)
        assert report.mail_from == ""
        _, blocks, _ = parse_report(report)
        status = {"8bit": "5.6.3", "smtputf8": "5.6.7"}[kind]
        assert blocks[1]["Status"] == status
        assert {"8bit": "8BITMIME", "smtputf8": "SMTPUTF8"}[kind] in blocks[1]["Diagnostic-Code"]
    finally:
        hop.stop()


def test_mx_routing_by_domain_with_fallback_null_mx_and_nxdomain(make_stack, sink):
    dns = DnsServer({
        "example.net": {"MX": ["10 mx.example.net."]},
        "mx.example.net": {"A": ["127.0.0.1"]},
        # The preferred host refuses connections (nothing listens on 127.0.0.2): the backup takes it.
        "example.org": {"MX": ["10 down.example.org.", "20 backup.example.org."]},
        "down.example.org": {"A": ["127.0.0.2"]},
        "backup.example.org": {"A": ["127.0.0.1"]},
        "nomx.example": {"A": ["127.0.0.1"]},  # no MX: the domain itself (RFC 5321 §5.1)
        "nullmx.example": {"MX": ["0 ."]},
        "example.test": {"MX": ["10 mx.example.net."]},
    }).start()
    try:
        stack = relay_only(
            make_stack, NEXT_HOP_HOST="", MX_PORT=sink.port, DNS_NAMESERVERS=json.dumps(["127.0.0.1"]),
            DNS_PORT=dns.port, CONNECT_TIMEOUT=2, MX_INTERNAL_NETWORKS=json.dumps(["127.0.0.0/8"]),
        )
        queue(stack, envelope(["bob@example.net", "carol@example.org", "dave@nomx.example",
                               "eve@nullmx.example", "frank@nx.example"]), body("by mx"))
        eventually(lambda: len(sink.handler.messages) == 4)
        assert sorted(m.rcpt_tos[0] for m in ordinary(sink)) == ["bob@example.net", "carol@example.org", "dave@nomx.example"]
        assert all(len(m.rcpt_tos) == 1 for m in ordinary(sink)), "one transaction per destination"
        (report,) = reports(sink)
        _, blocks, _ = parse_report(report)
        by_rcpt = {b["Final-Recipient"]: b for b in blocks[1:]}
        assert by_rcpt["rfc822; eve@nullmx.example"]["Status"] == "5.1.10"
        assert "null MX" in by_rcpt["rfc822; eve@nullmx.example"]["Diagnostic-Code"]
        assert by_rcpt["rfc822; frank@nx.example"]["Status"] == "5.1.2"
        assert ("down.example.org.", "A") in dns.queries and ("nullmx.example.", "MX") in dns.queries
    finally:
        dns.stop()


def test_outcomes_are_published_as_events_and_counted(make_stack, sink):
    stack = relay_only(make_stack)
    sink.handler.rcpt_replies["nobody@example.net"] = "550 5.1.1 no such user"
    sink.handler.data_replies.append("451 4.3.0 later")

    async def run():
        nc = await nats.connect(stack.nats.url)
        sub = await nc.subscribe("submitd.events.>")
        (qid,) = await queue_async(stack.nats.url, [(envelope(["bob@example.net", "nobody@example.net"]), body("events"))])
        events = []
        while not any(e["event"] == "delivered" and e["queue_id"] == qid for e in events):
            m = await sub.next_msg(timeout=20)
            events.append(json.loads(m.data))
        await nc.close()
        return [e for e in events if e["queue_id"] == qid]

    mine = asyncio.run(run())
    kinds = [e["event"] for e in mine]
    assert "bounced" in kinds and "deferred" in kinds and "delivered" in kinds and "dsn" in kinds
    bounced = next(e for e in mine if e["event"] == "bounced")
    assert bounced["recipients"] == {"nobody@example.net": "550 5.1.1 no such user"}
    eventually(lambda: metric(stack, "submitd_delivery_events_total", 'event="delivered"') >= 2)  # the message and its DSN
    assert metric(stack, "submitd_dsn_total", 'action="failed"') == 1


def test_queue_admin_api_lists_shows_retries_deletes_and_bounces(make_stack, sink):
    stack = relay_only(make_stack, ADMIN_TOKEN="s3cret", RETRY_SCHEDULE="[3600]")
    for who in ("bob", "carol", "dave"):
        sink.handler.rcpt_replies[f"{who}@example.net"] = f"451 4.2.1 {who}'s mailbox busy"
    bob = queue(stack, envelope(["bob@example.net"]), body("for bob"))
    carol = queue(stack, envelope(["carol@example.net"]), body("for carol"))
    dave = queue(stack, envelope(["dave@example.net"]), body("for dave"))

    def deferred():
        code, listing = admin(stack, "GET", "/api/v1/queue/messages?state=deferred")
        return code == 200 and len(listing["messages"]) == 3 and listing

    listing = eventually(deferred)
    assert {m["id"] for m in listing["messages"]} == {bob, carol, dave}
    assert admin(stack, "GET", "/api/v1/queue/messages", token=None)[0] == 401
    assert admin(stack, "GET", "/api/v1/queue/messages", token="wrong")[0] == 401

    code, found = admin(stack, "GET", "/api/v1/queue/messages?recipient=carol")
    assert [m["id"] for m in found["messages"]] == [carol]
    assert found["messages"][0]["last_reply"] == "451 4.2.1 carol's mailbox busy"
    assert admin(stack, "GET", "/api/v1/queue/messages?sender=nobody")[1]["messages"] == []

    code, shown = admin(stack, "GET", f"/api/v1/queue/messages/{bob}")
    assert code == 200 and shown["sender"] == ALICE and shown["recipients"] == ["bob@example.net"]
    assert ["Subject", "for bob"] in shown["headers"]
    assert shown["attempt_log"][0]["replies"] == {"bob@example.net": "451 4.2.1 bob's mailbox busy"}
    assert admin(stack, "GET", "/api/v1/queue/messages/NOSUCHID")[0] == 404

    code, totals = admin(stack, "GET", "/api/v1/queue/totals")
    assert totals["messages"] == 3 and totals["deferred"] == 3

    # Retry now: delivered at once instead of in an hour.
    sink.handler.rcpt_replies.clear()
    assert admin(stack, "POST", f"/api/v1/queue/messages/{bob}/retry")[1]["entries"] == 1
    (delivered,) = sink.handler.wait_for(1, 15)
    assert b"Subject: for bob" in delivered.data

    # Delete: gone, never delivered, no report. Bounce: gone, with a report to the sender.
    assert admin(stack, "DELETE", f"/api/v1/queue/messages/{carol}")[0] == 200
    code, bounced = admin(stack, "POST", f"/api/v1/queue/messages/{dave}/bounce")
    assert code == 200 and bounced["report_queue_id"]
    eventually(lambda: len(reports(sink)) == 1)
    _, blocks, _ = parse_report(reports(sink)[0])
    assert blocks[1]["Final-Recipient"] == "rfc822; dave@example.net" and blocks[1]["Status"] == "5.0.0"
    eventually(lambda: queue_depth(stack) == 0)
    assert [b"for carol" in m.data for m in sink.handler.messages] == [False, False]

    with urllib.request.urlopen(f"http://127.0.0.1:{stack.ports.relay_http}/openapi.json", timeout=5) as r:
        paths = json.load(r)["paths"]
    assert "/api/v1/queue/messages/{queue_id}/bounce" in paths


def test_queue_admin_api_is_off_without_a_token(make_stack):
    stack = relay_only(make_stack)
    assert admin(stack, "GET", "/api/v1/queue/totals")[0] == 403


def test_smarthost_with_starttls_and_auth(make_stack, tmp_path):
    from submitd_devkit.certs import make_self_signed

    cert, key = make_self_signed(tmp_path / "hop-tls")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    hop = Sink(tls_context=context, login=("relay", "hop secret")).start()
    try:
        stack = relay_only(make_stack, hop, NEXT_HOP_TLS="required", NEXT_HOP_CA_FILE=str(cert),
                           NEXT_HOP_USERNAME="relay", NEXT_HOP_PASSWORD="hop secret")
        queue(stack, envelope(), body("via smarthost"))
        (got,) = hop.handler.wait_for(1, 20)
        assert got.data == body("via smarthost")

        # A wrong password is our problem, not the sender's: deferred, never bounced.
        stack.stop_service("relay")
        stack.extra_env["relay"]["NEXT_HOP_PASSWORD"] = "wrong"
        stack.extra_env["relay"]["COMMAND_TIMEOUT"] = "3"  # aiosmtpd leaves a failed LOGIN hanging
        stack.start_service("relay")
        stack.wait_ready("relay")
        queue(stack, envelope(), body("wrong password"))
        eventually(lambda: metric(stack, "submitd_delivery_attempts_total",
                                  f'next_hop="127.0.0.1:{hop.port}",result="deferred"') >= 2)
        assert len(hop.handler.messages) == 1 and queue_depth(stack) == 1
    finally:
        hop.stop()


def test_starttls_required_but_not_offered_defers(make_stack, sink):
    stack = relay_only(make_stack, NEXT_HOP_TLS="required")
    queue(stack, envelope(), body("never in clear"))
    eventually(lambda: metric(stack, "submitd_delivery_attempts_total",
                              f'next_hop="127.0.0.1:{sink.port}",result="deferred"') >= 1)
    assert sink.handler.messages == [] and queue_depth(stack) == 1


def test_8bit_message_to_a_next_hop_offering_starttls(make_stack, tmp_path):
    # The extensions must be asked again after STARTTLS: else 8BITMIME looks absent and an
    # 8-bit message would bounce with 5.6.3.
    from submitd_devkit.certs import make_self_signed

    cert, key = make_self_signed(tmp_path / "hop-tls")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    hop = Sink(tls_context=context, dsn=True).start()
    try:
        stack = relay_only(make_stack, hop, NEXT_HOP_VERIFY_TLS="false")  # opportunistic STARTTLS
        data = body("caf\u00e9", "caf\u00e9 cr\u00e8me".encode().decode("latin-1"))
        queue(stack, envelope(eight_bit=True, notify="SUCCESS,FAILURE"), data)
        (got,) = hop.handler.wait_for(1, 20)
        assert got.mail_from != "" and got.data == data
        assert "BODY=8BITMIME" in got.mail_options and "NOTIFY=SUCCESS,FAILURE" in got.rcpt_options
        eventually(lambda: queue_depth(stack) == 0)
        assert len(hop.handler.messages) == 1, "no bounce, no relayed report: the next hop has DSN"
    finally:
        hop.stop()


def test_unusable_domain_bounces_and_the_other_recipients_get_it_once(make_stack, sink):
    dns = DnsServer({"example.net": {"MX": ["10 mx.example.net."]}, "mx.example.net": {"A": ["127.0.0.1"]},
                     "example.test": {"MX": ["10 mx.example.net."]}}).start()
    try:
        stack = relay_only(make_stack, NEXT_HOP_HOST="", MX_PORT=sink.port, DNS_NAMESERVERS=json.dumps(["127.0.0.1"]),
                           DNS_PORT=dns.port, MX_INTERNAL_NETWORKS=json.dumps(["127.0.0.0/8"]))
        queue(stack, envelope(["bob@example.net", "snow@\u2603.example"], smtputf8=True), body("idna"))
        eventually(lambda: len(sink.handler.messages) == 2)
        eventually(lambda: queue_depth(stack) == 0)
        assert [m.rcpt_tos for m in ordinary(sink)] == [["bob@example.net"]]
        _, blocks, _ = parse_report(reports(sink)[0])
        assert blocks[1]["Status"] == "5.1.2" and "snow@" in blocks[1]["Final-Recipient"]
        time.sleep(1)
        assert len(sink.handler.messages) == 2, "bob got it once"
    finally:
        dns.stop()


async def test_delivery_record_refuses_a_stale_write(nats_server):
    from nats.js.errors import KeyWrongLastSequenceError

    from submitd_relay.state import StateStore

    nc = await nats.connect(nats_server.url)
    try:
        spec = jetstream.KvSpec(jetstream.DELIVERY_BUCKET, 3600)
        await nats_server.provision(buckets=[spec])
        one, two = StateStore(nc.jetstream(), spec), StateStore(nc.jetstream(), spec)
        await one.open()
        await two.open()
        first, second = await one.get("Q1"), await two.get("Q1")
        first.record(1, "hop", "delivered", ["a@example.net"], {})
        await one.put("Q1", first)
        second.record(1, "hop", "delivered", ["b@example.net"], {})
        with pytest.raises(KeyWrongLastSequenceError):
            await two.put("Q1", second)  # would have dropped a@example.net from the record
        again = await two.get("Q1")
        assert again.finished == ["a@example.net"]
        again.record(2, "hop", "delivered", ["b@example.net"], {})
        await two.put("Q1", again)
        assert (await one.get("Q1")).finished == ["a@example.net", "b@example.net"]
    finally:
        await nc.close()


async def test_a_finished_record_goes_after_its_own_time_to_live(nats_server):
    """A record kept for the bucket's max age (days) costs nats-server memory all that while
    (its per-subject index): a finished message's last write carries FINISHED_RECORD_SECONDS of
    its own and goes then, subject and all; a record still in use stays."""
    from nats.js.errors import KeyWrongLastSequenceError

    from submitd_relay.state import DeliveryState, StateStore

    nc = await nats.connect(nats_server.url)
    try:
        spec = jetstream.KvSpec(jetstream.DELIVERY_BUCKET, 3600)
        await nats_server.provision(buckets=[spec])
        store = StateStore(nc.jetstream(), spec, finished_ttl=1)
        await store.open()
        deferred, done_at_once, done_later = DeliveryState(), DeliveryState(), DeliveryState()
        deferred.record(1, "hop", "deferred", [], {"a@example.net": "451 4.3.0 later"})
        await store.put("DEFERRED", deferred)
        done_at_once.record(1, "hop", "delivered", ["a@example.net"], {})
        await store.put("AT_ONCE", done_at_once, final=True)
        done_later.record(1, "hop", "deferred", [], {})
        await store.put("LATER", done_later)
        stale = await store.get("LATER")
        done_later.record(2, "hop", "delivered", ["a@example.net"], {})
        await store.put("LATER", done_later, final=True)  # the update, compare-and-set as ever
        with pytest.raises(KeyWrongLastSequenceError):
            await store.put("LATER", stale, final=True)

        async def subjects() -> int:
            return len((await nc.jetstream().stream_info(f"KV_{jetstream.DELIVERY_BUCKET}", subjects_filter=">")).state.subjects or {})

        assert await subjects() == 3
        await eventually_async(lambda: subjects_are(subjects, 1), 10)  # the finished two: gone
        assert (await store.get("DEFERRED")).attempts[0].result == "deferred"
        assert (await store.get("AT_ONCE")).revision == (await store.get("LATER")).revision == 0
    finally:
        await nc.close()


async def subjects_are(count, n: int) -> bool:
    return await count() == n


def test_opportunistic_tls_that_fails_falls_back_to_clear(make_stack, tmp_path):
    from submitd_devkit.certs import make_self_signed

    cert, key = make_self_signed(tmp_path / "hop-tls")
    broken = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    broken.load_cert_chain(cert, key)
    broken.verify_mode = ssl.CERT_REQUIRED  # asks a client certificate the relay does not have
    broken.load_verify_locations(cert)
    hop = Sink(tls_context=broken).start()
    try:
        stack = relay_only(make_stack, hop, NEXT_HOP_VERIFY_TLS="false")  # opportunistic
        queue(stack, envelope(), body("in clear"))
        (got,) = hop.handler.wait_for(1, 20)
        assert got.data == body("in clear")
        assert "STARTTLS with 127.0.0.1" in stack.log_tail("relay", 20)
    finally:
        hop.stop()
