"""Outbound TLS for direct delivery, end to end: a relay whose resolver is a real validating
unbound in front of a real knotd serving a DNSSEC-signed zone (and an unsigned one), MX hosts
on loopback addresses with certificates that match their TLSA records or do not, and the
site's TLS_POLICY table. What an operator sees: where the mail went, what never left in clear,
and why a message waits (`submitctl queue show` reads the same API)."""

from __future__ import annotations

import json

import pytest
import yaml

from relay_helpers import admin, body, envelope, metric, parse_report, queue
from submitd_devkit.certs import CertificateAuthority
from submitd_devkit.dnssec import DnssecLab, Zone
from submitd_devkit.mtasts import PolicyServer
from submitd_devkit.ports import free_port
from submitd_devkit.sink import Sink
from submitd_devkit.stack import Stack
from submitd_devkit.testing.ctl import submitctl
from submitd_devkit.testing.plugin import stack_options
from submitd_devkit.testing.users import default_users
from submitd_devkit.testing.waiting import eventually
from tls_peers import MxCA

GOOD, CLEAR, WRONG, STRICT = "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"
SENDER = "alice@plain.plain.test"  # its reports come back to the GOOD host
STRICT_SENDER = "alice@strict.signed.test"  # the reports of its REQUIRETLS mail come back with REQUIRETLS


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("outbound")
    ca = MxCA(root / "ca")
    port = free_port()
    good = ca.issue("mx.dane.signed.test", "mx.ta.signed.test", "mx.verify.plain.test", "mx.tlsabogus.signed.test",
                    "mx.plain.plain.test", "mx.strict.signed.test", "mx.sts.plain.test", label="good")
    stranger = MxCA(root / "other", "an unrelated CA").issue("mx.elsewhere.test")
    sinks = {
        GOOD: Sink(port, host=GOOD, tls_context=good.server_context()).start(),
        CLEAR: Sink(port, host=CLEAR).start(),  # no STARTTLS at all (or one stripped on the way)
        WRONG: Sink(port, host=WRONG, tls_context=stranger.server_context()).start(),
        STRICT: Sink(port, host=STRICT, tls_context=good.server_context(), requiretls=True).start(),
    }
    tlsa = f"_{port}._tcp"
    signed = {
        "dane.signed.test": {"MX": ["10 mx.dane.signed.test."]},
        "mx.dane.signed.test": {"A": [GOOD]},
        f"{tlsa}.mx.dane.signed.test": {"TLSA": [good.tlsa(3, 1, 1)]},
        "ta.signed.test": {"MX": ["10 mx.ta.signed.test."]},
        "mx.ta.signed.test": {"A": [GOOD]},
        f"{tlsa}.mx.ta.signed.test": {"TLSA": [good.tlsa(2, 0, 1, of=ca.cert)]},
        "mismatch.signed.test": {"MX": ["10 mx.mismatch.signed.test."]},
        "mx.mismatch.signed.test": {"A": [WRONG]},
        f"{tlsa}.mx.mismatch.signed.test": {"TLSA": [good.tlsa(3, 1, 1)]},
        "strip.signed.test": {"MX": ["10 mx.strip.signed.test."]},
        "mx.strip.signed.test": {"A": [CLEAR]},
        f"{tlsa}.mx.strip.signed.test": {"TLSA": [good.tlsa(3, 1, 1)]},
        "bogus.signed.test": {"MX": ["10 mx.bogus.signed.test."]},
        "mx.bogus.signed.test": {"A": [GOOD]},
        "tlsabogus.signed.test": {"MX": ["10 mx.tlsabogus.signed.test."]},
        "mx.tlsabogus.signed.test": {"A": [GOOD]},
        f"{tlsa}.mx.tlsabogus.signed.test": {"TLSA": [good.tlsa(3, 1, 1)]},
        "unsigned-mx.signed.test": {"MX": ["10 mx.plain.plain.test."]},
        "strict.signed.test": {"MX": ["10 mx.strict.signed.test."]},
        "mx.strict.signed.test": {"A": [STRICT]},
        f"{tlsa}.mx.strict.signed.test": {"TLSA": [good.tlsa(3, 1, 1)]},
    }
    plain = {
        "plain.plain.test": {"MX": ["10 mx.plain.plain.test."]},
        "mx.plain.plain.test": {"A": [GOOD]},
        f"{tlsa}.mx.plain.plain.test": {"TLSA": ["3 1 1 " + "00" * 32]},  # insecure: never believed
        "verify.plain.test": {"MX": ["10 mx.verify.plain.test."]},
        "mx.verify.plain.test": {"A": [GOOD]},
        "wrongname.plain.test": {"MX": ["10 mx.wrongname.plain.test."]},
        "mx.wrongname.plain.test": {"A": [GOOD]},
        "cleartext.plain.test": {"MX": ["10 mx.cleartext.plain.test."]},
        "mx.cleartext.plain.test": {"A": [CLEAR]},
        "lab.plain.test": {"MX": ["10 mx.lab.plain.test."]},
        "mx.lab.plain.test": {"A": [CLEAR]},
        "dane.only.plain.test": {"MX": ["10 mx.plain.plain.test."]},
    }
    # MTA-STS: each domain's policy host is the dev kit's HTTPS server on 127.0.0.1.
    policies = PolicyServer(CertificateAuthority(root / "web-ca", name="submitd test web CA")).start()
    for name, mode, mx in [("sts", "enforce", "mx.sts.plain.test"), ("stsname", "enforce", "mx.stsname.plain.test"),
                           ("stsother", "enforce", "*.elsewhere.test"), ("ststesting", "testing", "mx.ststesting.plain.test"),
                           ("stsdown", "enforce", "mx.stsdown.plain.test")]:
        domain = f"{name}.plain.test"
        plain[domain] = {"MX": [f"10 mx.{domain}."]}
        plain[f"mx.{domain}"] = {"A": [GOOD]}
        plain[f"_mta-sts.{domain}"] = {"TXT": ["v=STSv1; id=1;"]}
        plain[f"mta-sts.{domain}"] = {"A": ["127.0.0.1"]}
        policies.serve(domain, f"version: STSv1\r\nmode: {mode}\r\nmx: {mx}\r\nmax_age: 86400\r\n")
    lab = DnssecLab(root / "dns", zones={"signed.test": Zone(signed=True, records=signed),
                                         "plain.test": Zone(signed=False, records=plain)},
                    bogus={("mx.bogus.signed.test", "A"), (f"{tlsa}.mx.tlsabogus.signed.test", "TLSA")}).start()
    token = root / "admin-token"
    token.write_text("s3cret")  # relay_helpers.admin's, and submitctl's through run.json
    policy = {"verify.plain.test": "verify", "wrongname.plain.test": "verify", "cleartext.plain.test": "encrypt",
              "lab.plain.test": "none", ".only.plain.test": "dane-only"}
    env = {"relay": {
        "NEXT_HOP_HOST": "", "MX_PORT": str(port), "DNS_NAMESERVERS": json.dumps([lab.resolver[0]]),
        "DNS_PORT": str(lab.resolver[1]), "DNS_DNSSEC": "true", "MX_INTERNAL_NETWORKS": json.dumps(["127.0.0.0/8"]),
        "MX_CA_FILE": str(ca.path), "TLS_POLICY": json.dumps(policy), "CONNECT_TIMEOUT": "5",
        "MTA_STS_CA_FILE": str(policies.ca.path), "MTA_STS_PORT": str(policies.port),
        "RETRY_SCHEDULE": "[3600]", "ADMIN_TOKEN_FILE": str(token), "REWRITER_TARGET": "",
    }}
    stack = Stack(root / "stack", **stack_options(env=env, users=default_users(), next_hop=("127.0.0.1", port)))
    stack.sink = sinks[GOOD]
    try:
        stack.start(services=("relay",))
        stack.policies = policies
        yield stack, sinks
    finally:
        stack.stop(at_once=True)
        policies.stop()
        for s in sinks.values():
            s.stop()
        lab.stop()


