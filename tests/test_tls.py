"""TLS as a scanner sees it: sslyze against both submission ports, judged by Mozilla's
"intermediate" profile. The only finding allowed is trust in the test's self-signed certificate."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

SSLYZE = Path(__file__).resolve().parent.parent / ".venv" / "sslyze" / "bin" / "sslyze"


def findings(*target: str) -> set[str]:
    assert SSLYZE.exists(), f"sslyze is not installed at {SSLYZE} (make install puts it there)"
    out = subprocess.run([str(SSLYZE), "--mozilla_config=intermediate", *target],
                         capture_output=True, text=True, timeout=120).stdout
    assert "COMPLIANCE AGAINST TLS CONFIGURATION" in out, out[-2000:]
    verdict = out.split("COMPLIANCE AGAINST TLS CONFIGURATION", 1)[1]
    return set(re.findall(r"^\s+\* (\w+):", verdict, flags=re.MULTILINE))


@pytest.mark.parametrize("port", ["submissions", "submission"])
def test_tls_is_compliant_with_mozillas_intermediate_profile(stack, port):
    if port == "submissions":
        result = findings(f"127.0.0.1:{stack.ports.submissions}")
    else:
        result = findings("--starttls", "smtp", f"127.0.0.1:{stack.ports.submission}")
    assert result <= {"certificate_path_validation"}, f"not compliant beyond the self-signed certificate: {result}"


def handshake(port: int, ctx, session=None):
    """Implicit TLS to ``port``: (certificate key type, resumed, the session for next time)."""
    import socket

    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost", session=session) as s:
            assert s.recv(100).startswith(b"220 ")  # TLS 1.3 tickets arrive before it
            key = x509.load_der_x509_certificate(s.getpeercert(binary_form=True)).public_key()
            kind = "ecdsa" if isinstance(key, ec.EllipticCurvePublicKey) else "rsa" if isinstance(key, rsa.RSAPublicKey) else "?"
            s.sendall(b"QUIT\r\n")
            s.recv(100)
            return kind, s.session_reused, s.session


def test_ecdsa_and_rsa_certificates_side_by_side_and_sessions_resume(make_stack, tmp_path):
    import ssl

    from submitd_devkit.certs import make_self_signed
    from submitd_devkit.testing.smtp import insecure_context as client

    cert, key = make_self_signed(tmp_path / "rsa", "localhost", "rsa")
    stack = make_stack(env={"frontend": {"TLS_SECOND_CERT": str(cert), "TLS_SECOND_KEY": str(key)}})
    port = stack.ports.submissions

    # Each client gets the certificate it can use: TLS 1.2 clients by their suites.
    assert handshake(port, client(ssl.TLSVersion.TLSv1_2, "ECDHE-RSA-AES128-GCM-SHA256"))[0] == "rsa"
    assert handshake(port, client(ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-AES128-GCM-SHA256"))[0] == "ecdsa"
    assert handshake(port, client(ssl.TLSVersion.TLSv1_3))[0] == "ecdsa"
    # A returning client resumes its session (no certificate, no signature) in 1.3 and 1.2.
    for version in (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2):
        ctx = client(version)
        _, resumed, session = handshake(port, ctx)
        assert not resumed
        _, resumed, _ = handshake(port, ctx, session)
        assert resumed, f"{version.name}: the session was not resumed"
