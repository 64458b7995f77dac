"""Property-based tests of what the frontend accepts from the wire, without any I/O."""

import re

from hypothesis import given
from hypothesis import strategies as st

from submitd_frontend.smtp import LINE_LIMIT, message_problem, parse_params

keys = st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", min_size=1, max_size=8)
values = st.text("abcdefghij0123456789+-.,_", min_size=1, max_size=12)


@given(st.dictionaries(keys, st.one_of(st.just(""), values), max_size=5))
def test_parameters_round_trip(params):
    text = " ".join(f"{k}={v}" if v else k for k, v in params.items())
    assert parse_params(text) == {k.upper(): v for k, v in params.items()}


@given(st.binary(max_size=3000))
def test_message_check_accepts_exactly_clean_crlf_text(data):
    problem = message_problem(data)
    lines_ok = all(len(line) + 2 <= LINE_LIMIT for line in data.split(b"\r\n"))
    clean = (
        b"\r" not in data.replace(b"\r\n", b"")
        and b"\n" not in data.replace(b"\r\n", b"")
        and (not data or data.endswith(b"\r\n"))
        and lines_ok
    )
    assert (problem is None) == clean, (data[:80], problem)


@given(st.lists(st.binary(max_size=200).map(lambda b: re.sub(rb"[\r\n]", b"", b)), max_size=30))
def test_crlf_joined_lines_pass(lines):
    assert message_problem(b"".join(line + b"\r\n" for line in lines)) is None
