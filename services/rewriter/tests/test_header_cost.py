"""What a hostile header section costs the rewriter: its CPU is the event loop every message of
that replica waits on. A header of 1 MiB (MAX_HEADER_BYTES) costs tens of milliseconds however
it is shaped; more fields than MAX_HEADER_FIELDS are refused 552 5.3.4 before they cost more."""

from __future__ import annotations

import re
import time

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from submitd.v1 import common_pb2, rewriter_pb2
from submitd_common import received
from submitd_common.files import WatchedFile
from submitd_common.users import UserDB
from submitd_rewriter import dkim
from submitd_rewriter.headers import parse_fields
from submitd_rewriter.service import RewriterService
from submitd_rewriter.settings import Settings

ALICE = "alice@example.test"
# Bounds the quadratic parse blew many times over (4 s a parse, twice a message, on the machine
# this was written on; a From folded before its address took minutes), with room for a slow
# shared core: 20-40 ms here now. An address field costs more, linearly: email.utils parses
# it in Python (~70 ms for 1 MiB of white space), and a From twice (checks, then DKIM).
CPU_BOUND = 0.5
ADDRESS_FIELD_CPU_BOUND = 1.0
FOLDS = (1 << 20) // 3 - 100  # " \r\n" continuation lines: as many as fit in 1 MiB


@pytest.fixture(scope="module")
def service(tmp_path_factory) -> RewriterService:
    """The rewriter as deployed: a users file for the From check, an Ed25519 key that signs."""
    root = tmp_path_factory.mktemp("rewriter")
    (root / "users.yaml").write_text(yaml.safe_dump({"users": {ALICE: {"password": "x"}}}))
    (root / "s.pem").write_bytes(dkim.private_pem(dkim.generate_key("ed25519")))
    (root / "keys.yaml").write_text(
        yaml.safe_dump({"keys": [{"domain": "example.test", "selector": "s", "key_file": "s.pem"}]}))
    return RewriterService(
        Settings(message_id_domain="mx.example.test"),
        users=WatchedFile(str(root / "users.yaml"), UserDB.load),
        keys=WatchedFile(str(root / "keys.yaml"), dkim.load_keys),
    )


def rewrite(service: RewriterService, message: bytes) -> tuple[rewriter_pb2.WholeResult, float]:
    envelope = common_pb2.Envelope(helo="client.example", authenticated_user=ALICE, return_path=ALICE,
                                   recipients=[common_pb2.Recipient(address="bob@example.net")])
    start = time.process_time()
    result = service.rewrite_whole(rewriter_pb2.WholeMessage(envelope=envelope, message=message))
    return result, time.process_time() - start


FOLDED = {  # one field of continuation lines, in a field that is signed or whose addresses are parsed
    "subject": (b"From: " + ALICE.encode() + b"\r\nSubject: x\r\n" + b" \r\n" * FOLDS, CPU_BOUND),
    "from-before-its-address": (b"From:" + b" \r\n" * FOLDS + b" " + ALICE.encode() + b"\r\n",
                                ADDRESS_FIELD_CPU_BOUND),
    "to-after-its-address": (b"From: " + ALICE.encode() + b"\r\nTo: bob@example.net\r\n" + b" \r\n" * FOLDS,
                             ADDRESS_FIELD_CPU_BOUND),
}


@pytest.mark.parametrize("header,bound", FOLDED.values(), ids=FOLDED.keys())
def test_a_1mib_field_of_continuation_lines_is_rewritten_in_little_cpu(service, header, bound):
    assert len(header) <= 1 << 20
    result, cpu = rewrite(service, header + b"\r\nbody\r\n")
    assert result.WhichOneof("result") == "accepted", result.reject.text
    out = result.accepted.message
    assert out.startswith(b"DKIM-Signature: "), "signed like any message"
    assert header in out and out.endswith(b"\r\n\r\nbody\r\n"), "the field leaves as it came"
    assert cpu < bound, f"{cpu:.2f} s of CPU for one 1 MiB header"


