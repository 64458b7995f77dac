"""Clients that would crash a session, against a real stack: MAIL parameters are ASCII (a Unicode
digit in SIZE is a 501, not a traceback)."""

from __future__ import annotations

import base64

import pytest

from submitd_devkit.testing.users import ALICE, ALICE_PASSWORD

pytestmark = pytest.mark.timeout(90)

PLAIN = base64.b64encode(f"\0{ALICE}\0{ALICE_PASSWORD}".encode()).decode()


def test_a_unicode_digit_in_size_is_a_501_and_the_session_goes_on(stack, raw):
    # Before: str.isdigit() took "²", int() raised, and each such MAIL got 451 and a traceback.
    c = raw(stack.ports.submissions, tls=True)
    assert c.reply().startswith("220 ")
    c.send(f"EHLO c.example.test\r\nAUTH PLAIN {PLAIN}\r\n".encode())
    assert c.reply().startswith("250") and c.reply().startswith("235")
    c.send(f"MAIL FROM:<{ALICE}> SMTPUTF8 SIZE=²\r\n".encode())
    assert c.reply().startswith("501 5.5.4")
    c.send(f"MAIL FROM:<{ALICE}> SMTPUTF8 SIZE=10\r\n".encode())
    assert c.reply().startswith("250 2.1.0")
    log = stack.log_path("frontend").read_text()
    assert "Traceback" not in log and "internal error" not in log
