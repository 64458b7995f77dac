"""MTA-STS (RFC 8461): the TXT record and policy parsers as tables, then the policy cache against
real servers: nats-server (the KV every replica shares), a DNS server and an HTTPS policy host
with a test CA, all on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import dns.asyncresolver
import nats
import pytest

from submitd_devkit.certs import CertificateAuthority
from submitd_devkit.dns import DnsServer
from submitd_devkit.mtasts import UNTRUSTED, WRONG_NAME, PolicyServer
from submitd_devkit.stack import NatsServer
from submitd_relay.outbound import results
from submitd_relay.outbound import stsfetch
from submitd_relay.outbound.stsfetch import PolicyFetcher
from submitd_relay.outbound.mtasts import (
    MAX_AGE_LIMIT, MtaStsSettings, StsPolicies, StsPolicyInvalid, open_bucket, parse_policy, parse_txt,
)
from submitd_relay.streams import sts_policies

POLICY = "version: STSv1\nmode: enforce\nmx: mx.example.net\nmx: *.backup.example\nmax_age: 86400\n"


@pytest.mark.parametrize("text, mode, mx, max_age", [
    (POLICY, "enforce", ("mx.example.net", "*.backup.example"), 86400),
    (POLICY.replace("\n", "\r\n"), "enforce", ("mx.example.net", "*.backup.example"), 86400),
    ("version: STSv1\nmode: testing\nmx: MX.Example.NET\nmax_age: 60", "testing", ("mx.example.net",), 60),
    ("version:STSv1  \nmode:\tnone\nmax_age: 0\n", "none", (), 0),  # mode none needs no mx
    ("version: STSv1\nmode: enforce\nmode: none\nmx: a.example\nfuture_field: x=1; y\nmax_age: 5\n",
     "enforce", ("a.example",), 5),  # unknown fields ignored; of a repeated field the first counts
    ("version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 9999999999\n", "enforce", ("a.example",),
     MAX_AGE_LIMIT),  # longer than a year: kept for a year
])
def test_valid_policies(text, mode, mx, max_age):
    policy = parse_policy(text)
    assert (policy.mode, policy.mx, policy.max_age) == (mode, mx, max_age)


@pytest.mark.parametrize("text", [
    "",
    POLICY.replace("version: STSv1", "version: STSv2"),
    POLICY.replace("version: STSv1", "Version: STSv1"),  # field names are case-sensitive: no version
    POLICY.replace("mode: enforce", "mode: Enforce"),
    POLICY.replace("max_age: 86400\n", ""),
    POLICY.replace("max_age: 86400", "max_age: -1"),
    POLICY.replace("max_age: 86400", "max_age: 12345678901"),
    "version: STSv1\nmode: testing\nmax_age: 86400\n",  # no mx
    POLICY.replace("mx.example.net", "*.*.example.net"),
    POLICY.replace("mx.example.net", "mx..example.net"),
    POLICY.replace("mx.example.net", "*example.net"),
    POLICY.replace("mx.example.net", "mx.example.net."),
    POLICY.replace("\nmode", "\n\nmode"),  # an empty line
    POLICY.replace("mode", " mode"),
    POLICY + "\n",
    POLICY.replace("\n", "\r"),  # bare CR
    POLICY.replace("mode: enforce", "comment: a\tb\nmode: enforce"),  # a control character in a value
    "\ufeff" + POLICY,
])
def test_invalid_policies(text):
    with pytest.raises(StsPolicyInvalid):
        parse_policy(text)


@pytest.mark.parametrize("records, want", [
    (["v=STSv1; id=20160831085700Z;"], "20160831085700Z"),
    (["v=STSv1;id=abc"], "abc"),
    (["v=STSv1 ; id=abc ;  "], "abc"),
    (["v=STSv1; ext=1.0; id=abc; id=def"], "abc"),
    ([b"v=STSv1; id=abc;"], "abc"),
    (["v=spf1 -all", "v=STSv1; id=abc;"], "abc"),  # other records are not counted
    (["v=STSv1; id=abc;", "v=STSv1; id=def;"], None),  # two policies announced: none
    (["v=STSv1"], None),
    (["v=STSv1; ext=1"], None),  # no id
    (["v=STSv1; id=;"], None),
    (["v=STSv1; id=" + "a" * 33], None),
    (["v=STSv1; id=a-b"], None),
    (["V=STSv1; id=abc"], None),
    (["v=STSv2; id=abc"], None),
    (["v=STSv1; id=abc; ext=a b"], None),
    ([], None),
])
def test_txt_records(records, want):
    assert parse_txt(records) == want


@pytest.mark.parametrize("host, want", [
    ("mx.example.net", True), ("MX.Example.NET.", True), ("mx2.example.net", False),
    ("mx.example.net.evil", False), ("a.backup.example", True), ("backup.example", False),
    ("a.b.backup.example", False), (".backup.example", False),
])
def test_mx_patterns(host, want):
    assert parse_policy(POLICY).matches(host) is want


def test_policy_lines_are_tls_rpt_policy_strings():
    assert parse_policy(POLICY.replace("\n", "\r\n")).lines() == (
        "version: STSv1", "mode: enforce", "mx: mx.example.net", "mx: *.backup.example", "max_age: 86400")


# Against real servers. One NATS, DNS and HTTPS server for the module; each test its own domains.

class Settings(MtaStsSettings):
    mx_internal_networks: list[str] = ["127.0.0.0/8"]  # the test's policy host is on loopback
    replicas: int = 1  # (the relay's own setting: how many copies NATS keeps of its streams)


class World:
    def __init__(self, root: Path) -> None:
        self.ca = CertificateAuthority(root / "ca")
        self.https = PolicyServer(self.ca).start()
        self.dns = DnsServer({}).start()
        self.nats = NatsServer(root / "nats").start()

    def publish(self, domain: str, txt_id: str | None, policy: str | None = POLICY, **how) -> None:
        """The domain's TXT record (None: none) and what its policy host serves."""
        self.dns.zone[f"mta-sts.{domain}."] = {"A": ["127.0.0.1"]}
        self.dns.zone.pop(f"_mta-sts.{domain}.", None)
        if txt_id is not None:
            self.dns.zone[f"_mta-sts.{domain}."] = {"TXT": [f'"v=STSv1; id={txt_id};"']}
        self.https.serve(domain, policy, **how)

    def stop(self) -> None:
        self.https.stop()
        self.dns.stop()
        self.nats.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("mtasts"))
    yield w
    w.stop()
    assert not w.nats.violations(), "the relay's NATS grant does not cover the policy cache"


