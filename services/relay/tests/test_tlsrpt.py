"""TLS reporting (RFC 8460) without I/O: which TXT records name where reports go, how counts
add up and merge, the JSON report a domain receives, and the message a mailto: address gets."""

from __future__ import annotations

import email
import email.policy
import gzip
import json
import re

import pytest
from prometheus_client import REGISTRY

from submitd_relay.outbound import results as R
from submitd_relay.outbound.tlsrpt import Period, TlsReporting, TlsReportingSettings
from submitd_relay.outbound.tlsrpt_report import (MAX_FAILURE_KINDS, DomainCounts, build_report, domain_of_key,
                                                  key_domain, mailto_address, parse_record, report_message)
from submitd_relay.settings import Settings
from tlsrpt_schema import check_report

HTTPS = "https://r.example.net/v1"
STS_LINES = ("version: STSv1", "mode: enforce", "mx: *.mail.example.net", "max_age: 86400")


def sts(result_type=None, mx="a.mail.example.net", ip="192.0.2.1", detail="") -> R.TlsResult:
    return R.TlsResult("example.net", R.STS, STS_LINES, ("*.mail.example.net",), mx, ip, result_type, detail)


@pytest.mark.parametrize("texts, rua", [
    (["v=TLSRPTv1; rua=mailto:tlsrpt@example.net"], ["mailto:tlsrpt@example.net"]),
    (["v=TLSRPTv1;rua=mailto:a@example.net,https://r.example.net/v1"], ["mailto:a@example.net", HTTPS]),
    (["v=TLSRPTv1 ; rua=mailto:a@example.net , https://r.example.net/v1 ;"], ["mailto:a@example.net", HTTPS]),
    (["v=spf1 -all", "v=TLSRPTv1; rua=mailto:a@example.net"], ["mailto:a@example.net"]),  # others are discarded
    (["v=TLSRPTv1; rua=mailto:a@example.net", "v=TLSRPTv1; rua=mailto:b@example.net"], []),  # two: none (§3)
    (["v=TLSRPTv1; ext=1; rua=https://r.example.net/"], ["https://r.example.net/"]),  # extensions ignored
    (["v=TLSRPTv1; rua=ftp://r.example.net/,http://r.example.net/"], []),  # only mailto: and https:
    (["v=TLSRPTv1"], []), (["v=TLSRPTv2; rua=mailto:a@example.net"], []), (["V=tlsrptv1; rua=mailto:a@x.net"], []),
    ([" v=TLSRPTv1; rua=mailto:a@example.net"], []), ([], []),
    (["v=TLSRPTv1; rua=" + ",".join(f"mailto:r{i}@example.net" for i in range(20))],
     [f"mailto:r{i}@example.net" for i in range(5)]),  # a record cannot make the relay a mailing list
])
def test_the_tlsrpt_record_names_where_reports_go(texts, rua):
    assert parse_record(texts) == rua


def test_a_mailto_address_is_decoded_and_checked():
    assert mailto_address("mailto:tls%2Breports@example.net?subject=x") == "tls+reports@example.net"
    for bad in ("mailto:", "mailto:nobody", "mailto:a@[192.0.2.1]", "mailto:a@localhost", "mailto:a b@example.net",
                "mailto:a@example.net%0D%0ABcc:x@y.example"):
        with pytest.raises(ValueError):
            mailto_address(bad)


def test_counts_of_two_replicas_add_up_however_they_merge():
    a, b = DomainCounts(), DomainCounts()
    for _ in range(3):
        a.add(sts())
    a.add(sts(R.CERTIFICATE_EXPIRED, detail="certificate expired 2026-01-01"))
    b.add(sts())
    b.add(sts(R.CERTIFICATE_EXPIRED))
    b.add(sts(R.STARTTLS_NOT_SUPPORTED, mx="b.mail.example.net", ip="192.0.2.2"))
    b.add(R.TlsResult("example.net", R.NO_POLICY, receiving_mx_hostname="c.example.net"))
    stored = DomainCounts.from_bytes(a.to_bytes())
    stored.merge(DomainCounts.from_bytes(b.to_bytes()))
    assert stored.totals == (5, 3)
    policy = stored.policies[(R.STS, STS_LINES, ("*.mail.example.net",))]
    assert policy.failures == {(R.CERTIFICATE_EXPIRED, "a.mail.example.net", "192.0.2.1"): 2,
                               (R.STARTTLS_NOT_SUPPORTED, "b.mail.example.net", "192.0.2.2"): 1}
    assert policy.reasons[(R.CERTIFICATE_EXPIRED, "a.mail.example.net", "192.0.2.1")] == "certificate expired 2026-01-01"
    assert stored.policies[(R.NO_POLICY, (), ())].successes == 1


def test_failures_at_too_many_hosts_are_summed_not_dropped():
    counts = DomainCounts()
    for i in range(MAX_FAILURE_KINDS + 50):
        counts.add(sts(R.CERTIFICATE_NOT_TRUSTED, ip=f"10.0.{i // 256}.{i % 256}"))
    (policy,) = counts.policies.values()
    assert len(policy.failures) == MAX_FAILURE_KINDS + 1
    assert policy.failures[(R.CERTIFICATE_NOT_TRUSTED, "", "")] == 50
    assert counts.totals == (0, MAX_FAILURE_KINDS + 50)


@pytest.mark.parametrize("domain", ["example.net", "xn--bcher-kva.example", "under_score.example", "a*b>.example"])
def test_a_policy_domain_is_a_key_and_back(domain):
    key = key_domain(domain)
    assert re.fullmatch(r"[-/_=.a-zA-Z0-9]+", key) and "*" not in key and ">" not in key
    assert domain_of_key(key) == domain
    assert key_domain("a..example") is None and key_domain(".example") is None


