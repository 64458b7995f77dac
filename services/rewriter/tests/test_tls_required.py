"""RFC 8689: a message whose header says "TLS-Required: No" is queued with TLS optional
(envelope.tls_optional), unless MAIL FROM asked for REQUIRETLS; the field itself is kept."""

import pytest

from submitd.v1 import common_pb2, rewriter_pb2
from submitd_rewriter.message import Options, rewrite_header
from submitd_rewriter.service import RewriterService
from submitd_rewriter.settings import Settings

BASE = b"From: alice@example.net\r\nTo: bob@example.org\r\nSubject: hi\r\n"


@pytest.mark.parametrize("fields, optional", [
    (b"TLS-Required: No\r\n", True),
    (b"tls-required:no\r\n", True),
    (b"TLS-REQUIRED:   NO  \r\n", True),
    (b"TLS-Required:\r\n No\r\n", True),  # folded
    (b"", False),
    (b"TLS-Required: Yes\r\n", False),
    (b"TLS-Required: No, please\r\n", False),
    (b"TLS-Required: N\xc3\xb6\r\n", False),
    (b"TLS-Required: No\r\nTLS-Required: Yes\r\n", False),
    (b"X-TLS-Required: No\r\n", False),
])
def test_only_a_plain_no_makes_tls_optional(fields, optional):
    envelope = common_pb2.Envelope(authenticated_user="alice@example.net")
    result = rewrite_header(BASE + fields, envelope, None, Options(domain="mx.example.net"))
    assert envelope.tls_optional is optional
    assert fields in result.header, "the field is kept as it came"


def test_requiretls_wins_over_the_header_which_stays():
    envelope = common_pb2.Envelope(require_tls=True, tls_optional=True)
    result = rewrite_header(BASE + b"TLS-Required: No\r\n", envelope, None, Options(domain="mx.example.net"))
    assert (envelope.require_tls, envelope.tls_optional) == (True, False)
    assert b"TLS-Required: No\r\n" in result.header


def test_the_envelope_the_service_returns_carries_both_flags():
    service = RewriterService(Settings(message_id_domain="mx.example.net"))
    for given, header, expected in [
        (common_pb2.Envelope(queue_id="q1"), b"TLS-Required: no\r\n", (False, True)),
        (common_pb2.Envelope(queue_id="q2", require_tls=True), b"TLS-Required: No\r\n", (True, False)),
        (common_pb2.Envelope(queue_id="q3", require_tls=True), b"", (True, False)),
    ]:
        result = service.rewrite_whole(rewriter_pb2.WholeMessage(envelope=given, message=BASE + header + b"\r\nbody\r\n"))
        out = result.accepted.envelope
        assert (out.queue_id, out.require_tls, out.tls_optional) == (given.queue_id, *expected)
        assert header in result.accepted.message
