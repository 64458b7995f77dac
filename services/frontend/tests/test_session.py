"""The dialog in memory: the session layer with input split and pipelined as clients send it,
no sockets and no backends. Policy here accepts whatever reaches it (its own rules are tested
against the real policy service in tests/test_policy.py); what is checked is what the
frontend decides alone: line and command syntax, the order of commands, parameters, limits,
message content, and that every reply is the catalogue's."""

from __future__ import annotations

import base64

import pytest

from submitd_devkit.testing.dialog import Memory
from submitd_frontend import replies
from submitd_frontend.session import Session
from submitd_frontend.settings import Settings
from submitd_frontend.state import Phase

SETTINGS = dict(hostname="mx.example.test", max_message_size=10_000, max_recipients=3, max_errors=20,
                junk_command_limit=100, max_session_seconds=3600)


async def dialog(data: bytes, *, split: int | None = None, tls: bool = True, starttls: bool = False,
                 memory: Memory | None = None, **settings) -> tuple[list[str], Memory, Session]:
    """Run a session over ``data`` cut into pieces of ``split`` octets; its replies after the
    greeting, one per entry (a multi-line reply is one entry)."""
    memory = memory or Memory([])
    memory.pieces = _cut(data, split)
    memory.after_tls = [piece for part in memory.after_tls for piece in _cut(part, split)]
    session = Session(Settings(**{**SETTINGS, **settings}), memory, memory, tls=tls, starttls=starttls,
                      client_address="192.0.2.1", session_id="s1")
    await session.run()
    await session.end()
    assert memory.written[0] == replies.greeting("mx.example.test")
    return memory.written[1:], memory, session


def _cut(data: bytes, split: int | None) -> list[bytes]:
    return [data[i:i + split] for i in range(0, len(data), split)] if split else [data]


PLAIN = base64.b64encode(b"\0alice@example.test\0secret").decode()
LOGIN = f"EHLO c.example\r\nAUTH PLAIN {PLAIN}\r\n".encode()
ENVELOPE = b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<bob@example.net>\r\n"
SPLITS = [None, 1, 7]  # whole, a byte at a time, and an odd cut


@pytest.mark.parametrize("split", SPLITS)
async def test_a_pipelined_submission_is_answered_in_order_whatever_the_cuts(split):
    data = LOGIN + ENVELOPE + b"DATA\r\nSubject: x\r\n\r\n..dot\r\nbody\r\n.\r\nNOOP\r\nQUIT\r\n"
    got, memory, _ = await dialog(data, split=split)
    assert got[1:] == [replies.AUTH_OK, replies.SENDER_OK, replies.RECIPIENT_OK, replies.START_DATA,
                       got[5], replies.OK, replies.BYE]
    assert got[5].startswith("250 2.0.0 Ok: queued as ")
    assert memory.queued == [b"Subject: x\r\n\r\n.dot\r\nbody\r\n"], "dot-unstuffed, the end marker not included"
    assert memory.closed


async def test_ehlo_offers_the_rfc_6409_extensions_and_auth_only_under_tls():
    got, _, _ = await dialog(b"EHLO c.example\r\n", tls=False, starttls=True)
    lines = [line[4:] for line in got[0].split("\r\n")]
    assert lines == ["mx.example.test", "PIPELINING", "SIZE 10000", "8BITMIME", "ENHANCEDSTATUSCODES", "DSN",
                     "SMTPUTF8", "CHUNKING", "STARTTLS"]
    got, _, _ = await dialog(b"EHLO c.example\r\n")
    assert got[0].endswith("250 AUTH PLAIN LOGIN") and "STARTTLS" not in got[0] and "ETRN" not in got[0]
    assert "250-REQUIRETLS\r\n" in got[0], "RFC 8689: offered once the session is encrypted"


@pytest.mark.parametrize("split", SPLITS)
async def test_requiretls_is_refused_in_the_clear_and_after_starttls_reaches_the_envelope(split):
    """RFC 8689 §2: the REQUIRETLS MAIL parameter only on a TLS session. In the clear it is
    refused before policy hears of it (530 5.7.10); over TLS the message is queued with
    require_tls, and the next message of the session without the parameter is not."""
    message = b"RCPT TO:<bob@example.net>\r\nDATA\r\nSubject: x\r\n\r\nhi\r\n.\r\n"
    memory = Memory([], after_tls=[LOGIN + b"MAIL FROM:<alice@example.test> REQUIRETLS\r\n" + message
                                   + b"MAIL FROM:<alice@example.test>\r\n" + message])
    got, memory, _ = await dialog(b"EHLO c.example\r\nMAIL FROM:<alice@example.test> requiretls\r\nSTARTTLS\r\n",
                                  split=split, tls=False, starttls=True, memory=memory)
    assert "REQUIRETLS" not in got[0], "not offered in the clear"
    assert got[1:3] == [replies.REQUIRETLS_NEEDS_TLS, replies.TLS_READY]
    assert got[1].startswith("530 5.7.10 ")
    assert "250-REQUIRETLS\r\n" in got[3]
    assert got[4:8] == [replies.AUTH_OK, replies.SENDER_OK, replies.RECIPIENT_OK, replies.START_DATA]
    assert got[8].startswith("250 2.0.0 Ok: queued") and got[12].startswith("250 2.0.0 Ok: queued")
    assert [e.require_tls for e in memory.envelopes] == [True, False]
    assert memory.senders == ["alice@example.test"] * 2, "policy never heard of the MAIL in the clear"


