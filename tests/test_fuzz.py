"""A seeded fuzzer for the SMTP dialog, against the real frontend: random and mutated command
sequences (control and 8-bit bytes, over-long lines, pipelining) on both ports, STARTTLS with a
command injected in the clear behind it, AUTH LOGIN with mutated, over-long and cancelled
continuation lines, and BDAT sizes that lie. Invariants: the frontend never dies; every reply is well-formed with an enhanced
status code; a malformed line never gets a 2xx; a message refused is never delivered, a
message accepted is; memory stays bounded. `make test` runs a short round; `make fuzz` a long
one (FUZZ_SESSIONS, FUZZ_SEED)."""

from __future__ import annotations

import base64
import os
import random
import re
import socket
import time

from submitd_devkit.testing.users import ALICE, ALICE_PASSWORD
from submitd_devkit.testing.smtp import insecure_context

SEED = int(os.environ.get("FUZZ_SEED", "20261202"))
SESSIONS = int(os.environ.get("FUZZ_SESSIONS", "60"))
PLAIN = base64.b64encode(f"\0{ALICE}\0{ALICE_PASSWORD}".encode()).decode()
REPLY = re.compile(rb"^(\d{3})([ -])(.*)$")
# Replies that carry no enhanced status code (RFC 2034 exempts the greeting, EHLO/HELO
# and the 334/354 intermediates).
NO_ENHANCED = {b"220", b"334", b"354"}

GOOD = [
    b"EHLO fuzz.example.test", b"HELO fuzz.example.test", b"MAIL FROM:<%s>" % ALICE.encode(),
    b"RCPT TO:<bob@example.net>", b"RSET", b"NOOP", b"HELP", b"VRFY bob", b"EXPN list", b"ETRN example.net",
    b"AUTH PLAIN " + PLAIN.encode(), b"AUTH LOGIN", b"STARTTLS", b"MAIL FROM:<%s> SIZE=100 BODY=8BITMIME" % ALICE.encode(),
    b"RCPT TO:<bob@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob@example.net", b"DATA", b"BDAT 0 LAST",
]
SCRIPT = [b"EHLO fuzz.example.test", b"AUTH PLAIN " + PLAIN.encode(), b"MAIL FROM:<%s>" % ALICE.encode(),
          b"RCPT TO:<bob@example.net>", b"DATA"]
ODD = [b"\x00", b"\r", b"\n", b"\xff", b"\xc3\xa9", b" ", b":", b"<", b">", b"=", b"\t", b"x" * 600, b"\x1b"]


class Session:
    def __init__(self, port: int, tls: bool) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock = insecure_context().wrap_socket(raw, server_hostname="localhost") if tls else raw
        self.tls = tls
        self.buf = b""
        self.replies: list[bytes] = []

    def starttls(self) -> None:
        """After a 220 to STARTTLS: whatever the server sent in the clear after it is a
        protocol violation (a reply to an injected command)."""
        assert self.buf == b"", f"plaintext after the 220 to STARTTLS: {self.buf[:80]!r}"
        self.sock = insecure_context().wrap_socket(self.sock, server_hostname="localhost")
        self.tls = True

    def drain(self, timeout: float = 0.3) -> list[bytes]:
        """Every reply that comes within ``timeout`` of the last."""
        got = []
        while (r := self.reply(timeout)) is not None:
            got.append(r)
        return got

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError:  # the server closed the session (421): the next reply() says None
            pass

    def reply(self, timeout: float = 5.0) -> bytes | None:
        """One whole reply (its last line), or None if none came (or the server closed)."""
        self.sock.settimeout(timeout)
        while True:
            while b"\r\n" not in self.buf:
                try:
                    chunk = self.sock.recv(65536)
                except (socket.timeout, OSError):
                    return None
                if not chunk:
                    return None
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            self.replies.append(line)
            if line[3:4] != b"-":
                return line

    def close(self) -> None:
        self.sock.close()


def mutate(rng: random.Random, line: bytes) -> bytes:
    out = bytearray(line)
    for _ in range(rng.randint(1, 3)):
        at = rng.randint(0, len(out))
        out[at:at] = rng.choice(ODD)
    return bytes(out)


def parts(data: bytes) -> list[bytes]:
    """The lines the server reads from ``data``: up to and including each LF."""
    return re.findall(rb"[^\n]*\n", data)


