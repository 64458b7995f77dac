"""PROXY protocol only from the listed balancers (PROXY_TRUSTED_NETWORKS), against a real stack.

On loopback 127.0.0.1 plays the balancer (listed) and 127.0.0.2 anyone else who reaches a
frontend directly (a NodePort, another pod): both are real peers of the same listener. The
policy trusts 203.0.113.0/24 (submission without AUTH), so a believed header from the wrong peer
would be a submission without AUTH."""

from __future__ import annotations

import base64
import smtplib
import socket
import time
from collections.abc import Iterator

import pytest

from submitd_devkit.stack import Stack
from submitd_devkit.testing.metrics import sample
from submitd_devkit.testing.plugin import module_stack
from submitd_devkit.testing.smtp import insecure_context
from submitd_devkit.testing.users import ALICE, ALICE_PASSWORD

BALANCER = "127.0.0.1"
STRANGER = "127.0.0.2"
TRUSTED_CLIENT = "203.0.113.9"  # policy's TRUSTED_NETWORKS: submits without AUTH


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Frontend with PROXY on 587 and 465 from 127.0.0.1 only; two failed AUTHs lock a client out."""
    yield from module_stack(
        tmp_path_factory.mktemp("proxied"), trusted_networks=["203.0.113.0/24"],
        env={"frontend": {"PROXY_PROTOCOL": "true", "PROXY_TRUSTED_NETWORKS": [f"{BALANCER}/32"]},
             "policy": {"AUTH_FAILURES_PER_CLIENT": "2", "AUTH_FAILURE_DELAY": "0.05"}})


def header(client: str, port: int) -> bytes:
    return f"PROXY TCP4 {client} 127.0.0.1 40000 {port}\r\n".encode()


def refused(stack: Stack) -> float:
    return sample(stack.ports.frontend_http, "submitd_smtp_proxy_refused_total", reason="untrusted_peer")


def what_a_stranger_gets(port: int, send: bytes) -> tuple[bytes, float]:
    """Connect from 127.0.0.2, send ``send``: what came back before the close, and how soon."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(STRANGER, 0))
    started = time.monotonic()
    got = b""
    try:
        if send:
            sock.sendall(send)
        while chunk := sock.recv(4096):
            got += chunk
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    return got, time.monotonic() - started


class ProxiedSMTP(smtplib.SMTP):
    """smtplib through a balancer: the PROXY header goes first, then SMTP as usual."""

    def __init__(self, client: str, port: int) -> None:
        self.proxy_header = header(client, port)
        super().__init__("127.0.0.1", port, timeout=10)

    def _get_socket(self, host, port, timeout):
        sock = super()._get_socket(host, port, timeout)
        sock.sendall(self.proxy_header)
        return sock


def auth_plain(password: str) -> str:
    return "PLAIN " + base64.b64encode(f"\0{ALICE}\0{password}".encode()).decode()


def tls_session(client: smtplib.SMTP) -> smtplib.SMTP:
    client.ehlo("client.example.test")
    client.starttls(context=insecure_context())
    client.ehlo("client.example.test")
    return client


@pytest.mark.parametrize("port_name", ["submission", "submissions"])
def test_a_proxy_header_from_a_peer_not_listed_is_never_read_the_connection_closed_and_counted(proxied, port_name):
    port = getattr(proxied.ports, port_name)
    before = refused(proxied)
    got, seconds = what_a_stranger_gets(port, header(TRUSTED_CLIENT, port) + b"EHLO x\r\nMAIL FROM:<a@example.net>\r\n")
    assert got == b"", "no greeting, nothing at all"
    assert refused(proxied) == before + 1
    # A silent one too, at once: not after the 10 s a listed balancer has for its header.
    got, seconds = what_a_stranger_gets(port, b"")
    assert got == b"" and seconds < 2
    assert refused(proxied) == before + 2
    log = proxied.log_path("frontend").read_text()
    assert f'"peer": "{STRANGER}"' in log and "outside PROXY_TRUSTED_NETWORKS" in log


def test_from_a_listed_balancer_the_announced_address_is_the_client_policy_counts_by(proxied):
    locked, other = "198.51.100.7", "198.51.100.8"
    port = proxied.ports.submission
    for _ in range(2):
        with tls_session(ProxiedSMTP(locked, port)) as client:
            assert client.docmd("AUTH", auth_plain("wrong"))[0] == 535
    with tls_session(ProxiedSMTP(locked, port)) as client:
        assert client.docmd("AUTH", auth_plain(ALICE_PASSWORD))[0] == 421, "198.51.100.7 is locked out"
    # The balancer's own address, and every other client behind it, are not.
    with tls_session(ProxiedSMTP(other, port)) as client:
        assert client.docmd("AUTH", auth_plain(ALICE_PASSWORD))[0] == 235
    with tls_session(smtplib.SMTP("127.0.0.1", proxied.ports.internal_submission, timeout=10)) as client:
        assert client.docmd("AUTH", auth_plain(ALICE_PASSWORD))[0] == 235
    # And the announced address is what TRUSTED_NETWORKS is checked against, and what the
    # message's trace field names.
    proxied.sink.handler.reset()
    with ProxiedSMTP(TRUSTED_CLIENT, port) as client:
        client.ehlo("client.example.test")
        client.sendmail("anyone@example.net", ["bob@example.net"], b"Subject: trusted\r\n\r\nhi\r\n")
    [got] = proxied.sink.handler.wait_for(1, 20)
    assert f"from client.example.test ([{TRUSTED_CLIENT}])".encode() in got.data


def test_the_internal_listener_takes_no_proxy_header_its_client_is_the_peer(proxied, raw):
    before = refused(proxied)
    c = raw(proxied.ports.internal_submission)
    assert c.reply().startswith("220 "), "greeted at once: no header awaited"
    c.send(header(TRUSTED_CLIENT, proxied.ports.internal_submission))
    assert c.reply() == "500 5.5.1 Command unrecognized"
    c.send(b"EHLO webmail.example.test\r\n")
    assert "STARTTLS" in c.reply()
    c.send(b"MAIL FROM:<anyone@example.net>\r\n")
    assert c.reply().startswith("530 5.7.0"), "the client is 127.0.0.1, not the address its line announced"
    # From any peer: the chart's NetworkPolicy, not the frontend, says who reaches this port.
    stranger = raw(proxied.ports.internal_submission, source=STRANGER)
    assert stranger.reply().startswith("220 ")
    assert refused(proxied) == before


def test_proxy_protocol_without_trusted_networks_refuses_to_start(make_stack):
    stack = make_stack(start=False, env={"frontend": {"PROXY_PROTOCOL": "true"}})
    with pytest.raises(RuntimeError, match="frontend exited") as e:
        stack.start(("frontend",))
    assert "refusing to start" in str(e.value) and "PROXY_TRUSTED_NETWORKS is empty" in str(e.value)
    assert "Traceback" not in stack.log_path("frontend").read_text()