def world_resolver(world: World) -> dns.asyncresolver.Resolver:
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers, resolver.port, resolver.lifetime = ["127.0.0.1"], world.dns.port, 3
    return resolver


@pytest.fixture
async def replica(world: World):
    """``await replica(**settings)``: a relay replica's StsPolicies, as the relay's NATS user."""
    connections, made = [], []

    async def make(clock=None, **settings) -> StsPolicies:
        nc = await nats.connect(world.nats.service_url, user="relay", password=world.nats.passwords["relay"],
                                inbox_prefix="_INBOX_relay")
        connections.append(nc)
        resolver = world_resolver(world)
        s = Settings(mta_sts_ca_file=str(world.ca.path), mta_sts_port=world.https.port, mta_sts_timeout=5,
                     **settings)
        await world.nats.provision(buckets=[sts_policies(s)])  # as the relay's provisioning does
        policies = StsPolicies(s, await open_bucket(nc.jetstream(), sts_policies(s)), resolver, **({"clock": clock} if clock else {}))
        made.append(policies)
        return policies

    yield make
    for policies in made:
        await policies.close()
    for nc in connections:
        await nc.close()


async def test_a_policy_is_fetched_once_and_shared_by_every_replica(world, replica):
    world.publish("shared.example", "1")
    first, second = await replica(), await replica()
    policy, failure = await first.policy("Shared.Example.")
    assert failure is None and (policy.domain, policy.id, policy.mode) == ("shared.example", "1", "enforce")
    assert policy.matches("mx.example.net") and world.https.fetches["shared.example"] == 1
    assert (await second.policy("shared.example"))[0] == policy  # from the KV: no fetch of its own
    assert (await first.policy("shared.example"))[0] == policy  # same TXT id: no fetch
    assert world.https.fetches["shared.example"] == 1

    world.publish("shared.example", "2", POLICY.replace("enforce", "testing"))
    policy, failure = await first.policy("shared.example")
    assert (policy.id, policy.mode, failure) == ("2", "testing", None)
    assert (await second.policy("shared.example"))[0] == policy
    assert world.https.fetches["shared.example"] == 2


async def test_deliveries_at_once_to_a_new_domain_fetch_its_policy_once(world, replica):
    world.publish("busy.example", "1")
    policies = await replica()
    answers = await asyncio.gather(*(policies.policy("busy.example") for _ in range(20)))
    assert {p.id for p, _ in answers} == {"1"} and world.https.fetches["busy.example"] == 1


async def test_a_domain_without_a_txt_record_has_no_policy_and_its_host_is_not_asked(world, replica):
    world.publish("plain.example", None)
    assert await (await replica()).policy("plain.example") == (None, None)
    assert world.https.fetches["plain.example"] == 0