def delivered_to(sink: Sink, recipient: str) -> list:
    return [m for m in sink.handler.messages if recipient in m.rcpt_tos]


def waiting_reply(stack, queue_id: str) -> str:
    """The reply the message waits on, as `submitctl queue show` prints it ("" until the first try)."""
    status, detail = admin(stack, "GET", f"/api/v1/queue/messages/{queue_id}")
    return (detail.get("last_reply") or "") if status == 200 else ""


def send(stack, recipient: str, subject: str, *, require_tls: bool = False, tls_optional: bool = False,
         sender: str = SENDER, ret: str = "") -> str:
    env = envelope([recipient], sender=sender, ret=ret)
    env.require_tls, env.tls_optional = require_tls, tls_optional
    return queue(stack, env, body(subject))


def report_for(sink: Sink, recipient: str):
    for m in sink.handler.messages:
        if m.mail_from == "" and recipient.encode() in m.data:
            return parse_report(m)[1]
    return None


@pytest.mark.parametrize("domain", ["dane.signed.test", "ta.signed.test"])
def test_dane_match_delivers_over_tls(world, domain):
    stack, sinks = world
    send(stack, f"bob@{domain}", f"dane {domain}")
    eventually(lambda: delivered_to(sinks[GOOD], f"bob@{domain}"), timeout=20)
    assert metric(stack, "submitd_relay_tls_policy_total", 'policy="tlsa",result="success"') >= 1