def malformed(part: bytes) -> bool:
    """An octet no command line may hold, or a line no command may be."""
    return not part.endswith(b"\r\n") or b"\r" in part[:-2] or b"\x00" in part or len(part) > 1200


WAITS_FOR_MORE = re.compile(rb"^(DATA|BDAT|AUTH|STARTTLS|QUIT)", re.IGNORECASE)
PLAIN_SCRIPT = [b"EHLO fuzz.example.test", b"STARTTLS", *SCRIPT]


def starttls_exchange(rng: random.Random, s: Session) -> bool:
    """STARTTLS, sometimes with a command pipelined behind it in the clear (a command
    injection: RFC 3207 §5 says it must be discarded). False if the session ended."""
    injected = rng.random() < 0.5
    s.send(b"STARTTLS\r\n" + (b"HELP\r\n" if injected else b""))
    r = s.reply()
    if r is None:
        return False
    if not r.startswith(b"220 "):
        assert r[:1] in (b"4", b"5"), r  # refused (already TLS, or out of place)
        if injected:
            s.reply()
        return True
    if s.tls:
        return False  # (only reached if the server started TLS twice: the next assert fails)
    s.starttls()
    s.send(b"NOOP\r\n")
    r = s.reply()
    assert r is not None and not r.startswith(b"214"), "a command injected before TLS was answered after it"
    return True


def auth_login_exchange(rng: random.Random, s: Session) -> bool:
    """AUTH LOGIN with continuation lines that may be mutated, over-long or cancelled."""
    s.send(b"AUTH LOGIN\r\n")
    r = s.reply()
    if r is None:
        return False
    for value in (ALICE.encode(), ALICE_PASSWORD.encode() if rng.random() < 0.6 else b"wrong"):
        if not r.startswith(b"334 "):
            return True
        line = base64.b64encode(value)
        roll = rng.random()
        if roll < 0.15:
            line = b"*"  # cancel
        elif roll < 0.35:
            line = mutate(rng, line)
        elif roll < 0.4:
            line = b"A" * 20_000  # longer than any continuation line may be
        lines = parts(line + b"\r\n")
        s.send(line + b"\r\n")
        for part in lines:
            r = s.reply()
            if r is None:
                return False
            if malformed(part) or part in (b"*\r\n",):
                assert r[:1] in (b"4", b"5"), (part[:80], r)
                return True
    assert r[:3] in (b"235", b"535", b"501", b"454", b"421"), r
    return True


def bdat_exchange(rng: random.Random, s: Session, marker: str) -> tuple[str, str] | None:
    """BDAT ... LAST with a size that may lie (short: the rest is read as commands; long: the
    next bytes are taken as content). HELP (214) marks where its replies end. Returns
    (marker, "accepted"|"refused"|"unknown"), or None if the session ended."""
    content = message(rng, marker)
    lie = rng.choice([0, 0, 0, -7, 5, rng.randint(-len(content), 64)])
    declared = max(0, len(content) + lie)
    s.send(b"BDAT %d LAST\r\n" % declared + content)
    if declared > len(content):
        time.sleep(0.05)
        s.send(b"y" * (declared - len(content)))
    s.send(b"HELP\r\n")
    replies = []
    while (r := s.reply()) is not None:
        replies.append(r)
        if r.startswith(b"214"):
            break
    else:
        return None
    first = replies[0]
    assert first[:1] in (b"2", b"4", b"5"), first
    if lie:
        return marker, "unknown"
    return marker, "accepted" if first.startswith(b"250 ") else "refused"


