"""Certificates for next hops in outbound TLS tests: a CA of the test's own, and server
certificates for any names, good, expired or self-signed, with the chain a server sends."""

from __future__ import annotations

import datetime
import hashlib
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

NOW = datetime.datetime.now(datetime.timezone.utc)


@dataclass
class Issued:
    cert: x509.Certificate
    chain_path: Path  # the certificate, then its issuer: what the server sends
    key_path: Path

    def tlsa(self, usage: int = 3, selector: int = 1, mtype: int = 1, of: x509.Certificate | None = None) -> str:
        """The rdata of a TLSA record for this certificate (or ``of``, e.g. its CA)."""
        cert = of or self.cert
        content = cert.public_bytes(serialization.Encoding.DER) if selector == 0 else cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        digest = {0: lambda b: b, 1: lambda b: hashlib.sha256(b).digest(), 2: lambda b: hashlib.sha512(b).digest()}
        return f"{usage} {selector} {mtype} {digest[mtype](content).hex()}"

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.chain_path, self.key_path)
        return ctx


class MxCA:
    def __init__(self, directory: Path, name: str = "submitd test MX CA") -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - datetime.timedelta(days=1)).not_valid_after(NOW + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.path = directory / f"{name.replace(' ', '-')}.pem"
        self.path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, *names: str, expired: bool = False, label: str | None = None) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        start, end = (NOW - datetime.timedelta(days=10), NOW - datetime.timedelta(days=1)) if expired else (
            NOW - datetime.timedelta(minutes=5), NOW + datetime.timedelta(days=30))
        cert = (
            x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self.cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        label = label or names[0] + ("-expired" if expired else "")
        chain_path, key_path = self.directory / f"{label}.chain.pem", self.directory / f"{label}.key.pem"
        chain_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM)
                               + self.cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return Issued(cert, chain_path, key_path)
