"""For any message the rewriter accepts, the body leaves byte for byte as it came."""

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from submitd.v1 import common_pb2
from submitd_rewriter.headers import split_header
from submitd_rewriter.message import Options, rewrite_header

names = st.sampled_from([b"Subject", b"To", b"From", b"X-Thing", b"Received", b"Comments"])
values = st.binary(max_size=60).map(lambda b: re.sub(rb"[\r\n]", b"", b))
fields = st.lists(st.tuples(names, values, st.booleans()), max_size=8)
lines = st.lists(st.binary(max_size=100).map(lambda b: re.sub(rb"[\r\n]", b"", b)), max_size=20)


@settings(max_examples=300)
@given(fields, lines)
def test_body_bytes_out_equal_body_bytes_in(header_fields, body_lines):
    header = b"".join(
        n + b": " + v + b"\r\n" + (b"\t folded " + v + b"\r\n" if fold else b"") for n, v, fold in header_fields
    )
    body = b"".join(line + b"\r\n" for line in body_lines)
    message = header + b"\r\n" + body
    head, rest = split_header(message)
    result = rewrite_header(head, common_pb2.Envelope(), None, Options(domain="example.net", check_addresses=False))
    out = result.header + rest
    assert out.endswith(b"\r\n\r\n" + body) or (not header and out.endswith(b"\r\n" + body))
    assert out.startswith(header), "existing fields are untouched and stay first"
