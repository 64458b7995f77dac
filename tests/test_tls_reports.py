"""TLS reporting (RFC 8460) against real components: relay replicas counting into one real
nats-server (as the relay's NATS user, within its grant), the dev kit's DNS server publishing
the domains' TLSRPT records, HTTPS report servers with a test CA, and for mailto: the rewriter
signing the report and a relay delivering it like any queued message to the reporting domain's
MX, a real SMTP sink."""

from __future__ import annotations

import asyncio
import email
import email.policy
import gzip
import json
import time
from pathlib import Path

import dkim as dkimpy
import nats
import pytest

from relay_helpers import reports
from submitd_common import grpcutil, jetstream, natsauth
from submitd_common.grpcutil import MutualTLS
from submitd_devkit.dns import DnsServer
from submitd_devkit.https import HttpsServer
from submitd_devkit.stack import NatsServer
from submitd_devkit.testing.waiting import eventually, eventually_async
from submitd_relay.outbound import results as R
from submitd_relay.outbound.tlsrpt import Period, TlsReporting, TlsReportingSettings
from submitd_relay.outbound.tlsrpt_report import key_domain
from submitd_relay.reports import Reports, Signer
from submitd_relay.routes import MxResolver
from submitd_relay.settings import Settings
from submitd_relay.streams import tls_reports
from submitd_rewriter import dkim
from tls_peers import MxCA
from tlsrpt_schema import check_report

NOON = 1767268800.0  # 2026-01-01T12:00:00Z
DAY = Period.of(NOON, 86400)
GOOD, UNTRUSTED = "127.0.0.5", "127.0.0.6"


class ReportingSettings(Settings, TlsReportingSettings):
    """The relay's Settings with the TLS reporting mixin, as the relay has them."""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("tlsrpt")
    ca = MxCA(root / "ca")
    good = HttpsServer(ca.issue("reports.example.net").server_context(), host=GOOD).start()
    untrusted = HttpsServer(MxCA(root / "other", "another CA").issue("untrusted.example.net").server_context(),
                            host=UNTRUSTED, port=good.port).start()
    dns = DnsServer({
        "_smtp._tls.example.net": {"TXT": ['"v=TLSRPTv1; rua=https://reports.example.net/v1/tlsrpt"']},
        "reports.example.net": {"A": [GOOD]},
        "untrusted.example.net": {"A": [UNTRUSTED]},
        "internal.example.net": {"A": ["10.1.2.3"]},
        "_smtp._tls.checks.example": {"TXT": [  # one record in two strings
            '"v=TLSRPTv1; rua=https://untrusted.example.net/x,https://internal.example.net/x," '
            '"https://10.1.2.3/x,https://reports.example.net/checks"']},
        "_smtp._tls.mail.example": {"TXT": ['"v=TLSRPTv1; rua=mailto:tlsrpt@reports.example.org"']},
        "reports.example.org": {"MX": ["10 mx.reports.example.org."]},
        "mx.reports.example.org": {"A": ["127.0.0.1"]},
    }).start()
    try:
        yield {"ca": ca, "good": good, "untrusted": untrusted, "dns": dns}
    finally:
        for server in (good, untrusted, dns):
            server.stop()


@pytest.fixture
def https(world):
    for server in (world["good"], world["untrusted"]):
        server.posts.clear()
    return world["good"]


@pytest.fixture
def nats_server(tmp_path: Path):
    server = NatsServer(tmp_path / "nats").start()
    yield server
    server.stop()
    assert not server.violations(), "the relay's NATS grant must cover TLS reporting"


def settings(world, **overrides) -> ReportingSettings:
    values = dict(helo_name="relay.example.test", dns_nameservers=["127.0.0.1"], dns_port=world["dns"].port,
                  dns_timeout=2, mx_internal_networks=["127.0.0.0/8"], tlsrpt_ca_file=str(world["ca"].path),
                  tlsrpt_https_port=world["good"].port, tlsrpt_https_timeout=5, tlsrpt_flush_interval=600)
    return ReportingSettings(**(values | overrides))


