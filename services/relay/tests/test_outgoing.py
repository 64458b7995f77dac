"""What the relay writes to a next hop: the line check (in memory, every cut of the input), and
reports built from every value a client controls never carrying a line break of their own."""

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from submitd.v1 import common_pb2
from submitd_relay import dsn
from submitd_relay.outgoing import MAX_LINE, LineCheck, Unsendable, check_envelope


def acceptable(data: bytes) -> bool:
    """The rule, stated on the whole message (the oracle the streaming check must agree with)."""
    if b"\0" in data or re.search(rb"\r(?!\n)|(?<!\r)\n", data):
        return False
    return all(len(line) <= MAX_LINE for line in data.split(b"\r\n"))


def streamed(data: bytes, cuts: list[int]) -> bool:
    check = LineCheck()
    try:
        last = 0
        for cut in sorted(cuts) + [len(data)]:
            check.feed(data[last:cut])
            last = cut
        check.finish()
    except Unsendable:
        return False
    return True


CASES = [
    (b"a\r\nb\r\n", True),
    (b"", True),
    (b"a\nb\r\n", False),  # bare LF
    (b"a\rb\r\n", False),  # bare CR
    (b"a\r\r\n", False),
    (b"x\r\n.\n", False),  # the smuggling end marker
    (b"a\0b\r\n", False),
    (b"x" * MAX_LINE + b"\r\n", True),
    (b"x" * (MAX_LINE + 1) + b"\r\n", False),
    (b"x" * (MAX_LINE + 1), False),  # a last line without CRLF counts too
    (b"ends with CR\r", False),
]


@pytest.mark.parametrize("data,ok", CASES)
def test_every_cut_of_a_case_gives_the_same_answer(data, ok):
    assert acceptable(data) is ok
    for cut in range(len(data) + 1):
        assert streamed(data, [cut]) is ok, cut
    for a in range(0, len(data) + 1, max(1, len(data) // 40)):
        for b in range(a, len(data) + 1, max(1, len(data) // 40)):
            assert streamed(data, [a, b]) is ok, (a, b)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from([b"a", b"\r", b"\n", b"\r\n", b"\0", b".", b"x" * 400]), max_size=12),
       st.lists(st.integers(0, 5000), max_size=4))
def test_streaming_check_agrees_with_the_rule_on_the_whole(parts, cuts):
    data = b"".join(parts)
    assert streamed(data, [c for c in cuts if c <= len(data)]) is acceptable(data)


def test_envelope_with_a_control_character_is_unsendable():
    check_envelope(common_pb2.Envelope(return_path="a@example.net", dsn_envid="x+2Ey",
                                       recipients=[common_pb2.Recipient(address="b@example.net", orcpt="rfc822;b@example.net")]))
    for bad in (dict(return_path="a@example.net\r\nRCPT TO:<x@y>"), dict(dsn_envid="x\n.\n")):
        with pytest.raises(Unsendable):
            check_envelope(common_pb2.Envelope(**bad))
    with pytest.raises(Unsendable):
        check_envelope(common_pb2.Envelope(recipients=[common_pb2.Recipient(address="b@x", orcpt="rfc822;b\r@x")]))


# Every value of a report that a client (or a next hop) controls, with the characters that matter.
hostile = st.lists(st.sampled_from(list("ab.@+;<> \t\r\n\0\x0b\x7f") + ["+0A", "+0D", "+00", "é", "\u2028"]),
                   max_size=30).map("".join)


@settings(max_examples=300, deadline=None)
@given(envid=hostile, orcpt=hostile, sender=hostile, rcpt=hostile, reply=hostile, note=hostile,
       kind=st.sampled_from(["failed", "delayed", "relayed"]), utf8=st.booleans())
def test_a_report_never_carries_a_line_break_a_client_put_in(envid, orcpt, sender, rcpt, reply, note, kind, utf8):
    envelope = common_pb2.Envelope(queue_id="01M8K68S6JD127APNJY96T", return_path=sender, dsn_envid=envid,
                                   smtputf8=utf8, recipients=[common_pb2.Recipient(address=rcpt, orcpt="rfc822;" + orcpt)])
    statuses = [dsn.RecipientStatus(envelope.recipients[0], kind, "550 5.1.1 " + reply, remote_mta="mx.example.net",
                                    note=note)]
    header = b"From: a@example.net\r\nSubject: s\r\n"
    before, after = dsn.build_parts(kind=kind, envelope=envelope, report_id="01M8K68S6JD127APNJY97T", header=header,
                                    statuses=statuses, reporting_mta="msa.example.net",
                                    from_address="MAILER-DAEMON@msa.example.net", arrival=0, will_retry_until=100)
    whole = before + header + after
    assert acceptable(whole), whole
    assert streamed(whole, [len(before)])