def test_dane_mismatch_defers_and_nothing_is_sent(world):
    stack, sinks = world
    qid = send(stack, "bob@mismatch.signed.test", "dane mismatch")
    reply = eventually(lambda: waiting_reply(stack, qid), timeout=20)
    assert reply.startswith("451 4.7.5 DANE: certificate of mx.mismatch.signed.test does not match its TLSA"), reply
    assert not sinks[WRONG].handler.messages, "a host that fails DANE never gets the message"
    # Counted for TLS reporting (RFC 8460 "tlsa-invalid") and on the metrics page.
    assert metric(stack, "submitd_relay_tls_policy_total", 'policy="tlsa",result="tlsa-invalid"') >= 1


def test_dane_host_without_starttls_never_gets_it_in_clear(world):
    stack, sinks = world
    qid = send(stack, "bob@strip.signed.test", "stripped")
    reply = eventually(lambda: waiting_reply(stack, qid), timeout=20)
    assert reply.startswith("451 4.7.4 DANE: mx.strip.signed.test does not offer STARTTLS"), reply
    assert not delivered_to(sinks[CLEAR], "bob@strip.signed.test")


def test_bogus_dnssec_defers(world):
    stack, sinks = world
    mx = send(stack, "bob@bogus.signed.test", "bogus address")
    tlsa = send(stack, "bob@tlsabogus.signed.test", "bogus tlsa")
    assert eventually(lambda: waiting_reply(stack, mx), timeout=30).startswith("451 4.4.3")
    reply = eventually(lambda: waiting_reply(stack, tlsa), timeout=30)
    assert reply.startswith("451 4.7.5 DANE: the TLSA records of the mail hosts of tlsabogus.signed.test"), reply
    assert not delivered_to(sinks[GOOD], "bob@bogus.signed.test")
    assert not delivered_to(sinks[GOOD], "bob@tlsabogus.signed.test")


def test_unsigned_tlsa_is_not_believed_and_opportunistic_tls_delivers(world):
    stack, sinks = world
    for domain in ("plain.plain.test", "unsigned-mx.signed.test"):
        send(stack, f"bob@{domain}", f"insecure {domain}")
        eventually(lambda: delivered_to(sinks[GOOD], f"bob@{domain}"), timeout=20)


def test_tls_policy_table(world):
    stack, sinks = world
    send(stack, "bob@verify.plain.test", "verify")
    wrong = send(stack, "bob@wrongname.plain.test", "wrong name")
    clear = send(stack, "bob@cleartext.plain.test", "needs tls")
    send(stack, "bob@lab.plain.test", "none")
    only = send(stack, "bob@dane.only.plain.test", "dane-only")
    eventually(lambda: delivered_to(sinks[GOOD], "bob@verify.plain.test"), timeout=20)
    eventually(lambda: delivered_to(sinks[CLEAR], "bob@lab.plain.test"), timeout=20)
    reply = eventually(lambda: waiting_reply(stack, wrong), timeout=20)
    assert reply.startswith("451 4.7.5 TLS_POLICY verify: certificate for mx.wrongname.plain.test does not match"), reply
    reply = eventually(lambda: waiting_reply(stack, clear), timeout=20)
    assert reply.startswith("451 4.7.4 TLS_POLICY encrypt: mx.cleartext.plain.test does not offer STARTTLS"), reply
    assert not delivered_to(sinks[CLEAR], "bob@cleartext.plain.test")
    reply = eventually(lambda: waiting_reply(stack, only), timeout=20)
    assert reply.startswith("451 4.7.5 DANE required (TLS_POLICY dane-only)"), reply
    assert not delivered_to(sinks[GOOD], "bob@dane.only.plain.test")


