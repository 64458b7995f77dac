"""Our streaming DKIM signer, checked by an independent verifier (dkimpy)."""

import dkim as dkimpy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from submitd_rewriter import dkim
from submitd_rewriter.headers import parse_fields, split_header

MESSAGE = (
    b"From: Alice <alice@example.net>\r\n"
    b"To: bob@example.org\r\n"
    b"Subject:   folded\r\n   subject  line \r\n"
    b"Date: Mon, 1 Jan 2024 10:00:00 +0000\r\n"
    b"Message-ID: <x@example.net>\r\n"
    b"\r\n"
    b"Hello  \t world   \r\n"
    b"\r\n"
    b".leading dot\r\n"
    b"caf\xc3\xa9\r\n"
    b"\r\n\r\n"
)


def keyed(algorithm: str):
    key = dkim.Key("example.net", f"sel-{algorithm}", dkim.generate_key(algorithm))

    def dns(name, timeout=5):
        assert name == f"sel-{algorithm}._domainkey.example.net.".encode()
        return dkim.txt_value(key.private_key)

    return key, dns


def signed(message: bytes, key: dkim.Key, chunk: int) -> bytes:
    header, rest = split_header(message)
    hasher = dkim.BodyHash()
    body = rest[2:]
    for i in range(0, len(body), chunk):
        hasher.update(body[i : i + chunk])
    fields = [(f.name, f.raw) for f in parse_fields(header)]
    return dkim.sign(fields, hasher.digest(), key) + message


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
@pytest.mark.parametrize("chunk", [1, 3, 64, 1 << 16])
def test_signature_verifies_whatever_the_chunking(algorithm, chunk):
    key, dns = keyed(algorithm)
    assert dkimpy.verify(signed(MESSAGE, key, chunk), dnsfunc=dns)


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
def test_tampering_breaks_the_signature(algorithm):
    key, dns = keyed(algorithm)
    good = signed(MESSAGE, key, 64)
    assert not dkimpy.verify(good.replace(b"Hello", b"Jello"), dnsfunc=dns)
    assert not dkimpy.verify(good.replace(b"Subject:   folded", b"Subject:   faked"), dnsfunc=dns)
    # From is oversigned: a second From added later breaks it too.
    header_end = good.index(b"\r\n\r\n")
    assert not dkimpy.verify(good[:header_end] + b"\r\nFrom: mallory@evil.example" + good[header_end:], dnsfunc=dns)


def test_signed_header_list_oversigns_from():
    key, _ = keyed("ed25519")
    field = dkim.sign([(b"From", b"From: a@example.net\r\n"), (b"Subject", b"Subject: x\r\n")], b"\0" * 32, key)
    h = field.split(b"h=")[1].split(b";")[0].decode()
    assert h.split(":") == ["from", "from", "subject"]


lines = st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")), max_size=15)


@settings(max_examples=60, deadline=None)
@given(lines, st.integers(1, 50))
def test_body_hash_matches_dkimpy_for_any_body(body_lines, chunk):
    key, dns = keyed("ed25519")
    body = b"".join(line + b"\r\n" for line in body_lines)
    message = b"From: a@example.net\r\nSubject: p\r\n\r\n" + body
    assert dkimpy.verify(signed(message, key, chunk), dnsfunc=dns)


def line_by_line_hash(body: bytes) -> bytes:
    """RFC 6376 §3.4.4 relaxed body canonicalization, one line at a time (the reference)."""
    import hashlib
    import re

    lines = body.split(b"\r\n")
    if lines and lines[-1] == b"":
        lines.pop()
    elif lines:
        pass  # a last line without CRLF gets one
    lines = [re.sub(rb"[ \t]+\Z", b"", re.sub(rb"[ \t]+", b" ", line)) for line in lines]
    while lines and lines[-1] == b"":
        lines.pop()
    return hashlib.sha256(b"".join(line + b"\r\n" for line in lines)).digest()


odd_bodies = st.lists(st.sampled_from([b"a", b" ", b"\t", b"\r\n", b"\r", b"\n", b"  \r\n", b"\r\n\r\n", b"x" * 70]),
                      max_size=40).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(odd_bodies, st.lists(st.integers(1, 200), min_size=1, max_size=8))
def test_block_hashing_equals_line_by_line_for_any_bytes_and_chunking(body, sizes):
    hasher = dkim.BodyHash()
    i = 0
    for n in sizes * (len(body) // max(sum(sizes), 1) + 1):
        hasher.update(body[i : i + n])
        i += n
    hasher.update(body[i:])
    assert hasher.digest() == line_by_line_hash(body)