@pytest.mark.parametrize("split", SPLITS)
async def test_starttls_forgets_what_came_before_and_what_was_pipelined_in_the_clear(split):
    data = b"EHLO c.example\r\nSTARTTLS\r\nMAIL FROM:<evil@example.net>\r\n"
    memory = Memory([], after_tls=[b"MAIL FROM:<alice@example.test>\r\nEHLO c.example\r\n"
                                   b"MAIL FROM:<alice@example.test>\r\n"])
    got, memory, session = await dialog(data, split=split, tls=False, starttls=True, memory=memory)
    assert got[1] == replies.TLS_READY, got
    assert got[2:4] == [replies.NEED_HELO, got[3]], "the EHLO before the handshake is forgotten"
    assert got[3].startswith("250-mx.example.test\r\n") and got[3].endswith("250 AUTH PLAIN LOGIN")
    assert got[4:] == [replies.SENDER_OK], "the injected MAIL got no reply and started no transaction"
    assert memory.senders == ["alice@example.test"], "policy never heard of the injected MAIL"
    assert session.state.tls and session.state.phase is Phase.TRANSACTION
    got, _, _ = await dialog(b"STARTTLS\r\n")
    assert got == [replies.TLS_ACTIVE]


@pytest.mark.parametrize("line, reply", [
    (b"NOOP " + b"x" * 600, replies.LINE_TOO_LONG),
    (b"NOOP " + b"x" * 5000, replies.LINE_TOO_LONG),
    (b"NOOP " + b"x" * 20000, replies.LINE_TOO_LONG),
    (b"AUTH PLAIN " + b"x" * 12280, replies.AUTH_LINE_TOO_LONG),
    (b"auth XOAUTH2 " + b"x" * 20000, replies.AUTH_LINE_TOO_LONG),
    (b"MAIL FROM:<alice@example.test>\n", replies.BARE_LINE_END),
    (b"MAIL FROM:<alice@example.test>\rRCPT TO:<x@example.net>", replies.BARE_LINE_END),
    (b"NOOP\x00", replies.BARE_LINE_END),
    (b"MAIL FROM:<\xff@example.test>", replies.NOT_UTF8),
    ("MAIL FROM:<jösé@example.test>".encode(), replies.NEEDS_SMTPUTF8),
    (b"ETRN example.net", replies.UNRECOGNIZED),
    (b"X-1 y", replies.UNRECOGNIZED),
])
@pytest.mark.parametrize("split", [None, 3])
async def test_a_bad_line_is_refused_once_and_the_session_goes_on(line, reply, split):
    end = b"" if line.endswith(b"\n") else b"\r\n"
    got, _, session = await dialog(LOGIN + line + end + b"MAIL FROM:<alice@example.test>\r\n", split=split)
    assert got[2:] == [reply, replies.SENDER_OK], "one reply for the bad line; no transaction started by it"


