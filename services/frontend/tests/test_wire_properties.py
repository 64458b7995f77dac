"""Property-based tests of what the frontend accepts from the wire, without any I/O: message
content fed in arbitrary splits, as it comes off a socket."""

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from submitd_frontend import wire
from submitd_frontend.wire import parse_params

keys = st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", min_size=1, max_size=8)
values = st.text("abcdefghij0123456789+-.,_", min_size=1, max_size=12)


@given(st.dictionaries(keys, st.one_of(st.just(""), values), max_size=5))
def test_parameters_round_trip(params):
    text = " ".join(f"{k}={v}" if v else k for k, v in params.items())
    assert parse_params(text) == {k.upper(): v for k, v in params.items()}


def splits(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)]) if b > a]


def clean(data: bytes) -> bool:
    """Strictly CRLF text, no NUL, every line within RFC 5321's limit."""
    rest = data.replace(b"\r\n", b"")
    return (
        b"\r" not in rest and b"\n" not in rest and b"\x00" not in data
        and (not data or data.endswith(b"\r\n"))
        and all(len(line) <= wire.LINE_LIMIT - 2 for line in data.split(b"\r\n"))
    )


def feed_chunks(data: bytes, cuts: list[int], limit: int | None = None) -> tuple[bytes, str | None]:
    reader = wire.ChunkReader(limit)
    out = b"".join(reader.feed(piece) for piece in splits(data, cuts))
    reader.finish()
    return out, reader.problem


# Messages built with a known defect (or none), so the expected reply comes from how the
# input was made, not from re-reading it: each kind, the long line included, is drawn about a
# quarter of the time.
GOOD_LINE = st.binary(max_size=998).map(lambda b: re.sub(rb"[\r\n\x00]", b"x", b)) | st.sampled_from(
    [b"", b".", b"x" * 998]
)
DEFECTS = {
    wire.NUL: [b"a\x00b", b"\x00"],
    wire.BARE_CR_LF: [b"a\rb", b"a\nb", b"\r", b"\n", b"a\r"],
    wire.LINE_TOO_LONG: [b"z" * 999, b"z" * 4000, b"." + b"z" * 998],
}


@st.composite
def message_with_one_kind_of_defect(draw):
    kind = draw(st.sampled_from([None, *DEFECTS]))
    lines = draw(st.lists(GOOD_LINE, max_size=8))
    if kind is not None:
        for bad in draw(st.lists(st.sampled_from(DEFECTS[kind]), min_size=1, max_size=3)):
            lines.insert(draw(st.integers(0, len(lines))), bad)
    return b"".join(line + b"\r\n" for line in lines), kind


@given(message_with_one_kind_of_defect(), st.lists(st.integers(0, 9000), max_size=6))
def test_bdat_content_gets_the_reply_for_its_defect_whatever_the_splits(made, cuts):
    data, kind = made
    out, problem = feed_chunks(data, cuts)
    assert problem == kind, (data[:80], problem)
    if kind is None:
        assert out == data, "clean content passes unchanged"


@given(st.binary(max_size=3000), st.lists(st.integers(0, 4000), max_size=6))
def test_any_bytes_are_either_passed_unchanged_or_refused(data, cuts):
    out, problem = feed_chunks(data, cuts)
    assert problem is not None or out == data
    assert problem is None or problem.split()[0] in ("500", "554", "552")


@given(st.lists(st.binary(max_size=200).map(lambda b: re.sub(rb"[\r\n\x00]", b"", b)), max_size=30),
       st.lists(st.integers(0, 7000), max_size=6))
def test_crlf_joined_lines_pass(lines, cuts):
    data = b"".join(line + b"\r\n" for line in lines)
    assert feed_chunks(data, cuts) == (data, None)


def test_size_limit_counts_content():
    data = b"x" * 98 + b"\r\n"
    assert feed_chunks(data * 10, [], limit=1000) == (data * 10, None)
    assert feed_chunks(data * 11, [], limit=1000)[1] == wire.TOO_BIG


def stuff(message: bytes) -> bytes:
    """What a client sends for ``message`` (clean CRLF text) in DATA."""
    return re.sub(rb"(?m)^\.", b"..", message)


def feed_data(wire_bytes: bytes, cuts: list[int], limit: int | None = None):
    reader = wire.DataReader(limit)
    out, rest = [], None
    for piece in splits(wire_bytes, cuts):
        if rest is not None:  # the session reads commands again from here
            rest += piece
            continue
        got, rest = reader.feed(piece)
        out.append(got)
    return b"".join(out), rest, reader.problem


