"""SMTP client helpers for tests: stdlib smtplib against a running stack."""

from __future__ import annotations

import smtplib
import socket
import ssl

from submitd_devkit.stack import Stack

from .users import ALICE, ALICE_PASSWORD


def insecure_context(version: ssl.TLSVersion | None = None, ciphers: str | None = None) -> ssl.SSLContext:
    """A client context that trusts any certificate; optionally one TLS version and its suites."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    if ciphers:
        ctx.set_ciphers(ciphers)
    return ctx


def connect(stack: Stack, *, implicit_tls: bool = False, starttls: bool = True, timeout: float = 30) -> smtplib.SMTP:
    if implicit_tls:
        client = smtplib.SMTP_SSL("127.0.0.1", stack.ports.submissions, context=insecure_context(), timeout=timeout)
        client.ehlo("client.example.test")
        return client
    client = smtplib.SMTP("127.0.0.1", stack.ports.submission, timeout=timeout)
    client.ehlo("client.example.test")
    if starttls:
        client.starttls(context=insecure_context())
        client.ehlo("client.example.test")
    return client


def logged_in(stack: Stack, *, implicit_tls: bool = False, user: str = ALICE, password: str = ALICE_PASSWORD) -> smtplib.SMTP:
    client = connect(stack, implicit_tls=implicit_tls)
    client.login(user, password)
    return client


def reply_of(client: smtplib.SMTP, command: str) -> tuple[int, str]:
    code, text = client.docmd(command)
    return code, text.decode(errors="replace")


class RawClient:
    """A bare socket for what real clients never send (pipelined junk, bare LF)."""

    def __init__(self, port: int, timeout: float = 10, source: str | None = None) -> None:
        """``source``: the local address to connect from (127.0.0.2 is another peer on loopback)."""
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> str:
        """Read one complete (possibly multi-line) reply."""
        lines = []
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"closed after {lines!r}")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            lines.append(line.decode(errors="replace"))
            if len(line) < 4 or line[3:4] != b"-":
                return "\n".join(lines)

    def close(self) -> None:
        self.sock.close()