@pytest.mark.parametrize("command, reply", [
    (b"MAIL", replies.MAIL_SYNTAX),
    (b"MAIL FROM:<alice@example.test> FOO=1", replies.unsupported_parameter("MAIL", "FOO")),
    (b"MAIL FROM:<alice@example.test> SIZE=20000", replies.TOO_BIG),
    (b"MAIL FROM:<alice@example.test> SIZE=x", replies.MAIL_SYNTAX),
    (b"MAIL FROM:<alice@example.test> BODY=BINARYMIME", replies.BAD_BODY),
    (b"MAIL FROM:<alice@example.test> SMTPUTF8=yes", replies.SMTPUTF8_VALUE),
    (b"MAIL FROM:<alice@example.test> RET=ALL", replies.BAD_RET),
    (b"MAIL FROM:<alice@example.test> ENVID=a\x7fb", replies.BAD_ENVID),
    (b"MAIL FROM:<alice@example.test> REQUIRETLS=yes", replies.REQUIRETLS_VALUE),
    (b"MAIL FROM:<alice@example.test> REQUIRETLS=", replies.MAIL_SYNTAX),
    (b"MAIL FROM:<alice@example.test> REQUIRETLS SIZE=10 RequireTLS", replies.repeated_parameter("MAIL", "REQUIRETLS")),
    (b"MAIL FROM:<alice@example.test> SIZE=10 size=20", replies.repeated_parameter("MAIL", "SIZE")),
    (b"MAIL FROM:<alice@example.test", replies.BAD_SENDER),
    (b"RCPT TO:<bob@example.net>", replies.NEED_MAIL),
    (b"DATA", replies.NEED_MAIL),
    (b"BDAT 0 LAST", replies.NEED_MAIL),
])
async def test_what_the_frontend_refuses_before_asking_policy(command, reply):
    got, memory, _ = await dialog(LOGIN + command + b"\r\nQUIT\r\n")
    assert got[2:] == [reply, replies.BYE]
    assert memory.events == ["helo", "auth_start"], "policy heard nothing after the AUTH"
    assert memory.queued == []


async def test_rcpt_checks_and_the_recipient_limit_keeps_earlier_recipients():
    data = LOGIN + b"MAIL FROM:<alice@example.test>\r\n" + b"".join(
        f"RCPT TO:<r{n}@example.net>\r\n".encode() for n in range(4)) + (
        b"RCPT TO:<>\r\nRCPT TO:<x@example.net> NOTIFY=SOMETIMES\r\nRCPT TO:<x@example.net> ORCPT=rfc822\r\n"
        + "RCPT TO:<jösé@example.net>\r\n".encode() + b"RCPT TO:<x@example.net> NOTIFY=NEVER NOTIFY=NEVER\r\n"
        + b"DATA\r\nhi\r\n.\r\n")
    got, memory, _ = await dialog(data)
    assert got[3:7] == [replies.RECIPIENT_OK] * 3 + [replies.TOO_MANY_RECIPIENTS]
    assert got[7:12] == [replies.RCPT_SYNTAX, replies.BAD_NOTIFY, replies.BAD_ORCPT, replies.NEEDS_SMTPUTF8,
                         replies.repeated_parameter("RCPT", "NOTIFY")]
    assert got[-1].startswith("250 2.0.0 Ok: queued")