class Replica:
    """One relay replica's TLS reporting, on its own NATS connection as the relay's user."""

    def __init__(self, server: NatsServer, settings: ReportingSettings, clock=lambda: NOON, signer=None) -> None:
        self.server, self.settings, self.clock, self.signer = server, settings, clock, signer

    async def __aenter__(self) -> TlsReporting:
        self.nc = await nats.connect(self.server.service_url, user="relay", password=self.server.passwords["relay"],
                                     inbox_prefix=natsauth.inbox_prefix("relay"))
        js = self.nc.jetstream()
        await self.server.provision(queue=jetstream.QueueConfig(), buckets=[tls_reports(self.settings)])
        self.reporting = TlsReporting(js, self.settings, Reports(js, self.settings, self.signer), clock=self.clock)
        await self.reporting.start(MxResolver(self.settings))
        return self.reporting

    async def __aexit__(self, *exc) -> None:
        await self.reporting.close()
        await self.nc.close()


def sts(domain="example.net", result_type=None, mx="mx1.example.net", ip="192.0.2.1") -> R.TlsResult:
    return R.TlsResult(domain, R.STS, ("version: STSv1", "mode: testing", "mx: *.example.net", "max_age: 86400"),
                       ("*.example.net",), mx, ip, result_type)


def posted_report(post) -> dict:
    assert post.headers["Content-Type"] == "application/tlsrpt+gzip"
    report = json.loads(gzip.decompress(post.body))
    check_report(report)
    return report


def totals(report: dict) -> tuple[int, int]:
    return (sum(p["summary"]["total-successful-session-count"] for p in report["policies"]),
            sum(p["summary"]["total-failure-session-count"] for p in report["policies"]))


async def test_replicas_counts_make_one_report_sent_once(world, https, nats_server):
    s = settings(world)
    async with Replica(nats_server, s) as a, Replica(nats_server, s) as b:
        # Both write at the same moments, over and over: compare-and-set keeps every count.
        for _ in range(10):
            a.record(sts())
            b.record(sts())
            b.record(sts(result_type=R.CERTIFICATE_EXPIRED))
            await asyncio.gather(a.flush(), b.flush())
        a.record(sts(result_type=R.STARTTLS_NOT_SUPPORTED, mx="mx2.example.net", ip="192.0.2.2"))
        a.record(sts("norecord.example"))
        await a.close()  # what a counted since its last flush is written as it stops
        async with Replica(nats_server, s) as c:
            done = await asyncio.gather(b.send_reports(DAY), c.send_reports(DAY), b.send_reports(DAY))
    sent = [r for replica in done for r in replica]
    assert sorted(r.domain for r in sent) == ["example.net", "norecord.example"], "each domain's report once"
    (report,) = [r for r in sent if r.domain == "example.net"]
    assert report.outcomes == {"https://reports.example.net/v1/tlsrpt": "sent"}
    (post,) = https.posts
    assert post.path == "/v1/tlsrpt"
    body = posted_report(post)
    assert body["report-id"] == report.report_id and body["organization-name"] == "relay.example.test"
    assert body["date-range"] == {"start-datetime": "2026-01-01T00:00:00Z", "end-datetime": "2026-01-01T23:59:59Z"}
    assert totals(body) == (20, 11)
    (policy,) = body["policies"]
    assert policy["policy"]["policy-domain"] == "example.net" and policy["policy"]["mx-host"] == ["*.example.net"]
    assert sorted((d["result-type"], d["receiving-mx-hostname"], d["failed-session-count"])
                  for d in policy["failure-details"]) == [("certificate-expired", "mx1.example.net", 10),
                                                          ("starttls-not-supported", "mx2.example.net", 1)]
    # What became of it, for the operator (and for any replica that comes later): in the bucket.
    nc = await nats.connect(nats_server.url)
    kv = await nc.jetstream().key_value(jetstream.TLSRPT_BUCKET)
    lock = json.loads((await kv.get(f"sent.{DAY.label}.{key_domain('example.net')}")).value)
    assert lock["report_id"] == report.report_id and lock["rua"] == report.outcomes
    await nc.close()


async def test_a_report_goes_only_to_a_verified_public_https_server(world, https, nats_server):
    async with Replica(nats_server, settings(world)) as relay:
        relay.record(sts("checks.example"))
        (report,) = await relay.send_reports(DAY)
    assert report.outcomes["https://reports.example.net/checks"] == "sent"
    assert "certificate not trusted" in report.outcomes["https://untrusted.example.net/x"], report.outcomes
    assert "no public address" in report.outcomes["https://internal.example.net/x"], report.outcomes
    assert "not a public address" in report.outcomes["https://10.1.2.3/x"], report.outcomes
    assert [p.path for p in https.posts] == ["/checks"] and not world["untrusted"].posts
    # Looked up by the relay's resolver (the system's knows none of these names).
    assert ("reports.example.net.", "A") in world["dns"].queries


