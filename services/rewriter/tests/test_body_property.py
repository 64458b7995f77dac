"""For any message the rewriter accepts, cut into chunks as the frontend streams it: the body
leaves byte for byte as it came (or, made 7-bit, decodes to exactly what came), and every
signature the rewriter puts in front verifies with an independent verifier (dkimpy)."""

from __future__ import annotations

import asyncio
import quopri
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from submitd.v1 import common_pb2, rewriter_pb2
from submitd_rewriter.service import RewriterService
from submitd_rewriter.settings import Settings

names = st.sampled_from([b"Subject", b"To", b"X-Thing", b"Received", b"Comments"])
# No CR or LF in a value (they would end the field); no VT or FF either: dkimpy strips those at
# a value's end, where RFC 6376 §3.4.2 strips only spaces and tabs (as the rewriter does).
values = st.binary(max_size=60).map(lambda b: re.sub(rb"[\r\n\x0b\x0c]", b"", b))
fields = st.lists(st.tuples(names, values, st.booleans()), max_size=6)
# Body lines as the frontend passes them on: anything but CR and LF (bare ones are refused),
# with the spaces, tabs, empty lines and 8-bit octets canonicalization and conversion care about.
line_parts = st.sampled_from([b"a", b" ", b"\t", b"=", b".", b"\xc3\xa9", b"\xff", b"x" * 40, b"\x00", b"=20"])
body_lines = st.lists(st.one_of(st.lists(line_parts, max_size=8).map(b"".join),
                                st.binary(max_size=90).map(lambda b: re.sub(rb"[\r\n]", b"", b))),
                      max_size=12)


class Context:
    """What a gRPC server hands a servicer: the call's metadata, and abort."""

    def invocation_metadata(self):
        return ()

    async def abort(self, code, details):
        raise AssertionError(f"the rewriter aborted the call: {code} {details}")


def rewrite(service: RewriterService, envelope: common_pb2.Envelope, message: bytes, cuts: list[int]):
    """The message through the streaming Rewrite call in chunks of the sizes in ``cuts`` (in
    turn): the envelope that came back, the signature fields to put in front and the message."""

    async def requests():
        yield rewriter_pb2.RewriteRequest(envelope=envelope)
        i = n = 0
        while i < len(message):
            size = cuts[n % len(cuts)]
            yield rewriter_pb2.RewriteRequest(chunk=message[i:i + size])
            i, n = i + size, n + 1

    async def run():
        return [r async for r in service.Rewrite(requests(), Context())]

    responses = asyncio.run(run())
    parts = [r.WhichOneof("part") for r in responses]
    assert parts[0] == "envelope" and parts[-1] == "prepend" and set(parts[1:-1]) <= {"chunk"}, parts
    return responses[0].envelope, responses[-1].prepend, b"".join(r.chunk for r in responses[1:-1])


@settings(max_examples=150, deadline=None)
@given(fields, body_lines, st.booleans(), st.booleans(), st.lists(st.integers(1, 300), min_size=1, max_size=5))
def test_body_through_the_stream_is_signed_and_kept_or_converted(signing, header_fields, lines, last_crlf,
                                                                 seven_bit, cuts):
    header = b"From: Alice <alice@example.net>\r\n" + b"".join(
        n + b": " + v + b"\r\n" + (b"\t folded " + v + b"\r\n" if fold else b"") for n, v, fold in header_fields
    )
    body = b"".join(line + b"\r\n" for line in lines)
    if lines and not last_crlf:
        body = body[:-2]  # a last line without CRLF
    service = RewriterService(Settings(message_id_domain="mx.example.net", check_header_addresses=False,
                                       seven_bit=seven_bit), keys=signing.keys)
    envelope, signatures, rest = rewrite(service, common_pb2.Envelope(body_type="8BITMIME"),
                                         header + b"\r\n" + body, cuts)

    assert signatures.count(b"DKIM-Signature: ") == len(signing.selectors)
    assert signing.verified(signatures + rest) == signing.selectors, "every key signs, and each verifies"
    assert rest.startswith(header), "the fields that came stay as they were, and first"
    out_header, out_body = rest.split(b"\r\n\r\n", 1)
    if not seven_bit:
        assert out_body == body, "the body leaves byte for byte"
        assert envelope.body_type == "8BITMIME"
        return
    assert envelope.body_type == "7BIT"
    assert b"\r\nContent-Transfer-Encoding: quoted-printable" in out_header + b"\r\n"
    assert out_body.isascii() and max(len(line) for line in out_body.split(b"\r\n")) <= 76
    assert b"\r" not in out_body.replace(b"\r\n", b"") and b"\n" not in out_body.replace(b"\r\n", b"")
    assert quopri.decodestring(out_body.replace(b"\r\n", b"\n")).replace(b"\n", b"\r\n") == body, (
        "the 7-bit body decodes to the body that came")