def test_periods_are_utc_days_unless_shortened_for_tests():
    day = Period.of(1767225600 + 3600 * 13, 86400)  # 2026-01-01 13:00 UTC
    assert (day.label, day.start, day.end) == ("20260101T000000Z", 1767225600, 1767312000)
    assert day.previous.label == "20251231T000000Z" and day.next.label == "20260102T000000Z"
    assert Period.from_label(day.label, 86400) == day
    assert Period.of(1767225600 + 7, 5) == Period(1767225605, 5)


def report_for(counts: DomainCounts) -> dict:
    return build_report(organization="Example Org", contact="tlsrpt@relay.example.test", report_id="r1@relay.example.test",
                        start=1767225600, end=1767312000, domain="example.net", counts=counts)


def test_the_report_is_rfc_8460_json():
    counts = DomainCounts()
    counts.add(sts())
    counts.add(sts(R.CERTIFICATE_HOST_MISMATCH, detail="certificate for a.mail.example.net does not match"))
    counts.add(R.TlsResult("example.net", R.TLSA, ("3 1 1 abcd",), (), "mx.example.net", "2001:db8::25"))
    counts.add(R.TlsResult("example.net", R.TLSA, ("3 1 1 abcd",), (), "mx.example.net", "2001:db8::25",
                           R.TLSA_INVALID))
    counts.add(R.TlsResult("example.net", R.STS, result_type=R.STS_POLICY_FETCH_ERROR))
    counts.add(R.TlsResult("example.net", R.NO_POLICY, receiving_mx_hostname="mx.example.net"))
    report = report_for(counts)
    check_report(report)
    assert report["date-range"] == {"start-datetime": "2026-01-01T00:00:00Z", "end-datetime": "2026-01-01T23:59:59Z"}
    by_type = {}
    for item in report["policies"]:
        by_type.setdefault(item["policy"]["policy-type"], []).append(item)
    (unfetched, fetched) = sorted(by_type["sts"], key=lambda i: "policy-string" in i["policy"])
    assert fetched["policy"] == {"policy-type": "sts", "policy-string": list(STS_LINES), "policy-domain": "example.net",
                                      "mx-host": ["*.mail.example.net"]}
    assert fetched["summary"] == {"total-successful-session-count": 1, "total-failure-session-count": 1}
    assert fetched["failure-details"] == [{
        "result-type": "certificate-host-mismatch", "receiving-mx-hostname": "a.mail.example.net",
        "receiving-ip": "192.0.2.1", "failed-session-count": 1,
        "failure-reason-code": "certificate for a.mail.example.net does not match"}]
    assert unfetched["failure-details"] == [{"result-type": "sts-policy-fetch-error", "failed-session-count": 1}]
    (tlsa,) = by_type["tlsa"]
    assert tlsa["policy"]["policy-string"] == ["3 1 1 abcd"] and "mx-host" not in tlsa["policy"]
    (none,) = by_type["no-policy-found"]
    assert none["summary"]["total-successful-session-count"] == 1 and "failure-details" not in none


def test_a_report_that_breaks_the_rfc_is_caught():
    counts = DomainCounts()
    counts.add(sts())
    broken = report_for(counts)
    broken["policies"][0]["policy"]["policy_type"] = broken["policies"][0]["policy"].pop("policy-type")
    with pytest.raises(Exception):
        check_report(broken)


def test_the_mail_for_a_mailto_address_is_rfc_8460_section_5_3():
    counts = DomainCounts()
    counts.add(sts())
    data = gzip.compress(json.dumps(report_for(counts)).encode())
    raw = report_message(queue_id="Q1", report_id="20260101T000000Z.00ff@relay.example.test", domain="example.net",
                         submitter="relay.example.test", from_address="MAILER-DAEMON@relay.example.test",
                         to="tlsrpt@example.net", start=1767225600, end=1767312000, data=data, totals=(1, 0))
    assert raw.isascii() and not re.search(rb"\r(?!\n)|(?<!\r)\n", raw)
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report" and msg.get_param("report-type") == "tlsrpt"
    assert msg["TLS-Report-Domain"] == "example.net" and msg["TLS-Report-Submitter"] == "relay.example.test"
    assert " ".join(msg["Subject"].split()) == (
        "Report Domain: example.net Submitter: relay.example.test Report-ID: <20260101T000000Z.00ff@relay.example.test>")
    assert msg["TLS-Required"] == "No", "a report about broken TLS must get through it (RFC 8689 §5)"
    text, attachment = msg.iter_parts()
    assert text.get_content_type() == "text/plain" and "example.net" in text.get_content()
    assert attachment.get_content_type() == "application/tlsrpt+gzip"
    assert attachment.get_filename() == "relay.example.test!example.net!1767225600!1767312000!20260101T000000Z00ff.json.gz"
    check_report(json.loads(gzip.decompress(attachment.get_content())))


class _Settings(Settings, TlsReportingSettings):
    pass


def test_every_tls_attempt_is_in_the_metric_even_without_reports():
    reporting = TlsReporting(None, _Settings(helo_name="relay.example.test", tlsrpt=False), None)

    def count(result):
        return REGISTRY.get_sample_value("submitd_relay_tls_policy_total", {"policy": "sts", "result": result}) or 0

    before = count("success"), count("certificate-expired")
    reporting.record(sts())
    reporting.record(sts())
    reporting.record(sts(R.CERTIFICATE_EXPIRED))
    assert (count("success"), count("certificate-expired")) == (before[0] + 2, before[1] + 1)
    assert not reporting.pending, "TLSRPT=false: nothing kept for reports"
