"""Certificates for local runs and tests (never for production): the frontend's self-signed
one, and a CA issuing each service its own gRPC certificate."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID


def make_self_signed(directory: Path, hostname: str = "localhost", algorithm: str = "ecdsa") -> tuple[Path, Path]:
    """Write cert.pem and key.pem unless they exist: ECDSA P-256 (cheap handshakes) by default,
    or RSA-2048 (``algorithm="rsa"``: rsa-cert.pem, rsa-key.pem)."""
    directory.mkdir(parents=True, exist_ok=True)
    prefix = "" if algorithm == "ecdsa" else f"{algorithm}-"
    cert_path, key_path = directory / f"{prefix}cert.pem", directory / f"{prefix}key.pem"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    key = ec.generate_private_key(ec.SECP256R1()) if algorithm == "ecdsa" else rsa.generate_private_key(65537, 2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(hostname), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


class CertificateAuthority:
    """A CA of its own for the services' gRPC certificates (mutual TLS), kept in ``directory``
    (ca.pem, ca-key.pem), and the certificates it issues: each names one service (commonName)
    and is valid for localhost and 127.0.0.1, for client and server use, as the chart's are."""

    def __init__(self, directory: Path, name: str = "submitd dev gRPC CA") -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.path, key_path = directory / "ca.pem", directory / "ca-key.pem"
        if self.path.exists() and key_path.exists():
            self.cert = x509.load_pem_x509_certificate(self.path.read_bytes())
            self.key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            return
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        _write_key(key_path, self.key)
        self.path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, name: str, dns_names: list[str] | None = None) -> tuple[Path, Path]:
        """``<name>.pem`` and ``<name>-key.pem`` (made once): commonName ``name``, valid for
        ``dns_names`` (default: localhost and 127.0.0.1)."""
        cert_path, key_path = self.directory / f"{name}.pem", self.directory / f"{name}-key.pem"
        if cert_path.exists() and key_path.exists():
            return cert_path, key_path
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=365))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName(n) for n in dns_names] if dns_names
                else [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.ExtendedKeyUsage(
                [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH, x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        _write_key(key_path, key)
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cert_path, key_path

    def credentials(self, name: str) -> dict[str, Path]:
        """A service's GRPC_TLS_CERT, GRPC_TLS_KEY and GRPC_TLS_CA settings (by field name)."""
        cert, key = self.issue(name)
        return {"grpc_tls_cert": cert, "grpc_tls_key": key, "grpc_tls_ca": self.path}


def _write_key(path: Path, key) -> None:
    path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    path.chmod(0o600)
