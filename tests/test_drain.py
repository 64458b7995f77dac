"""SIGTERM drains a frontend without losing a message: sessions in DATA finish and are queued,
idle ones and new ones get a 4xx they can retry, readiness turns off first."""

from __future__ import annotations

import signal
import smtplib
import threading
import time
import urllib.error
import urllib.request

import pytest

from submitd_devkit.stack import Stack
from submitd_devkit.testing.smtp import connect

pytestmark = pytest.mark.timeout(120)


def message(n: int) -> tuple[bytes, bytes]:
    head = f"From: someone@example.test\r\nTo: bob@example.net\r\nSubject: drain {n}\r\n\r\n".encode()
    return head + b"first half of the body\r\n", b"second half\r\n.\r\n"


def ready(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def test_sigterm_during_50_live_sessions_loses_no_message(make_stack):
    stack: Stack = make_stack(trusted_networks=["127.0.0.1/32"], env={"frontend": {"DRAIN_SECONDS": "15", "MAX_CONNECTIONS_PER_CLIENT": "100"}})
    in_data, idle = [], []
    try:
        for n in range(25):
            client = connect(stack, starttls=False)
            client.mail("someone@example.test")
            client.rcpt("bob@example.net")
            assert client.docmd("DATA")[0] == 354
            first, _ = message(n)
            client.send(first)
            in_data.append(client)
        for _ in range(25):
            idle.append(connect(stack, starttls=False))

        stack.procs["frontend"].send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while ready(stack.ports.frontend_http) == 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready(stack.ports.frontend_http) == 503, "unready as soon as the drain starts"

        # A new client is told to come back later.
        late = smtplib.SMTP()
        late.sock = None
        code, text = late.connect("127.0.0.1", stack.ports.submission)
        late.close()
        assert (code, text[:5]) == (421, b"4.3.2")

        # Idle sessions are ended with a 4xx they can retry.
        for client in idle:
            code, text = client.getreply()
            assert (code, text[:5]) == (421, b"4.3.2")

        # Sessions in DATA finish, and what they sent is queued.
        replies = []

        def finish(n: int, client: smtplib.SMTP) -> None:
            _, rest = message(n)
            try:
                client.send(rest)
                replies.append(client.getreply())
            except Exception as e:  # recorded: the assertion below shows it
                replies.append((0, repr(e).encode()))

        threads = [threading.Thread(target=finish, args=(n, c)) for n, c in enumerate(in_data)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(code for code, _ in replies) == [250] * 25, replies
        assert all(b"queued as" in text for _, text in replies)
    finally:
        for client in in_data + idle:
            client.close()
    assert stack.procs["frontend"].wait(30) == 0, "the frontend exits cleanly after draining"
    got = stack.sink.handler.wait_for(25, 30)
    assert sorted(int(m.data.split(b"Subject: drain ")[1].split(b"\r\n")[0]) for m in got) == list(range(25))


def test_a_tls_client_that_ignores_the_421_does_not_hold_the_drain(make_stack):
    # Found by the scale test: a TLS session told 421 that neither closed nor sent its
    # close_notify kept a draining frontend alive for 30 s (asyncio's TLS shutdown timeout), up
    # to the whole DRAIN_SECONDS: every scale-down of a frontend took that long.
    from submitd_frontend.smtp import CLOSE_GRACE

    stack: Stack = make_stack(env={"frontend": {"DRAIN_SECONDS": "40"}})
    client = connect(stack)  # STARTTLS done, EHLO again, then nothing
    started = time.monotonic()
    stack.procs["frontend"].send_signal(signal.SIGTERM)
    assert client.getreply() == (421, b"4.3.2 Service shutting down, try again later")
    assert stack.procs["frontend"].wait(30) == 0
    assert time.monotonic() - started < CLOSE_GRACE + 3
    client.close()


@pytest.mark.parametrize("client_hello", [False, True], ids=["no-handshake", "half-a-handshake"])
def test_a_starttls_handshake_left_halfway_does_not_hold_the_drain(make_stack, raw, client_hello):
    # Found by the scale test: closed during its handshake, a STARTTLS session waited for a
    # read that could never come (asyncio reports no connection loss to it then), and held a
    # draining frontend until DRAIN_SECONDS ran out.
    import ssl

    stack: Stack = make_stack(env={"frontend": {"DRAIN_SECONDS": "40"}})
    client = raw(stack.ports.submission)
    assert client.reply().startswith("220 ")
    client.send(b"EHLO client.example.test\r\n")
    assert client.reply().splitlines()[-1].startswith("250 ")
    client.send(b"STARTTLS\r\n")
    assert client.reply() == "220 2.0.0 Ready to start TLS"
    if client_hello:
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
        with pytest.raises(ssl.SSLWantReadError):
            tls.do_handshake()
        client.sock.sendall(outgoing.read())
    started = time.monotonic()
    stack.procs["frontend"].send_signal(signal.SIGTERM)
    assert stack.procs["frontend"].wait(30) == 0
    assert time.monotonic() - started < 3


def test_during_the_drain_delay_the_frontend_is_unready_and_still_serves_new_clients(make_stack):
    from submitd_devkit.testing.users import ALICE, ALICE_PASSWORD

    stack: Stack = make_stack(env={"frontend": {"DRAIN_DELAY": "3", "DRAIN_SECONDS": "10"}})
    idle = connect(stack)
    started = time.monotonic()
    stack.procs["frontend"].send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 2
    while ready(stack.ports.frontend_http) != 503 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready(stack.ports.frontend_http) == 503, "unready at once: the balancer stops sending clients"
    # A client the balancer still sent is served as usual, and the idle session is left alone.
    client = connect(stack)
    client.login(ALICE, ALICE_PASSWORD)
    client.sendmail(ALICE, ["bob@example.net"], f"From: {ALICE}\r\nSubject: late\r\n\r\nhi\r\n".encode())
    client.quit()
    assert time.monotonic() - started < 3
    assert idle.noop()[0] == 250
    # Then the drain: the idle session is told 421, and the process ends.
    assert idle.getreply() == (421, b"4.3.2 Service shutting down, try again later")
    idle.close()
    assert stack.procs["frontend"].wait(15) == 0
    assert time.monotonic() - started >= 3
    stack.sink.handler.wait_for(1, 20)