def test_more_header_fields_than_the_limit_are_refused_552_534_at_once(service):
    head = b"From: " + ALICE.encode() + b"\r\n"
    result, _ = rewrite(service, head + b"X-N: 1\r\n" * 999 + b"\r\nbody\r\n")
    assert result.WhichOneof("result") == "accepted", "1,000 fields (MAX_HEADER_FIELDS) pass"
    result, _ = rewrite(service, head + b"X-N: 1\r\n" * 1000 + b"\r\nbody\r\n")
    assert (result.reject.code, result.reject.enhanced) == (552, "5.3.4")
    assert result.reject.text == "Too many header fields (more than 1000)"
    # 1 MiB of one-line fields: the count stops the parse at the 1,001st.
    result, cpu = rewrite(service, head + b"X:\r\n" * ((1 << 20) // 4 - 10) + b"\r\nbody\r\n")
    assert result.reject.code == 552 and cpu < CPU_BOUND


def test_the_field_limit_is_a_setting():
    service = RewriterService(Settings(message_id_domain="mx.example.test", max_header_fields=3))
    for fields, outcome in ((3, "accepted"), (4, "reject")):
        message = b"".join(b"X-%d: y\r\n" % i for i in range(fields)) + b"\r\nbody\r\n"
        result = service.rewrite_whole(rewriter_pb2.WholeMessage(envelope=common_pb2.Envelope(), message=message))
        assert result.WhichOneof("result") == outcome


def by_lines(header: bytes) -> list[tuple[bytes, bytes]]:
    """The fields as a line-by-line reading finds them (the reading the parser replaced)."""
    fields: list[tuple[bytes, list[bytes]]] = []
    for line in header.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1][1].append(line)
            continue
        m = re.match(rb"([!-9;-~]+)[ \t]*:", line)
        fields.append((m.group(1) if m else b"", [line]))
    return [(name, b"".join(lines)) for name, lines in fields]


def trace_lines(header: bytes) -> int:
    names = (re.match(rb"([!-9;-~]+)[ \t]*:", line) for line in header.split(b"\n"))
    return sum(1 for m in names if m and m.group(1).lower().decode() in received.TRACE_FIELDS)


pieces = st.sampled_from([b"\r\n", b"\r", b"\n", b" ", b"\t", b":", b"X-A", b"received", b"Delivered-To",
                          b"v", b"\xc3\xa9", b"\x00"])


@settings(max_examples=500)
@given(st.lists(pieces, max_size=30).map(b"".join))
def test_fields_and_hops_are_what_a_line_by_line_reading_finds(header):
    assert [(f.name, f.raw) for f in parse_fields(header)] == by_lines(header)
    assert received.hops(header) == trace_lines(header)


class NoMetadata:
    """What the service reads of a gRPC call's context: no caller's trace here."""

    def invocation_metadata(self):
        return ()


async def streamed(service: RewriterService, message: bytes, chunk: int) -> list:
    async def requests():
        yield rewriter_pb2.RewriteRequest(envelope=common_pb2.Envelope())
        for i in range(0, len(message), chunk):
            yield rewriter_pb2.RewriteRequest(chunk=message[i : i + chunk])

    return [r async for r in service.Rewrite(requests(), NoMetadata())]


@pytest.mark.parametrize("chunk", [1, 700, 1 << 16])
async def test_max_header_bytes_holds_however_the_stream_is_cut(chunk):
    service = RewriterService(Settings(message_id_domain="mx.example.test", max_header_bytes=1000))
    for size, refused in ((1000, False), (1001, True)):
        header = b"Subject: " + b"s" * (size - 15) + b"\r\n" + b"X:\r\n"
        assert len(header) == size
        message = header + b"\r\n" + b"body\r\n" * 50
        whole = service.rewrite_whole(rewriter_pb2.WholeMessage(envelope=common_pb2.Envelope(), message=message))
        replies = await streamed(service, message, chunk)
        if refused:
            assert whole.reject.text == "Message header section too large"
            assert [r.reject for r in replies] == [whole.reject], "as RewriteWhole says"
        else:
            assert whole.WhichOneof("result") == "accepted"
            assert b"".join(r.chunk for r in replies).endswith(message[size:]), "the body passes"