async def test_the_daily_loop_sends_each_period_once(world, https, nats_server):
    s = settings(world, tlsrpt_interval=1, tlsrpt_flush_interval=0.1)
    async with Replica(nats_server, s, clock=time.time) as a, \
            Replica(nats_server, s, clock=time.time) as b:
        a.record(sts())
        b.record(sts())

        def reported():
            return sum(totals(posted_report(p))[0] for p in https.posts) == 2

        await eventually_async(reported, timeout=10)
    periods = [posted_report(p)["date-range"]["start-datetime"] for p in https.posts]
    assert len(periods) == len(set(periods)), "one report per period, whichever replica sent it"


def test_a_mailto_report_is_signed_queued_and_delivered_by_the_relay(make_stack, sink, world, tmp_path):
    # As a DSN is: completed and DKIM-signed by the rewriter, queued, delivered by the relay to
    # the reporting domain's MX (a real sink), from the null path.
    key = dkim.generate_key("ed25519")
    (tmp_path / "dkim.pem").write_bytes(dkim.private_pem(key))
    (tmp_path / "dkim.yaml").write_text(json.dumps({"keys": [
        {"domain": "example.test", "selector": "tls", "key_file": str(tmp_path / "dkim.pem")}]}))
    dns = world["dns"]
    stack = make_stack(start=False, env={
        "rewriter": {"DKIM_KEYS_FILE": str(tmp_path / "dkim.yaml")},
        "relay": {"NEXT_HOP_HOST": "", "MX_PORT": sink.port, "DNS_NAMESERVERS": json.dumps(["127.0.0.1"]),
                  "DNS_PORT": dns.port, "MX_INTERNAL_NETWORKS": json.dumps(["127.0.0.0/8"])}})
    stack.start(services=("rewriter", "relay"))
    s = settings(world, tlsrpt_from="tlsrpt-noreply@example.test")

    async def report():
        cert, private = stack.grpc_ca.issue("relay")
        channel = grpcutil.channel(f"127.0.0.1:{stack.ports.rewriter}",
                                   MutualTLS(cert.read_bytes(), private.read_bytes(), stack.grpc_ca.path.read_bytes()))
        try:
            async with Replica(stack.nats, s, signer=Signer(channel, 10)) as relay:
                relay.record(sts("mail.example"))
                relay.record(sts("mail.example", R.CERTIFICATE_NOT_TRUSTED))
                return await relay.send_reports(DAY)
        finally:
            await channel.close()

    (sent,) = asyncio.run(report())
    (outcome,) = sent.outcomes.values()
    assert outcome.startswith("queued ")
    (message,) = eventually(lambda: reports(sink))
    assert message.rcpt_tos == ["tlsrpt@reports.example.org"] and message.mail_from == ""
    assert message.data.startswith(b"DKIM-Signature: ")
    assert dkimpy.verify(message.data, dnsfunc=lambda name, timeout=5: dkim.txt_value(key)
                         if name == b"tls._domainkey.example.test." else b"")
    msg = email.message_from_bytes(message.data, policy=email.policy.default)
    assert msg["From"].addresses[0].addr_spec == "tlsrpt-noreply@example.test"
    assert msg["TLS-Report-Domain"] == "mail.example" and msg["TLS-Report-Submitter"] == "relay.example.test"
    assert f"Report-ID: <{sent.report_id}>" in " ".join(msg["Subject"].split())
    assert msg.get_content_type() == "multipart/report" and msg.get_param("report-type") == "tlsrpt"
    text, attachment = msg.iter_parts()
    assert text.get_content_type() == "text/plain"
    assert attachment.get_content_type() == "application/tlsrpt+gzip"
    assert attachment.get_filename().startswith(f"relay.example.test!mail.example!{DAY.start}!{DAY.end}!")
    body = json.loads(gzip.decompress(attachment.get_content()))
    check_report(body)
    assert body["report-id"] == sent.report_id and totals(body) == (1, 1)
    assert body["contact-info"] == "tlsrpt-noreply@example.test"
