"""DANE for SMTP (RFC 7672, RFC 7671): does the certificate chain a next hop presented match one
of its DNSSEC-validated TLSA records?

Only the usages RFC 7672 §3.1 allows for SMTP count: DANE-EE (3) and DANE-TA (2). PKIX-TA (0) and
PKIX-EE (1) records are "unusable"; a TLSA RRset with no usable record makes TLS mandatory but
unauthenticated (§2.2). DANE-EE matches the server's own certificate or key and checks nothing
else: no names, no dates (§3.1.1). DANE-TA matches a certificate the server sent in its chain;
the chain from the server's certificate up to it must verify, the certificate must be within its
dates and name the MX host (or the next-hop domain) (§3.2).
"""

from __future__ import annotations

import hashlib
import ssl
from dataclasses import dataclass
from datetime import datetime, timezone

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

DANE_TA, DANE_EE = 2, 3
USABLE_USAGES = (DANE_TA, DANE_EE)
_HASHES = {1: hashlib.sha256, 2: hashlib.sha512}


@dataclass(frozen=True)
class Tlsa:
    usage: int
    selector: int  # 0: the whole certificate, 1: its SubjectPublicKeyInfo
    mtype: int  # 0: exact, 1: SHA-256, 2: SHA-512
    data: bytes

    @property
    def usable(self) -> bool:
        return self.usage in USABLE_USAGES and self.selector in (0, 1) and self.mtype in (0, 1, 2)

    def text(self) -> str:
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex()}"

    def matches(self, cert: x509.Certificate, der: bytes) -> bool:
        content = der if self.selector == 0 else cert.public_key().public_bytes(
            Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        digest = content if self.mtype == 0 else _HASHES[self.mtype](content).digest()
        return digest == self.data


class DaneMismatch(Exception):
    """The chain matches no usable TLSA record, or a DANE-TA chain fails its checks."""


def peer_chain(ssl_object: ssl.SSLObject) -> list[bytes]:
    """The certificates the server sent, its own first, as DER. Python 3.11 has no public way to
    read the chain of an unverified connection (3.13's ``get_unverified_chain``); the method is
    there on the C object since 3.10."""
    inner = getattr(ssl_object, "_sslobj", None)
    chain = inner.get_unverified_chain() if inner is not None else None
    if chain:
        return [c.public_bytes(ssl._ssl.ENCODING_DER) for c in chain]  # type: ignore[attr-defined]
    leaf = ssl_object.getpeercert(binary_form=True)
    return [leaf] if leaf else []


def verify(chain_der: list[bytes], records: list[Tlsa], names: list[str], now: datetime | None = None) -> str:
    """Returns what matched ("DANE-EE 3 1 1" ...); raises DaneMismatch otherwise."""
    usable = [r for r in records if r.usable]
    if not chain_der:
        raise DaneMismatch("no certificate presented")
    chain = [x509.load_der_x509_certificate(d) for d in chain_der]
    for r in usable:
        if r.usage == DANE_EE and r.matches(chain[0], chain_der[0]):
            return f"DANE-EE {r.selector} {r.mtype}"
    problems: list[str] = []
    for r in usable:
        if r.usage != DANE_TA:
            continue
        for depth, (cert, der) in enumerate(zip(chain, chain_der)):
            if r.matches(cert, der):
                problem = _check_ta_chain(chain[: depth + 1], names, now or datetime.now(timezone.utc))
                if problem is None:
                    return f"DANE-TA {r.selector} {r.mtype}"
                problems.append(problem)
    if problems:
        raise DaneMismatch(problems[0])
    raise DaneMismatch("the certificate matches no TLSA record")


def _check_ta_chain(chain: list[x509.Certificate], names: list[str], now: datetime) -> str | None:
    leaf = chain[0]
    for child, issuer in zip(chain, chain[1:]):
        try:
            child.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, Exception) as e:  # InvalidSignature, unsupported key types
            return f"the chain to the trust anchor does not verify ({type(e).__name__})"
    if not (leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc):
        return "the certificate is expired or not yet valid"
    if not cert_names_match(leaf, names):
        return f"the certificate does not name {names[0] if names else 'the host'}"
    return None


def cert_names_match(cert: x509.Certificate, names: list[str]) -> bool:
    """RFC 6125 as RFC 7672 §3.2.3 uses it: DNS names of the subjectAltName (the subject's CN
    only where there is none); a wildcard stands for exactly one whole leftmost label."""
    try:
        presented = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName)
    except x509.ExtensionNotFound:
        presented = [a.value for a in cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]
    wanted = [n.lower().rstrip(".") for n in names]
    return any(name_matches(str(p), w) for p in presented for w in wanted)


def name_matches(pattern: str, name: str) -> bool:
    pattern = pattern.lower().rstrip(".")
    if pattern.startswith("*."):
        head, _, rest = name.partition(".")
        return bool(head) and rest == pattern[2:]
    return pattern == name
