"""The dialog in memory against two ways a client could hold or crash a session: parameters in
Unicode look-alikes (a "²" is a digit to str.isdigit and nothing to int()), and message content
trickled past MAX_SESSION_SECONDS. The clock here moves one second for every read."""

from __future__ import annotations

import base64

import pytest

from submitd_devkit.testing.dialog import Memory
from submitd_frontend import replies, wire
from submitd_frontend.session import Session
from submitd_frontend.settings import Settings

LIFETIME = 10  # seconds; the clock moves a second per read


async def dialog(*pieces: bytes) -> tuple[list[str], Memory]:
    """The replies after the greeting to ``pieces``, one read (one second) each."""
    client = Memory(list(pieces))
    settings = Settings(hostname="mx.example.test", max_message_size=10_000_000, max_session_seconds=LIFETIME)
    session = Session(settings, client, client, tls=True, starttls=False, client_address="192.0.2.1",
                      session_id="s1", clock=lambda: client.now)
    try:
        await session.run()
    except EOFError:  # the I/O layer's end of a session cut inside message content
        pass
    await session.end()
    return client.written[1:], client


LOGIN = b"EHLO c.example\r\nAUTH PLAIN " + base64.b64encode(b"\0alice@example.test\0pw") + b"\r\n"
MAIL = "MAIL FROM:<alice@example.test> SMTPUTF8"  # SMTPUTF8 lets 8-bit through to the parameters


@pytest.mark.parametrize("command, reply", [
    (f"{MAIL} SIZE=²", replies.MAIL_SYNTAX),  # before: int("²") raised, 451 and a traceback
    (f"{MAIL} SIZE=١٢٣", replies.MAIL_SYNTAX),  # Arabic-Indic digits
    (f"{MAIL} SIZE=１０", replies.MAIL_SYNTAX),  # full-width digits
    (f"{MAIL} SIZE=123456789012345678901", replies.MAIL_SYNTAX),  # RFC 1870: at most 20 digits
    (f"{MAIL} ſIZE=10", replies.MAIL_SYNTAX),  # a long s: "ſIZE".upper() == "SIZE"
    (f"{MAIL} BODY=8bıtmıme", replies.BAD_BODY),  # dotless i: upper() gives 8BITMIME
    (f"{MAIL} RET=hdrſ", replies.BAD_RET),
    (f"{MAIL} SIZE=10\u00a0BODY=8BITMIME", replies.MAIL_SYNTAX),  # parameters are separated by SP alone
])
async def test_mail_parameters_in_unicode_look_alikes_are_refused_501_and_the_session_goes_on(command, reply):
    got, client = await dialog(LOGIN + command.encode() + b"\r\n" + f"{MAIL} SIZE=10\r\n".encode())
    assert got[2:] == [reply, replies.SENDER_OK]
    assert reply.startswith("501 5.5.4")


async def test_a_notify_in_look_alikes_is_refused_not_passed_on_to_the_next_hop():
    got, client = await dialog(LOGIN + f"{MAIL}\r\n".encode() + "RCPT TO:<bob@example.net> NOTIFY=ſUCCESS\r\n"
                               "RCPT TO:<bob@example.net> NOTIFY=success\r\n".encode())
    assert got[3:] == [replies.BAD_NOTIFY, replies.RECIPIENT_OK]
    assert client.notify == ["success"], "only the ASCII one reached policy and the envelope"


@pytest.mark.parametrize("arg", ["²", "١٢", "１０ LAST", "10 ＬAST", "", "-1"])
def test_bdat_chunk_sizes_are_ascii_digits(arg):
    # (parse_command already refuses 8-bit BDAT arguments with 553: this is the parser's own check)
    assert wire.bdat_args(arg) is None
    assert wire.bdat_args("10 last") == (10, True)


TRICKLE = [b"0123456789abcdef\r\n"] * 30  # a line a second, for 30 seconds


async def test_data_past_the_session_lifetime_is_cut_with_421_and_nothing_queued():
    got, client = await dialog(LOGIN + b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n",
                               *TRICKLE, b".\r\nNOOP\r\n")
    assert got[2:] == [replies.SENDER_OK, replies.RECIPIENT_OK, replies.START_DATA, replies.SESSION_TOO_LONG]
    assert client.closed and client.queued == []
    assert client.fed <= LIFETIME * len(TRICKLE[0]), "cut at the first block past the limit"


async def test_one_huge_bdat_chunk_past_the_session_lifetime_is_cut_with_421_and_nothing_queued():
    # Before: the lifetime was never looked at inside BDAT, so this held the session for ever.
    got, client = await dialog(LOGIN + b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<bob@example.net>\r\n"
                               b"BDAT 1000000000000 LAST\r\n", *TRICKLE)
    assert got[2:] == [replies.SENDER_OK, replies.RECIPIENT_OK, replies.SESSION_TOO_LONG]
    assert client.closed and client.queued == []


async def test_many_bdat_chunks_past_the_session_lifetime_end_with_421_and_nothing_queued():
    chunk = b"BDAT 18\r\n" + TRICKLE[0]
    got, client = await dialog(LOGIN + b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<bob@example.net>\r\n",
                               *[chunk] * 30, b"BDAT 0 LAST\r\n")
    assert got[-1] == replies.SESSION_TOO_LONG and replies.chunk_received(18) in got
    assert got.count(replies.chunk_received(18)) < LIFETIME, "the chunks stop being taken at the limit"
    assert client.closed and client.queued == []


async def test_a_message_that_ends_within_the_lifetime_is_queued():
    got, client = await dialog(LOGIN + b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n",
                               *TRICKLE[:5], b".\r\nQUIT\r\n")
    assert got[5].startswith("250 2.0.0 Ok: queued") and got[-1] == replies.BYE
    assert client.queued == [TRICKLE[0] * 5]