@pytest.mark.parametrize("smuggle", [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r"])
@pytest.mark.parametrize("split", SPLITS)
async def test_only_crlf_dot_crlf_ends_data_and_a_smuggled_message_is_refused_whole(smuggle, split):
    data = (LOGIN + ENVELOPE + b"DATA\r\nSubject: first\r\n\r\nhello" + smuggle + ENVELOPE
            + b"DATA\r\nSubject: smuggled\r\n\r\nx\r\n.\r\nNOOP\r\n")
    got, memory, _ = await dialog(data, split=split)
    assert got[5:] == [replies.BARE_CR_LF, replies.OK], "nothing of the message read as a command"
    assert memory.queued == []


@pytest.mark.parametrize("content, reply", [
    (b"Subject: long\r\n\r\n" + b"y" * 1200 + b"\r\nafter\r\n", replies.TEXT_LINE_TOO_LONG),
    ((b"b" * 900 + b"\r\n") * 12, replies.TOO_BIG),
    (b"x\x00y\r\n", replies.NUL),
])
async def test_bad_content_is_read_to_its_end_then_refused(content, reply):
    got, memory, _ = await dialog(LOGIN + ENVELOPE + b"DATA\r\n" + content + b".\r\nNOOP\r\n", split=1000)
    assert got[5:] == [reply, replies.OK] and memory.queued == []


@pytest.mark.parametrize("split", SPLITS)
async def test_bdat_chunks_make_one_message_and_pipelined_commands_follow(split):
    data = LOGIN + ENVELOPE + b"BDAT 10\r\nSubject: yBDAT 8 LAST\r\n\r\nbody\r\nNOOP\r\n"
    got, memory, _ = await dialog(data, split=split)
    assert got[4:] == [replies.chunk_received(10), got[5], replies.OK]
    assert got[5].startswith("250 2.0.0 Ok: queued") and memory.queued == [b"Subject: y\r\nbody\r\n"]


async def test_bdat_refused_before_content_still_reads_the_chunk_and_only_some_commands_are_allowed():
    got, memory, _ = await dialog(LOGIN + b"BDAT 15 LAST\r\nMAIL FROM:<x>\r\nMAIL FROM:<alice@example.test>\r\n")
    assert got[2:] == [replies.NEED_MAIL, replies.SENDER_OK], "the chunk's octets were never a command"
    assert memory.queued == []
    got, memory, _ = await dialog(LOGIN + ENVELOPE + b"BDAT 3\r\nx\nyEHLO a.example\r\nBDAT 0 LAST\r\n")
    assert got[4:] == [replies.chunk_received(3), replies.BDAT_ONLY, replies.BARE_CR_LF]
    assert memory.queued == []


async def test_auth_order_syntax_and_a_continuation_line_gets_the_line_checks():
    got, _, _ = await dialog(b"AUTH PLAIN\r\nEHLO c.example\r\nAUTH\r\nAUTH PLAIN !!!\r\n" + ENVELOPE
                             + b"AUTH PLAIN " + PLAIN.encode() + b"\r\n")
    assert [got[0], got[2], got[3], got[6]] == [replies.NEED_EHLO, replies.AUTH_SYNTAX, replies.BAD_BASE64,
                                                replies.AUTH_IN_TRANSACTION]
    got, _, _ = await dialog(b"EHLO c.example\r\nAUTH PLAIN\r\n", tls=False, starttls=True)
    assert got[1] == replies.AUTH_NEEDS_TLS
    memory = Memory([])
    memory.challenge = True
    got, memory, _ = await dialog(b"EHLO c.example\r\nAUTH LOGIN\r\n" + b"x" * 13000 + b"\r\nNOOP\r\n", memory=memory)
    assert got[1:] == ["334 ", replies.AUTH_LINE_TOO_LONG, replies.OK], "one line, one reply"
    assert memory.events[-1] == "auth_response"


@pytest.mark.parametrize("split", [None, 1000])
async def test_an_auth_line_may_hold_12288_octets_and_no_more(split):
    """RFC 4954 §4: an AUTH command and each line of its exchange up to 12,288 octets with CRLF
    (room for a bearer token); one octet more is 500 5.5.6 and the session goes on; every other
    command keeps its own limit."""
    at_limit, over = (b"AUTH XOAUTH2 " + b"A" * (size - 15) + b"\r\n" for size in (12288, 12289))
    assert (len(at_limit), len(over)) == (12288, 12289)
    token = base64.b64encode(b"x" * 9000)  # 12,000 octets of base64
    got, memory, _ = await dialog(b"EHLO c.example\r\n" + over + at_limit + b"AUTH XOAUTH2 " + token + b"\r\n",
                                  split=split)
    assert got[1:] == [replies.AUTH_LINE_TOO_LONG, replies.BAD_BASE64, replies.AUTH_OK], \
        "over the limit: refused as too long; at it: read and decoded (12,273 octets are no base64)"
    assert memory.events.count("auth_start") == 1, "only the valid line reached policy"
    memory = Memory([])
    memory.challenge = True
    got, memory, _ = await dialog(b"EHLO c.example\r\nAUTH XOAUTH2\r\n" + token + b"\r\n", split=split, memory=memory)
    assert got[1:] == ["334 ", replies.AUTH_OK], "a continuation line of 12,000 octets is read"
    memory = Memory([])
    memory.challenge = True
    got, memory, _ = await dialog(b"EHLO c.example\r\nAUTH XOAUTH2\r\n" + b"A" * 12287 + b"\r\nNOOP " + b"x" * 600
                                  + b"\r\nNOOP\r\n", split=split, memory=memory)
    assert got[1:] == ["334 ", replies.AUTH_LINE_TOO_LONG, replies.LINE_TOO_LONG, replies.OK]


async def test_too_many_errors_close_with_421_and_junk_commands_are_limited():
    got, memory, _ = await dialog(LOGIN + b"FOO\r\n" * 30, max_errors=5)
    assert got[2:] == [replies.UNRECOGNIZED] * 5 + [replies.TOO_MANY_ERRORS] and memory.closed
    got, memory, _ = await dialog(LOGIN + b"NOOP\r\n" * 30, junk_command_limit=4)
    assert got[-1] == replies.TOO_MUCH_JUNK and len(got) == 2 + 3 + 1 and memory.closed


async def test_queue_down_refuses_data_with_a_4xx_and_the_transaction_stays():
    memory = Memory([])
    memory.queue_available = False
    got, memory, session = await dialog(LOGIN + ENVELOPE + b"DATA\r\n", memory=memory)
    assert got[-1].startswith("451 4.3.0") and session.state.phase is Phase.TRANSACTION


async def test_every_reply_of_the_catalogue_has_an_enhanced_code_of_its_class():
    texts = [v for k, v in vars(replies).items() if k.isupper() and isinstance(v, str) and v[:3] != "354"]
    assert len(texts) > 50
    for text in texts:
        code, enhanced = text[:3], text[4:].split(" ", 1)[0]
        assert enhanced.count(".") == 2 and enhanced[0] == code[0], text
