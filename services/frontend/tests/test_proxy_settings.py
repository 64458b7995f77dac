"""Who may send a PROXY header: the settings that name the balancers, and the check of a peer
against them (no sockets; tests/test_proxy_trust.py drives a real frontend)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from submitd_frontend.settings import Settings
from submitd_frontend.smtp import Balancers


def test_proxy_protocol_without_trusted_networks_is_refused_naming_the_setting():
    with pytest.raises(ValidationError, match="PROXY_TRUSTED_NETWORKS is empty"):
        Settings(proxy_protocol=True)
    assert Settings(proxy_protocol=True, proxy_trusted_networks=["10.0.0.0/8"]).proxy_protocol
    assert Settings().proxy_trusted_networks == [], "nothing needed while PROXY is off"


@pytest.mark.parametrize("value", ['["10.0.0.0/8", "2001:db8::/32"]', "10.0.0.0/8, 2001:db8::/32"])
def test_the_balancers_are_a_json_list_or_comma_separated(monkeypatch, value):
    monkeypatch.setenv("SUBMITD_FRONTEND_PROXY_PROTOCOL", "true")
    monkeypatch.setenv("SUBMITD_FRONTEND_PROXY_TRUSTED_NETWORKS", value)
    assert Settings().proxy_trusted_networks == ["10.0.0.0/8", "2001:db8::/32"]


@pytest.mark.parametrize("network, complaint", [
    ("10.0.0.5/8", "host bits set"),  # a typo that would trust a whole /8: refused, not widened
    ("balancer.example", "does not appear to be"),
])
def test_a_balancer_network_must_be_a_cidr(network, complaint):
    with pytest.raises(ValidationError, match=complaint):
        Settings(proxy_protocol=True, proxy_trusted_networks=[network])


@pytest.mark.parametrize("peer, listed", [
    ("127.0.0.1", True),
    ("127.0.0.2", False),
    ("10.0.7.9", True),
    ("::ffff:10.0.7.9", True),  # an IPv4 peer of a dual-stack listener
    ("::ffff:127.0.0.2", False),
    ("fe80::1%eth0", True),
    ("2001:db8::1", False),
    ("", False),
    ("not an address", False),
])
def test_a_peer_is_a_balancer_only_inside_the_listed_networks(peer, listed):
    assert Balancers(["127.0.0.1/32", "10.0.0.0/16", "fe80::/10"]).listed(peer) is listed