messages = st.lists(
    st.sampled_from([b"", b".", b"..", b".x", b"a.", b"hello world", b"x" * 500, b"From: a@b.example"]), max_size=10
).map(lambda lines: b"".join(line + b"\r\n" for line in lines))


@given(messages, st.binary(max_size=40), st.lists(st.integers(0, 8000), max_size=6))
def test_data_is_unstuffed_and_ends_at_the_marker_whatever_the_splits(message, after, cuts):
    out, rest, problem = feed_data(stuff(message) + b".\r\n" + after, cuts)
    assert problem is None
    assert out == message
    assert rest is not None and rest.endswith(after) and len(rest) >= len(after)


def strict_end(data: bytes) -> int | None:
    """Where an RFC 5321 reader finds the end of data: the first line (CRLF-terminated) that is
    a lone dot. Returns the offset just past its CRLF, or None."""
    if data.startswith(b".\r\n"):
        return 3
    i = data.find(b"\r\n.\r\n")
    return None if i < 0 else i + 5


def lenient_ends(data: bytes) -> list[int]:
    """Where readers that take a bare CR or LF as a line end, or drop NULs, would see an end."""
    ends = []
    squeezed = data.replace(b"\x00", b"")
    for pattern in (rb"(?:^|\r\n|\n|\r)\.(?:\r\n|\n|\r)",):
        for text in (data, squeezed):
            ends += [m.end() for m in re.finditer(pattern, text)]
    return ends


ODD = st.lists(st.sampled_from([b"\r", b"\n", b"\x00", b".", b" ", b"a"]), max_size=7).map(b"".join)


@settings(max_examples=600)
@given(ODD, ODD, st.lists(st.integers(0, 40), max_size=4))
def test_no_message_that_another_reader_would_split_is_ever_accepted(before, after, cuts):
    # Short runs of CR, LF, NUL, "." and space around an end-of-data marker: submitd either
    # refuses the message, or passes on exactly the octets a strict RFC 5321 reader sees, with
    # nothing in them that a lenient reader would take for an end.
    stream = b"Subject: x\r\n" + before + b"\r\n.\r\n" + after + b"\r\n.\r\n"
    out, rest, problem = feed_data(stream, cuts)
    end = strict_end(stream)
    assert rest == stream[end:], "the message ends where a strict reader ends it"
    if b"\x00" in stream[:end]:
        assert problem is not None, "a NUL in the message is never passed on"
    if problem is None:
        body = stream[: end - 3]
        assert out == re.sub(rb"(?m)(?<=\r\n)\.|^\.", b"", body)
        assert clean(out)
        assert not lenient_ends(stuff(out)), "a lenient next hop would split what was relayed"
    else:
        # What was passed on before the problem showed is abandoned by the session.
        assert problem.split()[0] in ("554", "500")


def test_nul_and_bare_line_ends_are_refused_and_read_to_the_end():
    for bad in (b"\x00", b"a\rb", b"a\nb"):
        out, rest, problem = feed_data(b"Subject: x\r\n\r\n" + bad + b"\r\n.\r\nQUIT\r\n", [5, 17])
        assert rest == b"QUIT\r\n"
        assert bad not in out, "nothing from the bad line is passed on"
        assert problem == (wire.NUL if bad == b"\x00" else wire.BARE_CR_LF)


def test_a_line_too_long_is_refused_and_the_end_still_found():
    data = b"Subject: x\r\n\r\n" + b"z" * 5000 + b"\r\nmore\r\n.\r\nNOOP\r\n"
    for cuts in ([], [100, 2000, 4000], list(range(0, 5100, 7))):
        out, rest, problem = feed_data(data, cuts)
        assert (rest, problem) == (b"NOOP\r\n", wire.LINE_TOO_LONG)
        assert b"zzz" not in out and b"more" not in out
    ok = b"z" * 998 + b"\r\n" + b"." + b"z" * 998 + b"\r\n.\r\n"  # 999 with its stuffed dot: allowed
    assert feed_data(ok, [500, 1500])[2] is None


def test_the_size_limit_refuses_and_reads_on():
    data = (b"y" * 70 + b"\r\n") * 100 + b".\r\n"
    out, rest, problem = feed_data(data, [1000, 3000], limit=5000)
    assert (rest, problem) == (b"", wire.TOO_BIG)
    assert len(out) <= 5000, "nothing past the limit is passed on"