async def test_a_cached_policy_applies_while_its_host_is_down_or_the_txt_record_gone(world, replica):
    world.publish("down.example", "1")
    policies = await replica()
    cached, _ = await policies.policy("down.example")
    world.https.stop()
    try:
        world.publish("down.example", "2")
        assert await policies.policy("down.example") == (cached, results.STS_POLICY_FETCH_ERROR)
        world.publish("down.example", None)  # §5.1: a policy is not withdrawn by removing the record
        assert await policies.policy("down.example") == (cached, None)
        assert await (await replica()).policy("down.example") == (cached, None)  # a replica just started
    finally:
        world.https.start()
    world.publish("down.example", "3", certificate=UNTRUSTED)
    assert await policies.policy("down.example") == (cached, results.STS_WEBPKI_INVALID)


@pytest.mark.parametrize("domain, how, want", [
    ("untrusted-ca.example", dict(certificate=UNTRUSTED), results.STS_WEBPKI_INVALID),
    ("wrong-name.example", dict(certificate=WRONG_NAME), results.STS_WEBPKI_INVALID),
    ("no-mx.example", dict(policy="version: STSv1\nmode: enforce\nmax_age: 86400\n"), results.STS_POLICY_INVALID),
    ("html.example", dict(content_type="text/html"), results.STS_POLICY_INVALID),
    ("not-found.example", dict(policy=None), results.STS_POLICY_FETCH_ERROR),
    ("too-large.example", dict(policy=POLICY + "x: " + "y" * 65536 + "\n"), results.STS_POLICY_FETCH_ERROR),
    ("too-large-chunked.example", dict(policy=POLICY + "x: " + "y" * 65536 + "\n", chunked=True),
     results.STS_POLICY_FETCH_ERROR),
    ("redirect.example", dict(status=301, location="redirect-target.example"), results.STS_POLICY_FETCH_ERROR),
])
async def test_a_policy_that_cannot_be_trusted_is_not_applied(world, replica, domain, how, want):
    if "location" in how:  # to a policy that works
        world.publish(how["location"], "1")
        how = how | {"location": world.https.url(how["location"])}
    world.publish(domain, "1", **how)
    fetched_before = world.https.fetches.copy()
    policies = await replica()
    assert await policies.policy(domain) == (None, want)
    assert await policies.policy(domain) == (None, want)  # not asked again for five minutes (§3.3)
    unverified = how.get("certificate") in (UNTRUSTED, WRONG_NAME)
    assert world.https.fetches[domain] == (0 if unverified else 1)  # TLS ended before any request
    assert world.https.fetches - fetched_before == ({} if unverified else {domain: 1})  # no redirect followed


async def test_a_policy_host_in_the_sites_own_network_is_never_asked(world, replica):
    world.publish("internal.example", "1")
    assert await (await replica(mx_internal_networks=[])).policy("internal.example") == (
        None, results.STS_POLICY_FETCH_ERROR)
    assert world.https.fetches["internal.example"] == 0


def connections_to(port: int) -> int:
    """This process's open TCP sockets connected to ``port`` (from /proc)."""
    ours = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            ours.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass  # (the listing's own descriptor, closed by now)
    with open("/proc/self/net/tcp") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    return sum(1 for row in rows if int(row[2].split(":")[1], 16) == port and f"socket:[{row[9]}]" in ours)


@pytest.mark.parametrize("deaf_after", [0, 2], ids=["goodbye-awaited", "cut"])
async def test_a_closed_fetcher_leaves_no_connection_open(world, monkeypatch, deaf_after):
    """Each fetch's connection is closed after its answer, and a TLS close waits for the host's
    own goodbye: a fetcher closed (the relay stopping) waits for those, then cuts them (a host
    that says no goodbye in time), so no socket outlives it (one left to the garbage collector
    stays open until then)."""
    monkeypatch.setattr(stsfetch, "CLOSE_WAIT", 0.5)
    world.publish("closing.example", "1", deaf_after=deaf_after)
    for round in range(3):
        fetcher = PolicyFetcher(world_resolver(world), lambda address: True, port=world.https.port,
                                ca_file=str(world.ca.path), timeout=5)
        assert "STSv1" in await fetcher.fetch("closing.example")
        await fetcher.close()
        assert connections_to(world.https.port) == 0, f"round {round}"


async def test_a_policy_is_refreshed_daily_and_never_applied_past_its_max_age(world, replica):
    now = [1_000_000.0]
    world.publish("aging.example", "1", POLICY.replace("86400", "172800"))
    policies = await replica(clock=lambda: now[0])
    policy, _ = await policies.policy("aging.example")
    now[0] += 86400 + 1  # a day old, same id: fetched again (§3.3's proactive refresh)
    refreshed, _ = await policies.policy("aging.example")
    assert world.https.fetches["aging.example"] == 2 and refreshed.fetched_at > policy.fetched_at
    world.publish("aging.example", None)
    now[0] += 172800 + 1
    assert await policies.policy("aging.example") == (None, None)
