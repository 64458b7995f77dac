"""Clients that would crash a session or hold it for ever, against a real stack: MAIL parameters
are ASCII (a Unicode digit in SIZE is a 501, not a traceback), and MAX_SESSION_SECONDS holds
inside message content too: a client trickling DATA or one endless BDAT chunk faster than
MIN_DATA_RATE is cut with 421 4.4.2 once the session is older than its lifetime, and nothing of
that message is queued or left in the Object Store."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator

import pytest

from submitd_devkit.stack import Stack
from submitd_devkit.testing.metrics import sample
from submitd_devkit.testing.plugin import module_stack
from submitd_devkit.testing.smtp import RawClient
from submitd_devkit.testing.users import ALICE, ALICE_PASSWORD
from submitd_devkit.testing.waiting import eventually
from test_streaming import stored_chunks

pytestmark = pytest.mark.timeout(90)

LIFETIME = 3.0
PLAIN = base64.b64encode(f"\0{ALICE}\0{ALICE_PASSWORD}".encode()).decode()


@pytest.fixture(scope="module")
def short_lived(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Sessions live 3 s; content must come at 200 octets/s after half a second."""
    yield from module_stack(tmp_path_factory.mktemp("short-lived"), env={"frontend": {
        "MAX_SESSION_SECONDS": str(LIFETIME), "MIN_DATA_RATE": "200", "DATA_RATE_GRACE": "0.5"}})


def session(stack: Stack, raw) -> tuple[RawClient, float]:
    """Logged in on 465, with a transaction open: the client and when it connected."""
    started = time.monotonic()
    c = raw(stack.ports.submissions, tls=True)
    assert c.reply().startswith("220 ")
    c.send(f"EHLO c.example.test\r\nAUTH PLAIN {PLAIN}\r\nMAIL FROM:<{ALICE}>\r\nRCPT TO:<bob@example.net>\r\n".encode())
    for _ in range(4):
        assert c.reply()[:1] == "2"
    return c, started


def trickle(c: RawClient, seconds: float, observe=lambda: None) -> str | None:
    """48 KiB every quarter of a second (far above MIN_DATA_RATE) until the server says something;
    its reply, or None if it never did. ``observe()`` is called after each block."""
    line = b"x" * 76 + b"\r\n"
    block = f"From: {ALICE}\r\nTo: bob@example.net\r\nSubject: slow\r\n\r\n".encode() + line * 630
    c.sock.settimeout(0.25)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            c.send(block)
            block = line * 630
        except OSError:
            pass  # closed on us: the reply is waiting
        observe()
        try:
            return c.reply()
        except TimeoutError:
            continue
        except (ConnectionError, OSError):
            return None
    return None


def accepted(stack: Stack) -> float:
    return sample(stack.ports.frontend_http, "submitd_messages_total", outcome="accepted", code="250")


@pytest.mark.parametrize("start", [b"DATA\r\n", b"BDAT 100000000000 LAST\r\n"], ids=["DATA", "BDAT"])
def test_content_trickled_past_the_session_lifetime_is_cut_with_421_and_nothing_is_queued(short_lived, raw, start):
    chunks, queued = stored_chunks(short_lived), accepted(short_lived)
    c, started = session(short_lived, raw)
    c.send(start)
    if start == b"DATA\r\n":
        assert c.reply().startswith("354")
    most = [chunks]
    reply = trickle(c, LIFETIME + 5, lambda: most.append(stored_chunks(short_lived)))
    seconds = time.monotonic() - started
    assert reply == "421 4.4.2 Session time limit reached, closing connection"
    assert LIFETIME <= seconds < LIFETIME + 1.5, seconds
    with pytest.raises((ConnectionError, OSError)):  # closed after it
        c.send(b"x" * 65536)
        c.reply()
    # Half a megabyte had streamed through the rewriter into the Object Store: removed again.
    assert max(most) > chunks
    eventually(lambda: stored_chunks(short_lived) <= chunks, 10)
    assert accepted(short_lived) == queued  # nothing queued, so nothing can reach the next hop
    assert short_lived.sink.handler.messages == []


def test_a_unicode_digit_in_size_is_a_501_and_the_session_goes_on(short_lived, raw):
    # Before: str.isdigit() took "²", int() raised, and each such MAIL got 451 and a traceback.
    c = raw(short_lived.ports.submissions, tls=True)
    assert c.reply().startswith("220 ")
    c.send(f"EHLO c.example.test\r\nAUTH PLAIN {PLAIN}\r\n".encode())
    assert c.reply().startswith("250") and c.reply().startswith("235")
    c.send(f"MAIL FROM:<{ALICE}> SMTPUTF8 SIZE=²\r\n".encode())
    assert c.reply().startswith("501 5.5.4")
    c.send(f"MAIL FROM:<{ALICE}> SMTPUTF8 SIZE=10\r\n".encode())
    assert c.reply().startswith("250 2.1.0")
    log = short_lived.log_path("frontend").read_text()
    assert "Traceback" not in log and "internal error" not in log