def test_requiretls_goes_only_verified_to_a_next_hop_that_offers_it(world):
    stack, sinks = world
    send(stack, "bob@strict.signed.test", "requiretls ok", require_tls=True)
    (got,) = eventually(lambda: delivered_to(sinks[STRICT], "bob@strict.signed.test"), timeout=20)
    assert "REQUIRETLS" in got.mail_options, "passed on to the next hop (RFC 8689 §4.2.1)"
    # DANE-verified, but the host does not offer REQUIRETLS: returned to the sender, 5.7.30.
    send(stack, "carol@dane.signed.test", "requiretls no support", require_tls=True, sender=STRICT_SENDER, ret="FULL")
    # No DANE or MTA-STS to verify the host with: returned, 5.7.10.
    send(stack, "dave@plain.plain.test", "requiretls no policy", require_tls=True, sender=STRICT_SENDER)
    blocks = eventually(lambda: report_for(sinks[STRICT], "carol@dane.signed.test"), timeout=20)
    assert blocks[1]["Status"] == "5.7.30", blocks
    blocks = eventually(lambda: report_for(sinks[STRICT], "dave@plain.plain.test"), timeout=20)
    assert blocks[1]["Status"] == "5.7.10", blocks
    # The reports went with REQUIRETLS themselves, and quote the header only, RET=FULL or not (RFC 8689 §5).
    reports = [m for m in sinks[STRICT].handler.messages if m.mail_from == ""]
    assert reports and all("REQUIRETLS" in m.mail_options for m in reports)
    assert all(b"Subject: requiretls no" in m.data and b"\r\n\r\nhello" not in m.data for m in reports)
    assert not delivered_to(sinks[GOOD], "carol@dane.signed.test")
    assert not [m for m in delivered_to(sinks[GOOD], "dave@plain.plain.test") if m.mail_from]


def test_tls_required_no_skips_dane_for_that_message_only(world):
    stack, sinks = world
    send(stack, "erin@mismatch.signed.test", "tls optional", tls_optional=True)
    eventually(lambda: delivered_to(sinks[WRONG], "erin@mismatch.signed.test"), timeout=20)
    qid = send(stack, "frank@mismatch.signed.test", "tls not optional")
    assert eventually(lambda: waiting_reply(stack, qid), timeout=20).startswith("451 4.7.5 DANE")
    assert not delivered_to(sinks[WRONG], "frank@mismatch.signed.test")


def test_mta_sts_enforce(world):
    stack, sinks = world
    send(stack, "bob@sts.plain.test", "sts ok")
    name = send(stack, "bob@stsname.plain.test", "sts wrong name")
    other = send(stack, "bob@stsother.plain.test", "sts mx not in policy")
    eventually(lambda: delivered_to(sinks[GOOD], "bob@sts.plain.test"), timeout=20)
    assert metric(stack, "submitd_relay_tls_policy_total", 'policy="sts",result="success"') >= 1
    reply = eventually(lambda: waiting_reply(stack, name), timeout=20)
    assert reply.startswith("451 4.7.5 MTA-STS enforce: certificate for mx.stsname.plain.test does not match"), reply
    shown = submitctl(stack, "queue", "show", name)  # what the operator reads
    assert shown.returncode == 0, shown.stderr
    assert yaml.safe_load(shown.stdout)["last_reply"] == reply
    reply = eventually(lambda: waiting_reply(stack, other), timeout=20)
    assert reply.startswith("451 4.7.5 MTA-STS enforce: no mail host of stsother.plain.test is named by the policy "
                            "(mx: *.elsewhere.test)"), reply
    assert not delivered_to(sinks[GOOD], "bob@stsname.plain.test") and not delivered_to(sinks[GOOD], "bob@stsother.plain.test")
    assert stack.policies.fetches["sts.plain.test"] == 1, "fetched once, then cached"


def test_mta_sts_testing_delivers_and_counts_the_failure(world):
    stack, sinks = world
    before = metric(stack, "submitd_relay_tls_policy_total", 'policy="sts",result="certificate-host-mismatch"')
    send(stack, "bob@ststesting.plain.test", "sts testing")
    eventually(lambda: delivered_to(sinks[GOOD], "bob@ststesting.plain.test"), timeout=20)
    after = metric(stack, "submitd_relay_tls_policy_total", 'policy="sts",result="certificate-host-mismatch"')
    assert after == before + 1


def test_a_cached_mta_sts_policy_keeps_applying_while_its_server_is_down(world):
    stack, sinks = world
    first = send(stack, "bob@stsdown.plain.test", "sts cached 1")
    assert "MTA-STS enforce" in eventually(lambda: waiting_reply(stack, first), timeout=20)
    stack.policies.stop()
    try:
        second = send(stack, "carol@stsdown.plain.test", "sts cached 2")
        reply = eventually(lambda: waiting_reply(stack, second), timeout=20)
        assert reply.startswith("451 4.7.5 MTA-STS enforce: certificate for mx.stsdown.plain.test"), reply
        assert not delivered_to(sinks[GOOD], "carol@stsdown.plain.test")
    finally:
        stack.policies.start()
