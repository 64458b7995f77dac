"""The dev kit's DNSSEC lab (knotd + ldns-signzone + unbound on loopback), asked as the relay
asks: dnspython with the DO bit, at the lab's validating resolver."""

from __future__ import annotations

from pathlib import Path

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.resolver
import pytest

from submitd_devkit.dnssec import DnssecLab, Zone

TLSA = "3 1 1 " + "ab" * 32
STS = 'v=STSv1; id="20261207"; ' + "x" * 300  # quotes, a semicolon, more than one 255-byte string


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = DnssecLab(tmp_path_factory.mktemp("dnssec"), zones={
        "signed.test": Zone(records={
            "signed.test": {"MX": ["10 mx.signed.test."]},
            "mx.signed.test": {"A": ["127.0.0.1"]},
            "_25._tcp.mx.signed.test": {"TLSA": [TLSA]},
            "_mta-sts.signed.test": {"TXT": [STS]},
            "mx.bogus.signed.test": {"A": ["127.0.0.1"]},
            "changing.signed.test": {"A": ["127.0.0.1"]},
        }),
        "plain.test": Zone(signed=False, records={"mx.plain.test": {"A": ["127.0.0.1"]}}),
    }, bogus={("mx.bogus.signed.test", "A")}).start()
    yield lab
    lab.stop()
    assert len(lab.procs) == 2 and all(proc.returncode is not None for proc in lab.procs)  # knotd, unbound: gone
    assert not Path(lab.rundir).exists()


def ask(server: tuple[str, int], name: str, rdtype: str, *, cd: bool = False) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, want_dnssec=True)
    if cd:
        query.flags |= dns.flags.CD
    return dns.query.udp(query, server[0], port=server[1], timeout=5)


def resolve(lab: DnssecLab, name: str, rdtype: str) -> dns.resolver.Answer:
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers, resolver.port = [lab.resolver[0]], lab.resolver[1]
    resolver.use_edns(0, dns.flags.DO, 1232)
    return resolver.resolve(name, rdtype)


def values(answer: dns.resolver.Answer) -> list[str]:
    return sorted(rdata.to_text() for rdata in answer)


def test_names_in_a_signed_zone_are_secure(lab):
    for name, rdtype, expected in [("signed.test", "MX", ["10 mx.signed.test."]),
                                   ("mx.signed.test", "A", ["127.0.0.1"]), ("_25._tcp.mx.signed.test", "TLSA", [TLSA])]:
        answer = resolve(lab, name, rdtype)
        assert answer.response.flags & dns.flags.AD, name
        assert values(answer) == expected
    txt = resolve(lab, "_mta-sts.signed.test", "TXT")
    assert txt.response.flags & dns.flags.AD
    assert [b"".join(rdata.strings).decode() for rdata in txt] == [STS]


def test_names_in_an_unsigned_zone_are_answered_without_ad(lab):
    answer = resolve(lab, "mx.plain.test", "A")
    assert values(answer) == ["127.0.0.1"] and not answer.response.flags & dns.flags.AD


def test_a_bogus_name_is_servfail_though_its_data_is_served(lab):
    assert ask(lab.resolver, "mx.bogus.signed.test", "A").rcode() == dns.rcode.SERVFAIL
    # The data is there (unchecked, CD), knot serves it: only its signature is wrong.
    unchecked = ask(lab.resolver, "mx.bogus.signed.test", "A", cd=True)
    assert unchecked.rcode() == dns.rcode.NOERROR and not unchecked.flags & dns.flags.AD
    assert ask(lab.authoritative, "mx.bogus.signed.test", "A").answer


def test_set_records_changes_the_answer_at_once_and_it_stays_secure(lab):
    assert values(resolve(lab, "changing.signed.test", "A")) == ["127.0.0.1"]  # now in unbound's cache
    lab.set_records("changing.signed.test", "A", ["127.0.0.2", "127.0.0.3"])
    answer = resolve(lab, "changing.signed.test", "A")
    assert values(answer) == ["127.0.0.2", "127.0.0.3"] and answer.response.flags & dns.flags.AD
    lab.set_records("changing.signed.test", "A", ["127.0.0.2"], bogus=True)
    assert ask(lab.resolver, "changing.signed.test", "A").rcode() == dns.rcode.SERVFAIL
    lab.set_records("changing.signed.test", "A", ["127.0.0.4"], bogus=False)
    answer = resolve(lab, "changing.signed.test", "A")
    assert values(answer) == ["127.0.0.4"] and answer.response.flags & dns.flags.AD
    with pytest.raises(dns.resolver.NoAnswer):
        resolve(lab, "changing.signed.test", "TLSA")
    lab.set_records("changing.signed.test", "TLSA", [TLSA])  # a new RRset: the cached "no data" is gone
    assert values(resolve(lab, "changing.signed.test", "TLSA")) == [TLSA]


def test_names_outside_the_lab_are_refused_not_looked_up(lab):
    for name in ("example.com", "com", "."):
        assert ask(lab.resolver, name, "NS").rcode() == dns.rcode.REFUSED


def test_ttl_gives_answers_and_denials_a_production_lifetime(tmp_path):
    """make bench's lab: a relay caching for the answers' TTL asks once an hour, not every 5 s
    (the tests' default) nor on every message in a 1 s denial's last fraction of a second."""
    with DnssecLab(tmp_path, zones={"signed.test": Zone(records={"mx.signed.test": {"A": ["127.0.0.1"]}})},
                   ttl=3600) as lab:
        answer = resolve(lab, "mx.signed.test", "A")
        assert answer.rrset.ttl > 3500 and answer.response.flags & dns.flags.AD
        denial = ask(lab.resolver, "mx.signed.test", "AAAA")
        assert denial.rcode() == dns.rcode.NOERROR and not denial.answer
        assert min(rrset.ttl for rrset in denial.authority) > 3500
