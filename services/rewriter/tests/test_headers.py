from submitd.v1 import common_pb2
from submitd_rewriter.headers import parse_fields, split_header
from submitd_rewriter.message import Options, rewrite_header

DOMAIN = "mx.example.net"


def run(message: bytes) -> tuple[bytes, list[str]]:
    header, rest = split_header(message)
    result = rewrite_header(header, common_pb2.Envelope(), None, Options(domain=DOMAIN, check_addresses=False))
    return result.header + rest, result.actions


def test_adds_missing_fields_after_the_existing_ones():
    msg = b"Subject: hi\r\nTo: a@example.net\r\n\r\nbody\r\n"
    out, actions = run(msg)
    assert actions == ["date_added", "message_id_added"]
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"Subject: hi\r\nTo: a@example.net\r\nDate: ")
    assert b"\r\nMessage-ID: <" in head and head.endswith(b"@" + DOMAIN.encode() + b">")
    assert body == b"body\r\n"


def test_present_fields_leave_the_message_untouched():
    msg = b"date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMESSAGE-ID: <x@y>\r\n\r\nbody\r\n"
    out, actions = run(msg)
    assert out == msg and actions == []


def test_folded_and_8bit_headers_are_kept_byte_for_byte():
    header = b"Subject: =?utf-8?q?caf=C3=A9?=\r\n  continued\r\n\tmore\r\nX-Raw: caf\xc3\xa9\r\n"
    out, _ = run(header + b"\r\nbody\r\n")
    assert out.startswith(header)
    fields = parse_fields(header)
    assert [f.key for f in fields] == ["subject", "x-raw"]


def test_message_without_header_section():
    out, actions = run(b"\r\njust a body\r\n")
    assert out.endswith(b"\r\n\r\njust a body\r\n")
    assert out.startswith(b"Date: ")
    assert len(actions) == 2


def test_header_end_not_yet_seen():
    assert split_header(b"Subject: x\r\nTo: y") is None


def test_message_ids_are_unique():
    ids = {run(b"S: x\r\n\r\n")[0].split(b"Message-ID: ")[1].split(b"\r\n")[0] for _ in range(200)}
    assert len(ids) == 200
