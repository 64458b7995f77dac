"""DANE matching (RFC 7672 §3): which chains a set of TLSA records accepts."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization

from submitd_relay.outbound.dane import DaneMismatch, Tlsa, verify
from tls_peers import MxCA


def record(text: str) -> Tlsa:
    u, s, m, data = text.split()
    return Tlsa(int(u), int(s), int(m), bytes.fromhex(data))


def der(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("dane")
    ca, other = MxCA(directory / "a"), MxCA(directory / "b", "another CA")
    return ca, other, ca.issue("mx.signed.test"), ca.issue("mx.signed.test", expired=True), other.issue("mx.signed.test")


@pytest.mark.parametrize("selector,mtype", [(1, 1), (0, 1), (1, 2), (0, 0)])
def test_dane_ee_matches_the_server_certificate_whatever_its_name_and_dates(pki, selector, mtype):
    _, _, good, expired, _ = pki
    for issued in (good, expired):  # DANE-EE: no name or date checks (RFC 7672 §3.1.1)
        chain = [der(issued.cert)]
        assert verify(chain, [record(issued.tlsa(3, selector, mtype))], ["elsewhere.test"]).startswith("DANE-EE")


def test_dane_ee_for_another_key_is_a_mismatch(pki):
    _, _, good, _, stranger = pki
    with pytest.raises(DaneMismatch, match="matches no TLSA record"):
        verify([der(stranger.cert)], [record(good.tlsa(3, 1, 1))], ["mx.signed.test"])


def test_dane_ta_needs_the_chain_the_name_and_the_dates(pki):
    ca, other, good, expired, stranger = pki
    ta = [record(good.tlsa(2, 0, 1, of=ca.cert))]
    chain = [der(good.cert), der(ca.cert)]
    assert verify(chain, ta, ["mx.signed.test", "signed.test"]) == "DANE-TA 0 1"
    with pytest.raises(DaneMismatch, match="does not name"):
        verify(chain, ta, ["mx.other.test"])
    with pytest.raises(DaneMismatch, match="expired"):
        verify([der(expired.cert), der(ca.cert)], ta, ["mx.signed.test"])
    # A chain that claims the trust anchor but whose certificate another CA signed:
    with pytest.raises(DaneMismatch, match="does not verify"):
        verify([der(stranger.cert), der(ca.cert)], ta, ["mx.signed.test"])
    with pytest.raises(DaneMismatch):  # the TA not sent at all
        verify([der(good.cert)], ta, ["mx.signed.test"])


def test_pkix_usages_are_unusable_for_smtp(pki):
    _, _, good, _, _ = pki
    for usage in (0, 1):  # RFC 7672 §3.1.3
        with pytest.raises(DaneMismatch):
            verify([der(good.cert)], [record(good.tlsa(usage, 1, 1))], ["mx.signed.test"])
