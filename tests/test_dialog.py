"""The SMTP surface under input real clients never send: it answers with the right code and
enhanced code, and the session (or at least the service) keeps working."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import subprocess
import time
from collections.abc import Iterator

import aiosmtplib
import pytest

from submitd_devkit.stack import Stack
from submitd_devkit.testing.metrics import sample
from submitd_devkit.testing.plugin import module_stack, settled
from submitd_devkit.testing.users import ALICE, ALICE_PASSWORD
from submitd_devkit.testing.smtp import RawClient, connect, insecure_context, logged_in, reply_of
from submitd_devkit.testing.waiting import eventually

pytestmark = pytest.mark.timeout(90)


def accepted(stack) -> float:
    """Messages the frontend has accepted (and so queued) since it started."""
    return sample(stack.ports.frontend_http, "submitd_messages_total", outcome="accepted", code="250")


def assert_only_the_next_message_arrives(stack) -> None:
    """A message sent now is the only one the next hop gets: nothing refused before it was
    queued (it would have been delivered first, or beside it)."""
    with logged_in(stack) as client:
        client.sendmail(ALICE, ["bob@example.net"], b"Subject: marker\r\n\r\nmarker\r\n")
    stack.sink.handler.wait_for(1, 20)
    time.sleep(0.5)  # (room for a stray second message to arrive)
    assert [b"marker" in m.data for m in stack.sink.handler.messages] == [True]


@pytest.fixture
def raw_factory(raw):
    return raw


@pytest.fixture(scope="module")
def limited_stack(tmp_path_factory) -> Iterator[Stack]:
    """One stack for the tests of limits and of what trusted networks may do, instead of one
    each: messages of at most 10,000 octets and 3 recipients, 127.0.0.0/8 a trusted network
    (mail without AUTH), failed AUTHs answered at once (whose second would hide a missing hash)
    and never locking anyone out."""
    yield from module_stack(tmp_path_factory.mktemp("limited"), trusted_networks=["127.0.0.0/8"], env={
        "frontend": {"MAX_MESSAGE_SIZE": "10000", "MAX_RECIPIENTS": "3"},
        "policy": {"AUTH_FAILURE_DELAY": "0", "AUTH_FAILURES_PER_CLIENT": "1000", "AUTH_FAILURES_PER_LOGIN": "1000"}})


@pytest.fixture
def limited(limited_stack: Stack) -> Stack:
    return settled(limited_stack)


MSG = f"From: {ALICE}\r\nTo: bob@example.net\r\nSubject: dialog\r\n\r\nbody\r\n".encode()
PLAIN = base64.b64encode(f"\0{ALICE}\0{ALICE_PASSWORD}".encode()).decode()


def raw_tls(stack, raw_factory) -> RawClient:
    """A raw client on the implicit-TLS port, already logged in."""
    raw = raw_factory(stack.ports.submissions, tls=True)
    assert raw.reply().startswith("220 ")
    raw.send(b"EHLO raw.example.test\r\n")
    assert raw.reply().startswith("250")
    raw.send(f"AUTH PLAIN {PLAIN}\r\n".encode())
    assert raw.reply().startswith("235 2.7.0")
    return raw


def test_every_reply_has_an_enhanced_code(stack, raw_factory):
    raw = raw_tls(stack, raw_factory)
    for cmd in [b"NOOP", b"HELP", b"VRFY bob", b"EXPN list", b"FOO", b"MAIL", b"RCPT TO:<a@b.c>", b"DATA",
                b"MAIL FROM:<alice@example.test> FOO=1", b"RSET", b"STARTTLS", b"ETRN example.net"]:
        raw.send(cmd + b"\r\n")
        reply = raw.reply()
        code, enhanced = reply[:3], reply[4:].split(" ", 1)[0]
        assert enhanced.count(".") == 2 and enhanced[0] == code[0], f"{cmd!r} -> {reply!r}"
    raw.close()


def test_etrn_is_not_a_command(stack, raw_factory):
    raw = raw_tls(stack, raw_factory)
    raw.send(b"ETRN example.net\r\n")
    assert raw.reply().startswith("500 5.5.1")


def test_long_command_line_is_500_and_session_goes_on(stack, raw_factory):
    raw = raw_tls(stack, raw_factory)
    raw.send(b"NOOP " + b"x" * 600 + b"\r\n")
    assert raw.reply().startswith("500 5.5.2")
    raw.send(b"NOOP " + b"x" * 5000 + b"\r\n")  # beyond the reader's buffer too
    assert raw.reply().startswith("500 5.5.2")
    raw.send(b"NOOP\r\n")
    assert raw.reply().startswith("250 2.0.0")


def test_bare_lf_or_cr_in_command_is_a_syntax_error(stack, raw_factory):
    raw = raw_tls(stack, raw_factory)
    raw.send(b"MAIL FROM:<alice@example.test>\n")
    assert raw.reply().startswith("500 5.5.2")
    raw.send(b"MAIL FROM:<alice@example.test>\rRCPT TO:<x@example.net>\r\n")
    assert raw.reply().startswith("500 5.5.2")
    raw.send(b"NOOP\x00\r\n")
    assert raw.reply().startswith("500 5.5.2")
    raw.send(b"MAIL FROM:<alice@example.test>\r\n")
    assert raw.reply().startswith("250 2.1.0"), "no transaction was started by the bad lines"


def test_8bit_command_without_smtputf8(stack, raw_factory):
    raw = raw_tls(stack, raw_factory)
    raw.send("MAIL FROM:<jösé@example.test>\r\n".encode())
    assert raw.reply().startswith("553 5.6.7")
    raw.send(b"MAIL FROM:<\xff@example.test>\r\n")
    assert raw.reply().startswith("500 5.5.2")


@pytest.mark.parametrize(
    "smuggle",
    [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r"],
    ids=["lf-dot-lf", "lf-dot-crlf", "crlf-dot-lf", "cr-dot-crlf", "crlf-dot-cr"],
)
def test_smuggling_bare_line_endings_never_end_data(stack, smuggle, raw_factory):
    """CVE-2023-51764 family: only <CRLF>.<CRLF> ends DATA; the message is refused whole."""
    before = accepted(stack)
    stack.sink.handler.reset()
    raw = raw_tls(stack, raw_factory)
    raw.send(b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n")
    assert raw.reply().startswith("250")
    assert raw.reply().startswith("250")
    assert raw.reply().startswith("354")
    raw.send(b"Subject: first\r\n\r\nhello" + smuggle +
             b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\n"
             b"Subject: smuggled\r\n\r\nsmuggled\r\n.\r\n")
    reply = raw.reply()
    assert reply.startswith("554 5.6.0") and "bare CR or LF" in reply
    raw.send(b"NOOP\r\n")
    assert raw.reply().startswith("250"), "nothing of the message was read as a command"
    raw.close()
    assert accepted(stack) == before, "nothing was queued"
    assert_only_the_next_message_arrives(stack)


def test_long_text_line_in_data_is_refused_after_the_whole_message(stack):
    with logged_in(stack) as client:
        client.mail(ALICE)
        client.rcpt("bob@example.net")
        code, text = client.data(b"Subject: long\r\n\r\n" + b"y" * 1200 + b"\r\nafter\r\n")
        assert (code, text[:5]) == (500, b"5.5.2")
        assert client.noop()[0] == 250


def test_oversize_message_is_read_to_its_end_then_552(limited):
    stack = limited  # MAX_MESSAGE_SIZE 10000
    with logged_in(stack) as client:
        assert client.has_extn("size") and client.esmtp_features["size"] == "10000"
        code, text = reply_of(client, f"MAIL FROM:<{ALICE}> SIZE=20000")
        assert (code, text[:5]) == (552, "5.3.4")
        client.mail(ALICE)
        client.rcpt("bob@example.net")
        code, text = client.data(b"Subject: big\r\n\r\n" + (b"z" * 70 + b"\r\n") * 300)
        assert (code, text[:5]) == (552, b"5.3.4")
        assert client.noop()[0] == 250, "the body was not read as commands"


def test_recipient_limit_keeps_earlier_recipients(limited):
    stack = limited  # MAX_RECIPIENTS 3
    with logged_in(stack) as client:
        client.mail(ALICE)
        for n in range(3):
            assert client.rcpt(f"r{n}@example.net")[0] == 250
        code, text = client.rcpt("r3@example.net")
        assert (code, text[:5]) == (452, b"4.5.3")
        assert client.data(MSG)[0] == 250
    [msg] = stack.sink.handler.wait_for(1, 20)
    assert msg.rcpt_tos == ["r0@example.net", "r1@example.net", "r2@example.net"]


def test_starttls_discards_pipelined_plaintext(stack, raw_factory):
    """CVE-2011-0411: commands sent with STARTTLS before the handshake are not executed."""
    raw = raw_factory(stack.ports.submission)
    assert raw.reply().startswith("220")
    raw.send(b"EHLO raw.example.test\r\n")
    raw.reply()
    raw.send(b"STARTTLS\r\nRSET\r\nMAIL FROM:<alice@example.test>\r\n")
    assert raw.reply().startswith("220")
    raw.sock = insecure_context().wrap_socket(raw.sock, server_hostname="localhost")
    raw.buf = b""
    raw.send(b"NOOP\r\n")
    assert raw.reply().startswith("250 2.0.0"), "the injected RSET/MAIL got no reply"
    raw.send(b"MAIL FROM:<alice@example.test>\r\n")
    assert raw.reply().startswith("503 5.5.1"), "a new EHLO is required after STARTTLS"
    raw.send(b"EHLO raw.example.test\r\n")
    assert "AUTH PLAIN LOGIN" in raw.reply()


def test_auth_errors(stack):
    with connect(stack) as client:
        assert reply_of(client, "AUTH PLAIN not*base64") == (501, "5.5.2 Cannot decode base64")
        assert reply_of(client, "AUTH PLAIN " + base64.b64encode(b"no-nuls").decode())[0] == 501
        assert reply_of(client, "AUTH CRAM-MD5")[0] == 504
        code, _ = reply_of(client, "AUTH LOGIN")
        assert code == 334
        assert reply_of(client, "*") == (501, "5.0.0 Authentication cancelled")
        other = base64.b64encode(f"bob@example.test\0{ALICE}\0{ALICE_PASSWORD}".encode()).decode()
        assert reply_of(client, f"AUTH PLAIN {other}")[0] == 535, "authzid of another user"
        assert reply_of(client, f"AUTH PLAIN {PLAIN}")[0] == 235
        assert reply_of(client, f"AUTH PLAIN {PLAIN}") == (503, "5.5.1 Already authenticated")


def test_auth_inside_transaction_is_503(limited):
    stack = limited  # 127.0.0.0/8 trusted
    with connect(stack) as client:
        client.mail("x@example.net")
        assert reply_of(client, f"AUTH PLAIN {PLAIN}")[0] == 503


def test_too_many_errors_closes_with_421(stack, raw_factory):
    raw = raw_tls(stack, raw_factory)
    for _ in range(19):
        raw.send(b"BOGUS\r\n")
        assert raw.reply().startswith("500")
    raw.send(b"BOGUS\r\n")
    assert raw.reply().startswith("500")
    assert raw.reply().startswith("421 4.7.0")
    with pytest.raises((ConnectionError, OSError)):
        raw.send(b"NOOP\r\n")
        raw.reply()


def test_slow_command_is_cut_off(make_stack, raw_factory):
    stack = make_stack(env={"frontend": {"COMMAND_TIMEOUT": "1.5"}})
    raw = raw_factory(stack.ports.submission)
    assert raw.reply().startswith("220")
    started = time.monotonic()
    with pytest.raises((ConnectionError, OSError)):
        for ch in b"EHLO slow.example.test":  # one byte every 0.3 s: too slow for one command
            raw.send(bytes([ch]))
            time.sleep(0.3)
        raw.reply()
    assert time.monotonic() - started < 5


def test_connections_per_client_are_limited(make_stack, raw_factory):
    stack = make_stack(env={"frontend": {"MAX_CONNECTIONS_PER_CLIENT": "2"}})
    held = [raw_factory(stack.ports.submission) for _ in range(2)]
    for c in held:
        assert c.reply().startswith("220")
    extra = raw_factory(stack.ports.submission)
    assert extra.reply().startswith("421 4.7.0")
    held[0].close()
    # The frontend counts a session out when it has seen it end: then its place is free.
    eventually(lambda: sample(stack.ports.frontend_http, "submitd_smtp_sessions_active") == 1)
    again = raw_factory(stack.ports.submission)
    assert again.reply().startswith("220")


def test_bdat_chunking(stack, raw_factory):
    raw = raw_tls(stack, raw_factory)
    body = MSG.replace(b"body", b"chunked body")
    half = len(body) // 2
    raw.send(b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<bob@example.net>\r\n")
    assert raw.reply().startswith("250") and raw.reply().startswith("250")
    raw.send(b"BDAT %d\r\n" % half + body[:half])
    assert raw.reply().startswith(f"250 2.0.0 {half} octets")
    raw.send(b"BDAT %d LAST\r\n" % (len(body) - half) + body[half:])
    assert raw.reply().startswith("250 2.0.0 Ok: queued as")
    [msg] = stack.sink.handler.wait_for(1, 20)
    assert msg.data.endswith(b"\r\n\r\nchunked body\r\n")


def test_bdat_without_transaction_reads_the_chunk_then_503(stack, raw_factory):
    raw = raw_tls(stack, raw_factory)
    raw.send(b"BDAT 12 LAST\r\nNOOP\r\nNOOP\r\n")
    assert raw.reply().startswith("503 5.5.1")
    raw.send(b"NOOP\r\n")
    assert raw.reply().startswith("250 2.0.0"), "the chunk's NOOPs were data, not commands"
    raw.send(b"BDAT x\r\n")
    assert raw.reply().startswith("501 5.5.4")


def test_bdat_with_bare_lf_is_refused(stack, raw_factory):
    raw = raw_tls(stack, raw_factory)
    raw.send(b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<bob@example.net>\r\n")
    assert raw.reply().startswith("250") and raw.reply().startswith("250")
    data = b"Subject: x\r\n\r\nline\nmore\r\n"
    raw.send(b"BDAT %d LAST\r\n" % len(data) + data)
    assert raw.reply().startswith("554 5.6.0")


async def test_aiosmtplib_client_with_pipelining(stack):
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=stack.ports.submission, start_tls=True,
                             tls_context=insecure_context())
    await client.connect()
    await client.ehlo()
    await client.auth_plain(ALICE, ALICE_PASSWORD)
    errors, reply = await client.sendmail(ALICE, ["bob@example.net", "carol@example.net"], MSG)
    assert errors == {} and reply.startswith("2.0.0 Ok: queued as")
    await client.quit()
    # Closing a TLS connection takes a few more turns of the loop (close_notify); this loop
    # ends with the test, and a socket still open then is reported as a leak in a later test.
    await asyncio.sleep(0.2)
    assert stack.sink.handler.wait_for(1, 20)


def test_swaks_submission(stack):
    result = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{stack.ports.submission}", "--tls", "--auth", "LOGIN",
         "--auth-user", ALICE, "--auth-password", ALICE_PASSWORD, "--from", ALICE, "--to", "bob@example.net",
         "--pipeline", "--h-Subject", "via swaks"],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "250 2.0.0 Ok: queued as" in result.stdout
    [msg] = stack.sink.handler.wait_for(1, 20)
    assert b"Subject: via swaks" in msg.data


def test_one_abusive_client_does_not_hurt_the_others(stack, raw_factory):
    """An abusive client floods junk and holds slow sessions; 10 honest clients still submit."""
    import threading

    stop = threading.Event()

    def abuse():
        while not stop.is_set():
            try:
                with contextlib.closing(RawClient(stack.ports.submission, timeout=5)) as raw:
                    raw.reply()
                    for _ in range(25):
                        raw.send(b"X" * 3000 + b"\r\n")
            except OSError:
                pass

    abusers = [threading.Thread(target=abuse) for _ in range(3)]
    for t in abusers:
        t.start()
    try:
        started = time.monotonic()
        for n in range(10):
            with logged_in(stack) as client:
                client.sendmail(ALICE, ["bob@example.net"], MSG.replace(b"dialog", b"honest %d" % n))
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        for t in abusers:
            t.join()
    assert len(stack.sink.handler.wait_for(10, 30)) == 10
    assert elapsed < 30


def test_dsn_parameters_are_checked_and_accepted(stack):
    with logged_in(stack) as client:
        assert reply_of(client, f"MAIL FROM:<{ALICE}> RET=SOMETIMES")[0] == 501
        assert reply_of(client, f"MAIL FROM:<{ALICE}> ENVID=bad\x7fid")[0] in (500, 501)
        assert reply_of(client, f"MAIL FROM:<{ALICE}> RET=HDRS ENVID=QQ314159")[0] == 250
        assert reply_of(client, "RCPT TO:<bob@example.net> NOTIFY=NEVER,SUCCESS")[0] == 501
        assert reply_of(client, "RCPT TO:<bob@example.net> ORCPT=bob@example.net")[0] == 501
        code, _ = reply_of(client, "RCPT TO:<bob@example.net> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;bob@example.net")
        assert code == 250
        assert client.data(MSG)[0] == 250
    assert stack.sink.handler.wait_for(1, 20)


def test_smtputf8_submission_end_to_end(limited):
    stack = limited  # 127.0.0.0/8 trusted
    msg = "From: jösé@exämple.test\r\nTo: zoë@exämple.net\r\nSubject: ünïcode\r\n\r\nçà va\r\n".encode()
    with connect(stack) as client:
        assert "smtputf8" in client.esmtp_features
        client.command_encoding = "utf-8"
        assert reply_of(client, "MAIL FROM:<jösé@exämple.test> SMTPUTF8 BODY=8BITMIME")[0] == 250
        assert reply_of(client, "RCPT TO:<zoë@exämple.net>")[0] == 250
        assert client.data(msg)[0] == 250
    [got] = stack.sink.handler.wait_for(1, 20)
    assert got.mail_from == "jösé@exämple.test" and got.rcpt_tos == ["zoë@exämple.net"]
    assert "Subject: ünïcode\r\n".encode() in got.data
    assert got.data.endswith("\r\n\r\nçà va\r\n".encode())


def test_slow_drip_data_is_cut_off(make_stack, raw_factory):
    stack = make_stack(env={"frontend": {"DATA_RATE_GRACE": "1", "MIN_DATA_RATE": "1000"}})
    raw = raw_tls(stack, raw_factory)
    raw.send(b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n")
    assert raw.reply().startswith("250") and raw.reply().startswith("250") and raw.reply().startswith("354")
    started = time.monotonic()
    try:
        while time.monotonic() - started < 2.5:
            raw.send(b"x\r\n")  # 3 octets every 0.2 s: far below 1000 octets/s
            time.sleep(0.2)
    except OSError:
        pass
    assert raw.reply().startswith("421 4.4.2")
    assert accepted(stack) == 0, "nothing of the cut-off message was queued"
    assert_only_the_next_message_arrives(stack)


def test_unknown_users_cost_what_wrong_passwords_cost(limited):
    """An unknown login is checked against a dummy hash, so that its refusal costs (and takes) what
    a wrong password costs: policy's own count and time of password hashing show it, with no
    failure delay (whose second would hide a missing hash) and no lockouts in the way."""
    stack = limited
    policy = stack.ports.policy_http

    def hashing() -> tuple[float, float]:
        return (sample(policy, "submitd_policy_password_verifications_total", result="mismatch"),
                sample(policy, "submitd_policy_password_hash_seconds_sum"))

    def failed_login(user: str) -> tuple[float, float]:
        """The verifications and the seconds of hashing one refused AUTH cost."""
        before = hashing()
        with connect(stack) as client:
            token = base64.b64encode(f"\0{user}\0wrong password".encode()).decode()
            assert reply_of(client, f"AUTH PLAIN {token}")[0] == 535
        after = hashing()
        return after[0] - before[0], after[1] - before[1]

    failed_login(ALICE), failed_login("nobody@example.test")  # (the dummy hash is made at first use)
    known, unknown = [], []
    for n in range(5):  # interleaved: the machine's load weighs on both alike
        known.append(failed_login(ALICE))
        unknown.append(failed_login(f"nobody{n}@example.test"))
    assert [count for count, _ in known] == [count for count, _ in unknown] == [1] * 5, (known, unknown)
    known_seconds, unknown_seconds = sum(s for _, s in known), sum(s for _, s in unknown)
    assert 0.5 < unknown_seconds / known_seconds < 2, (known, unknown)


def test_an_auth_continuation_line_gets_the_command_checks_and_one_reply(stack, raw_factory):
    raw = raw_factory(stack.ports.submissions, tls=True)
    assert raw.reply().startswith("220 ")
    raw.send(b"EHLO raw.example.test\r\n")
    assert raw.reply().startswith("250")
    raw.send(b"AUTH LOGIN\r\n")
    assert raw.reply().startswith("334 ")
    raw.send(b"A" * (2 << 20) + b"\r\nNOOP\r\n")  # 2 MB with no CRLF until the end
    assert raw.reply().startswith("500 5.5.6 Authentication Exchange line is too long")  # over 12,288 octets
    assert raw.reply().startswith("250 2.0.0"), "one reply for the line, then the NOOP's"
    raw.send(b"AUTH LOGIN\r\n")
    assert raw.reply().startswith("334 ")
    raw.send(b"YWxp\nY2U=\r\n")  # a bare LF inside the continuation: read as it is in commands
    assert raw.reply().startswith("500 5.5.2 Syntax error")
    assert raw.reply().startswith("500 5.5.1"), "what followed the bare LF is a command, not AUTH data"
    raw.send(f"AUTH PLAIN {PLAIN}\r\n".encode())
    assert raw.reply().startswith("235 2.7.0"), "AUTH works after both"


def test_junk_commands_and_session_lifetime_are_limited(make_stack, raw_factory):
    # A client that keeps a session open with NOOPs (or anything that sends no mail) is cut,
    # as Postfix's smtpd_junk_command_limit does, and no session outlives MAX_SESSION_SECONDS.
    # The EHLO counts too: EHLO and 5 more are allowed, the 7th is not.
    stack = make_stack(env={"frontend": {"JUNK_COMMAND_LIMIT": "6", "MAX_SESSION_SECONDS": "2"}})
    raw = raw_tls(stack, raw_factory)
    for cmd in (b"NOOP", b"RSET", b"HELP", b"VRFY bob", b"NOOP"):
        raw.send(cmd + b"\r\n")
        assert raw.reply()[:1] == "2"
    raw.send(b"NOOP\r\n")
    assert raw.reply().startswith("421 4.7.0")
    with pytest.raises((ConnectionError, OSError, EOFError)):
        raw.send(b"NOOP\r\n")
        raw.reply()
    with logged_in(stack) as client:
        for _ in range(3):  # after two EHLOs (STARTTLS)
            assert client.noop()[0] == 250
        client.sendmail(ALICE, ["bob@example.net"], b"Subject: x\r\n\r\nmail resets the count\r\n")
        for _ in range(5):
            assert client.noop()[0] == 250
        time.sleep(2.2)
        assert client.noop() == (421, b"4.4.2 Session time limit reached, closing connection")


def test_the_open_file_limit_is_raised_and_max_sessions_fits_under_it(make_stack, raw_factory):
    # Started with a soft limit of 300 and a hard one of 400 (the default MAX_SESSIONS is 1000):
    # the frontend raises its soft limit to the hard one and lowers MAX_SESSIONS to fit, so the
    # client past it is told 421 4.3.2 instead of losing its connection for want of a descriptor.
    import resource
    import sys

    stack = make_stack(start=False, env={"frontend": {"MAX_CONNECTIONS_PER_CLIENT": "1000"}})
    stack.start(("policy", "rewriter", "relay"))
    with open(stack.log_path("frontend"), "ab") as log:
        stack.procs["frontend"] = subprocess.Popen(
            [sys.executable, "-m", "submitd_frontend"], env=stack.service_env("frontend"), stdout=log, stderr=log,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (300, 400)),
        )
    stack.wait_ready("frontend")
    from pathlib import Path

    limits = Path(f"/proc/{stack.procs['frontend'].pid}/limits").read_text()
    assert re.search(r"Max open files\s+400\s+400", limits), limits
    assert "MAX_SESSIONS lowered to fit the open-file limit" in stack.log_path("frontend").read_text()
    held = [raw_factory(stack.ports.submission) for _ in range(144)]
    assert all(c.reply().startswith("220") for c in held)
    extra = raw_factory(stack.ports.submission)
    assert extra.reply().startswith("421 4.3.2"), "past MAX_SESSIONS (400 - 256): a clear 421"
