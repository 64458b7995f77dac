"""AUTH from many client addresses, for the tests of guessing limits: each session starts with the
PROXY header a trusted balancer sends (the frontend runs with PROXY_PROTOCOL), so policy sees
whatever IPv4 or IPv6 address the test names, then STARTTLS and one AUTH PLAIN."""

from __future__ import annotations

import base64
import socket
import threading
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from submitd_devkit.stack import Stack
from submitd_devkit.testing.smtp import insecure_context


_TLS = insecure_context()
_TLS_SESSIONS: dict[int, object] = {}


class Session:
    """One SMTP session from ``source`` (as the PROXY header says), up to just before AUTH."""

    def __init__(self, stack: Stack, source: str, timeout: float = 60) -> None:
        self.sock = socket.create_connection(("127.0.0.1", stack.ports.submission), timeout=timeout)
        self.buf = b""
        family, to = ("TCP6", "2001:db8::25") if ":" in source else ("TCP4", "192.0.2.25")
        self.sock.sendall(f"PROXY {family} {source} {to} 40000 587\r\n".encode())
        self.expect("220")
        self.command("EHLO client.example.test", "250")
        self.command("STARTTLS", "220")
        # Resumed TLS sessions (the frontend issues tickets): a thousand sessions cost the
        # frontend a thousand handshakes' key exchanges, not a thousand RSA signatures.
        self.sock = _TLS.wrap_socket(self.sock, server_hostname="localhost", session=_TLS_SESSIONS.get(stack.ports.submission))
        self.command("EHLO client.example.test", "250")
        if self.sock.session is not None and self.sock.session.has_ticket:
            _TLS_SESSIONS[stack.ports.submission] = self.sock.session

    def reply(self) -> str:
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("closed")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            if line[3:4] != b"-":
                return line.decode(errors="replace")

    def expect(self, code: str) -> str:
        line = self.reply()
        assert line.startswith(code), line
        return line

    def command(self, line: str, code: str) -> str:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.expect(code)

    def auth(self, login: str, password: str) -> int:
        token = base64.b64encode(f"\0{login}\0{password}".encode()).decode()
        self.sock.sendall(f"AUTH PLAIN {token}\r\n".encode())
        return int(self.reply()[:3])

    def close(self) -> None:
        try:
            self.sock.sendall(b"QUIT\r\n")
        except OSError:
            pass
        self.sock.close()


def auth(stack: Stack, source: str, login: str, password: str) -> int:
    """The reply code of one AUTH PLAIN from ``source``."""
    session = Session(stack, source)
    try:
        return session.auth(login, password)
    finally:
        session.close()


def simultaneous(stack: Stack, source: str, login: str, password: str, n: int) -> list[int | str]:
    """``n`` sessions from ``source`` opened together; once every one is ready for AUTH, AUTH
    is sent on all of them at once. Each one's reply code (or what went wrong)."""
    sessions: list[Session | None] = [None] * n
    codes: list[int | str] = ["no reply"] * n
    barrier = threading.Barrier(n)

    def one(i: int) -> None:
        try:
            sessions[i] = Session(stack, source)
        except Exception as e:
            codes[i] = f"session: {e!r}"
            barrier.abort()
            return
        try:
            barrier.wait(60)
            codes[i] = sessions[i].auth(login, password)
        except Exception as e:
            codes[i] = f"auth: {e!r}"

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        for s in sessions:
            if s is not None:
                s.close()
    return codes


def password_checks(stack: Stack) -> float:
    """Password hashes policy has verified (matched or not): what a guess costs it."""
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.ports.policy_http}/metrics", timeout=5) as r:
        families = text_string_to_metric_families(r.read().decode())
    samples = [s for f in families for s in f.samples if s.name == "submitd_policy_password_verifications_total"]
    assert samples, "policy exports no password verification count"
    return sum(s.value for s in samples if s.labels.get("result") in ("match", "mismatch"))