def test_fuzzed_dialog_keeps_every_invariant(make_stack):
    stack = make_stack(env={
        "frontend": {"MAX_CONNECTIONS_PER_CLIENT": "100"},
        "policy": {"AUTH_FAILURE_DELAY": "0", "AUTH_FAILURES_PER_CLIENT": "100000", "AUTH_FAILURES_PER_LOGIN": "100000"},
    })
    rng = random.Random(SEED)
    frontend = stack.procs["frontend"].pid
    rss0 = rss_kb(frontend)
    accepted, refused = set(), set()
    checked = 0
    exchanges = {"starttls": 0, "auth login": 0, "bdat": 0}
    for n in range(SESSIONS):
        implicit = n % 2 == 0  # 465, or 587 with STARTTLS
        s = Session(stack.ports.submissions if implicit else stack.ports.submission, tls=implicit)
        walk = SCRIPT if implicit else PLAIN_SCRIPT
        try:
            assert s.reply().startswith(b"220 ")
            script = 0  # a walk through a real transaction, among the random steps
            for step in range(rng.randint(3, 25)):
                kind = rng.random()
                if kind < 0.45:
                    line = walk[script % len(walk)]
                    script = script + 1 if script + 1 < len(walk) else walk.index(SCRIPT[2])  # then MAIL again
                elif kind < 0.6:
                    line = rng.choice(GOOD)
                elif kind < 0.85:
                    line = mutate(rng, rng.choice(GOOD))
                else:  # noise
                    line = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 80)))
                if line == b"STARTTLS":
                    exchanges["starttls"] += 1
                    if not starttls_exchange(rng, s):
                        break
                    continue
                if line == b"AUTH LOGIN":
                    exchanges["auth login"] += 1
                    if not auth_login_exchange(rng, s):
                        break
                    continue
                if line.startswith(b"BDAT") and rng.random() < 0.7:
                    exchanges["bdat"] += 1
                    got = bdat_exchange(rng, s, f"fuzz-{SEED}-{n}-{step}")
                    if got is None:
                        break
                    marker, outcome = got
                    {"accepted": accepted, "refused": refused}.get(outcome, set()).add(marker)
                    continue
                lines = parts(line + b"\r\n")
                if any(WAITS_FOR_MORE.match(p) for p in lines[:-1]) or re.match(rb"(STARTTLS|AUTH LOGIN|QUIT|BDAT)", lines[-1], re.I):
                    continue  # mutated exchanges of their own, mid-line: the dialog tests cover them
                s.send(line + b"\r\n")
                replies = []
                for part in lines:
                    r = s.reply()
                    if r is None:
                        break
                    replies.append(r)
                    if malformed(part):
                        checked += 1
                        assert r[:1] in (b"4", b"5"), (part[:80], r)
                if len(replies) < len(lines):
                    break  # closed (421), or waiting for more (a BDAT size that lies)
                if replies[-1][:3] == b"354":
                    marker = f"fuzz-{SEED}-{n}-{step}"
                    s.send(message(rng, marker) + b".\r\n")
                    end = s.reply()
                    if end is None:
                        break
                    (accepted if end.startswith(b"250 ") else refused).add(marker)
        finally:
            s.close()
        for line in s.replies:
            m = REPLY.match(line)
            assert m, line
            code, more, text = m.groups()
            ehlo = code == b"250" and (more == b"-" or not re.match(rb"\d\.", text))
            if code not in NO_ENHANCED and not ehlo:
                assert re.match(rb"\d\.\d{1,3}\.\d{1,3} ", text), line
    assert stack.procs["frontend"].poll() is None, "the frontend is alive"
    grown = (rss_kb(frontend) - rss0) / 1024
    assert grown < 64, f"frontend grew {grown:.0f} MB"

    def delivered() -> set[str]:
        got = b"".join(x.data for x in stack.sink.handler.messages)
        return {m for m in accepted | refused if m.encode() + b"\r\n" in got}

    deadline = time.monotonic() + 30
    while not accepted <= delivered() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert delivered() == accepted, "every message answered 250 is delivered, and no refused one"
    assert checked > 20 and accepted and refused, (checked, len(accepted), len(refused))
    assert all(exchanges.values()), exchanges
    print(f"\nfuzz seed {SEED}: {SESSIONS} sessions, {checked} malformed lines refused, {len(accepted)} messages "
          f"accepted, {len(refused)} refused, exchanges {exchanges}, frontend grew {grown:.1f} MB")


def message(rng: random.Random, marker: str) -> bytes:
    head = f"From: {ALICE}\r\nTo: bob@example.net\r\nSubject: {marker}\r\n\r\n".encode()
    lines = []
    for _ in range(rng.randint(0, 6)):
        line = bytes(rng.choice(b"abc .\t\xc3") for _ in range(rng.randint(0, 40)))
        if rng.random() < 0.15:
            line += rng.choice([b"\x00", b"\r", b"\n", b"x" * 1200])
        lines.append(line)
    body = b"".join((b"." + l if l.startswith(b".") else l) + b"\r\n" for l in lines)
    return head + body


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
