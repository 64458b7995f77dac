"""The frontend sets up aiosmtpd's protocol state itself (see aiosmtpd_adapter.aiosmtpd_state). If an
aiosmtpd upgrade sets up anything more, or something else, these fail before a session does."""

import asyncio

from aiosmtpd.smtp import SMTP

from submitd_frontend.aiosmtpd_adapter import AIOSMTPD_ATTRIBUTES, aiosmtpd_state
from submitd_frontend.smtp import SubmissionSMTP


async def test_the_adapter_sets_up_exactly_what_aiosmtpd_does():
    plain = vars(asyncio.StreamReaderProtocol(asyncio.StreamReader(), client_connected_cb=lambda r, w: None))
    theirs = SMTP(handler=None, hostname="h.example", ident="x", enable_SMTPUTF8=True, timeout=10)
    assert set(vars(theirs)) - set(plain) == AIOSMTPD_ATTRIBUTES

    ours = SMTP.__new__(SMTP)
    aiosmtpd_state(ours, hostname="h.example", ident="x", tls_context=None, data_size_limit=1000, timeout=10)
    assert set(vars(ours)) == set(vars(theirs))
    for name in ("_smtp_methods", "_auth_methods"):
        assert getattr(ours, name).keys() <= getattr(theirs, name).keys()
    assert ours._smtp_methods.keys() == theirs._smtp_methods.keys(), "every command is reachable"


def test_every_command_of_the_frontend_is_dispatched():
    commands = {name[5:] for name in dir(SubmissionSMTP) if name.startswith("smtp_")}
    assert {"EHLO", "HELO", "STARTTLS", "AUTH", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "NOOP", "QUIT"} <= commands


async def test_unread_gives_back_what_followed_the_end_of_data():
    # Pipelined commands read together with the end of a message go back in front of what
    # the reader still holds (smtp.unread relies on asyncio's StreamReader buffer).
    from submitd_frontend.aiosmtpd_adapter import unread

    reader = asyncio.StreamReader()
    reader.feed_data(b"QUIT\r\n")
    unread(reader, b"MAIL FROM:<a@b.example>\r\n")
    assert await reader.readuntil(b"\n") == b"MAIL FROM:<a@b.example>\r\n"
    assert await reader.readuntil(b"\n") == b"QUIT\r\n"
