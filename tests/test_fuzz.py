"""A seeded fuzzer for the SMTP dialog, against the real frontend: random and mutated command
sequences (control and 8-bit bytes, over-long lines, pipelining) on both ports, STARTTLS with a
command injected in the clear behind it, AUTH LOGIN with mutated, over-long and cancelled
continuation lines, and BDAT sizes that lie. The fuzzer keeps its own model of the session
(TLS, HELO or EHLO, logged in, a transaction and its recipients, errors so far) and checks each
command sent as written, and each message's content, against the exact reply that model says the
server owes; a mutated line changes the model only as its reply says it was taken. Invariants
besides: the frontend never dies; every reply is well-formed with an enhanced status code; a
malformed line never gets a 2xx; a second STARTTLS is refused; a message refused is never
delivered, a message accepted is; memory stays bounded. `make test` runs a short round; `make fuzz` a long
one (FUZZ_SESSIONS, FUZZ_SEED)."""

from __future__ import annotations

import base64
import os
import random
import re
import socket
import time
from dataclasses import dataclass

from submitd_devkit.testing.users import ALICE, ALICE_PASSWORD
from submitd_devkit.testing.smtp import insecure_context
from submitd_frontend import replies
from submitd_frontend.wire import AUTH_LINE_LIMIT

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
MAX_ERRORS = 20  # the frontend's default: the 20th 5xx is followed by 421 and the end
AUTH_REQUIRED = b"530 5.7.0 Authentication required"  # policy's word for MAIL before AUTH
QUEUED = re.compile(rb"250 2\.0\.0 Ok: queued as \S+")


def exact(reply: str | bytes) -> re.Pattern:
    return re.compile(re.escape(reply.encode() if isinstance(reply, str) else reply))


@dataclass
class Model:
    """What the server knows of the session, as the fuzzer tracks it."""

    tls: bool
    helo: bytes | None = None  # b"HELO" or b"EHLO"
    user: bool = False
    transaction: bool = False
    recipients: int = 0

    def expect(self, line: bytes) -> re.Pattern:
        """The reply (its last line) the server owes to ``line``, a command of GOOD as written."""
        verb, _, arg = line.partition(b" ")
        if verb == b"EHLO":
            return exact(b"250 AUTH PLAIN LOGIN" if self.tls else b"250 STARTTLS")
        if verb == b"HELO":
            return re.compile(rb"250 [\w.-]+")
        if verb == b"AUTH":
            refusal = self.auth_refusal()
            return exact(refusal) if refusal else exact(replies.AUTH_OK)
        if verb == b"MAIL":
            if not self.helo:
                return exact(replies.NEED_HELO)
            if self.transaction:
                return exact(replies.SENDER_GIVEN)
            if b" SIZE=" in arg and self.helo != b"EHLO":
                return exact(replies.MAIL_SYNTAX)  # parameters need EHLO
            return exact(replies.SENDER_OK if self.user else AUTH_REQUIRED)
        if verb == b"RCPT":
            if not self.transaction:
                return exact(replies.NEED_MAIL)
            if b" NOTIFY=" in arg and self.helo != b"EHLO":
                return exact(replies.RCPT_SYNTAX)
            return exact(replies.RECIPIENT_OK if self.recipients < 100 else replies.TOO_MANY_RECIPIENTS)
        if verb == b"DATA":
            refusal = self.data_refusal()
            return exact(refusal or replies.START_DATA)
        fixed = {b"RSET": replies.OK, b"NOOP": replies.OK, b"HELP": replies.HELP, b"VRFY": replies.VRFY,
                 b"EXPN": replies.EXPN, b"ETRN": replies.UNRECOGNIZED}
        return exact(fixed[verb])

    def auth_refusal(self) -> str | None:
        return (replies.NEED_EHLO if self.helo != b"EHLO" else replies.AUTH_NEEDS_TLS if not self.tls
                else replies.ALREADY_AUTHENTICATED if self.user else replies.AUTH_IN_TRANSACTION if self.transaction
                else None)

    def data_refusal(self) -> str | None:
        """DATA's or a first BDAT's refusal before any content, if any."""
        return replies.NEED_MAIL if not self.transaction else replies.NO_RECIPIENTS if not self.recipients else None

    def observe(self, part: bytes, reply: bytes) -> None:
        """What a command line (any, mutated or not) did, as its reply says."""
        verb = part.split(b" ", 1)[0].rstrip(b"\r\n").upper()
        if reply.startswith(b"235 "):
            self.user = True
        elif not reply.startswith(b"250 "):
            return  # refused, or an intermediate reply: nothing changed
        elif verb in (b"EHLO", b"HELO"):
            self.helo, self.transaction, self.recipients = verb, False, 0
        elif verb == b"MAIL":
            self.transaction, self.recipients = True, 0
        elif verb == b"RCPT":
            self.recipients += 1
        elif verb == b"RSET":
            self.transaction, self.recipients = False, 0

    def message_ended(self) -> None:
        """A DATA or BDAT LAST was answered after its content: the transaction is over."""
        self.transaction, self.recipients = False, 0


def content_replies(content: bytes) -> re.Pattern:
    """The reply a message's content (unstuffed) must get: queued, or refused for a defect it has."""
    problems = set()
    crlf = content.replace(b"\r\n", b"")
    if b"\x00" in content:
        problems.add(replies.NUL)
    if b"\r" in crlf or b"\n" in crlf:
        problems.add(replies.BARE_CR_LF)
    if any(len(line) > 998 for line in content.split(b"\r\n")):
        problems.add(replies.TEXT_LINE_TOO_LONG)
    if not problems:
        return QUEUED
    return re.compile(b"|".join(re.escape(p.encode()) for p in sorted(problems)))


class Session:
    def __init__(self, port: int, tls: bool) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock = insecure_context().wrap_socket(raw, server_hostname="localhost") if tls else raw
        self.model = Model(tls=tls)
        self.buf = b""
        self.replies: list[bytes] = []
        self.errors = 0
        self.closed = False  # by the server, after its 421
        self.checked = 0  # replies compared with what the model expected

    def starttls(self) -> None:
        """After a 220 to STARTTLS: whatever the server sent in the clear after it is a
        protocol violation (a reply to an injected command)."""
        assert self.buf == b"", f"plaintext after the 220 to STARTTLS: {self.buf[:80]!r}"
        self.sock = insecure_context().wrap_socket(self.sock, server_hostname="localhost")
        self.model = Model(tls=True)  # RFC 3207 §4.2: the server forgets what came before

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError:  # the server closed the session (421): the next reply() says None
            pass

    def reply(self, expected: re.Pattern | None = None, timeout: float = 10.0) -> bytes | None:
        """One whole reply (its last line), checked against ``expected`` when given; None once
        the server has said 421 and closed. A reply that does not come is a failure."""
        if self.closed:
            return None
        line = self._line(timeout)
        if expected is not None:
            assert expected.fullmatch(line), f"expected {expected.pattern!r}, got {line!r} ({self.model})"
            self.checked += 1
        if line[:1] == b"5":
            self.errors += 1
            if self.errors == MAX_ERRORS:
                assert self._line(timeout) == replies.TOO_MANY_ERRORS.encode(), "the 20th error closes the session"
                self.closed = True
        elif line[:3] == b"421":
            self.closed = True
        return line

    def _line(self, timeout: float) -> bytes:
        self.sock.settimeout(timeout)
        while True:
            while b"\r\n" not in self.buf:
                try:
                    chunk = self.sock.recv(65536)
                except socket.timeout:
                    raise AssertionError(f"no reply within {timeout} s ({self.model})") from None
                assert chunk, f"the server closed the session without a 421 ({self.model})"
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
    # On 587 before the handshake STARTTLS is taken whatever came before; once TLS is on (465,
    # or after a first STARTTLS) it is refused, and the injected command answered in turn.
    r = s.reply(exact(replies.TLS_ACTIVE if s.model.tls else replies.TLS_READY))
    if r is None:
        return False
    if s.model.tls:
        return not injected or s.reply(exact(replies.HELP)) is not None
    s.starttls()
    s.send(b"NOOP\r\n")
    return s.reply(exact(replies.OK)) is not None  # not the 214 of a command injected before TLS


def auth_login_exchange(rng: random.Random, s: Session) -> bool:
    """AUTH LOGIN with continuation lines that may be mutated, over-long or cancelled."""
    s.send(b"AUTH LOGIN\r\n")
    refusal = s.model.auth_refusal()
    r = s.reply(exact(refusal) if refusal else exact(b"334 " + base64.b64encode(b"Username:")))
    if r is None or refusal:
        return r is not None
    exact_values = True  # every continuation sent as written so far
    password_right = rng.random() < 0.6
    for value, prompt in ((ALICE.encode(), None), (ALICE_PASSWORD.encode() if password_right else b"wrong", b"Password:")):
        if prompt is not None:
            if not r.startswith(b"334 "):
                return True  # refused after the login's line (it was mutated)
            assert r == b"334 " + base64.b64encode(prompt), r
        line = base64.b64encode(value)
        roll = rng.random()
        if roll < 0.15:
            line = b"*"  # cancel
        elif roll < 0.35:
            line = mutate(rng, line)
        elif roll < 0.4:
            line = b"A" * 20_000  # longer than any continuation line may be
        exact_values = exact_values and line == base64.b64encode(value)
        lines = parts(line + b"\r\n")
        s.send(line + b"\r\n")
        for part in lines:
            expected = None
            if part == b"*\r\n":
                expected = exact(b"501 5.0.0 Authentication cancelled")
            elif len(part) > AUTH_LINE_LIMIT:
                expected = exact(replies.AUTH_LINE_TOO_LONG)
            r = s.reply(expected)
            if r is None:
                return False
            if malformed(part) or part == b"*\r\n":
                assert r[:1] in (b"4", b"5"), (part[:80], r)
                return True
            if r.startswith(b"235 "):
                s.model.user = True
    if exact_values:
        assert r == (replies.AUTH_OK.encode() if password_right else b"535 5.7.8 Authentication credentials invalid"), r
    else:
        assert r[:3] in (b"235", b"535", b"501", b"454"), r
    return True


def bdat_exchange(rng: random.Random, s: Session, marker: str) -> tuple[str, str] | None:
    """BDAT ... LAST with a size that may lie (short: the rest is read as commands; long: the
    next bytes are taken as content). HELP (214) marks where its replies end. Returns
    (marker, "accepted"|"refused"|"unknown"), or None if the session ended."""
    content = message(rng, marker)
    lie = rng.choice([0, 0, 0, -7, 5, rng.randint(-len(content), 64)])
    declared = max(0, len(content) + lie)
    s.send(b"BDAT %d LAST\r\n" % declared + content)
    padding = b"y" * (declared - len(content))
    if padding:
        time.sleep(0.05)
        s.send(padding)
    s.send(b"HELP\r\n")
    # Refused before the content if there is no transaction or no recipient; else the content
    # that was read decides (a short one: what was declared, which may end mid-line).
    read = (content + padding)[:declared]
    refusal = s.model.data_refusal()
    if refusal:
        expected = exact(refusal)
    elif read.endswith(b"\r\n") or not read:
        expected = content_replies(read)
    else:
        defects = content_replies(read[:read.rfind(b"\n") + 1]).pattern
        last = read[read.rfind(b"\n") + 1:]
        ending = replies.BARE_CR_LF if b"\r" in last else replies.NO_CRLF_AT_END
        expected = re.compile((b"" if defects == QUEUED.pattern else defects + b"|") + re.escape(ending.encode()))
    first = s.reply(expected)
    if first is None:
        return None
    s.model.message_ended()  # BDAT LAST ends the transaction, whatever the answer
    # What a short size left unread is read as command lines: none of them is a command.
    leftover = parts(content[declared:])
    for part in leftover:
        r = s.reply()
        if r is None:
            return None
        assert r[:1] in (b"5", b"4"), (part[:80], r)
    if s.reply(exact(replies.HELP)) is None:
        return None
    if lie:
        return marker, "unknown"
    return marker, "accepted" if first.startswith(b"250 ") else "refused"


def data_exchange(rng: random.Random, s: Session, marker: str) -> tuple[str, str] | None:
    """After a 354: a message, and the reply its content owes."""
    content = message(rng, marker)
    s.send(content + b".\r\n")
    unstuffed = re.sub(rb"(^|\r\n)\.", rb"\1", content)
    end = s.reply(content_replies(unstuffed))
    if end is None:
        return None
    s.model.message_ended()
    return marker, "accepted" if end.startswith(b"250 ") else "refused"


def test_fuzzed_dialog_keeps_every_invariant(make_stack):
    stack = make_stack(env={
        "frontend": {"MAX_CONNECTIONS_PER_CLIENT": "100"},
        "policy": {"AUTH_FAILURE_DELAY": "0", "AUTH_FAILURES_PER_CLIENT": "100000", "AUTH_FAILURES_PER_LOGIN": "100000"},
    })
    rng = random.Random(SEED)
    frontend = stack.procs["frontend"].pid
    rss0 = rss_kb(frontend)
    accepted, refused = set(), set()
    checked = predicted = 0
    exchanges = {"starttls": 0, "auth login": 0, "bdat": 0}
    for n in range(SESSIONS):
        implicit = n % 2 == 0  # 465, or 587 with STARTTLS
        s = Session(stack.ports.submissions if implicit else stack.ports.submission, tls=implicit)
        walk = SCRIPT if implicit else PLAIN_SCRIPT
        try:
            assert s.reply(re.compile(rb"220 \S+ ESMTP submitd"))
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
                marker = f"fuzz-{SEED}-{n}-{step}"
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
                    got = bdat_exchange(rng, s, marker)
                    if got is None:
                        break
                    marker, outcome = got
                    {"accepted": accepted, "refused": refused}.get(outcome, set()).add(marker)
                    continue
                lines = parts(line + b"\r\n")
                if any(WAITS_FOR_MORE.match(p) for p in lines[:-1]) or re.match(rb"(STARTTLS|AUTH LOGIN|QUIT|BDAT)", lines[-1], re.I):
                    continue  # mutated exchanges of their own, mid-line: the dialog tests cover them
                s.send(line + b"\r\n")
                r = None
                for part in lines:
                    expected = s.model.expect(line) if line in GOOD else None
                    r = s.reply(expected)
                    if r is None:
                        break
                    if malformed(part):
                        checked += 1
                        assert r[:1] in (b"4", b"5"), (part[:80], r)
                    s.model.observe(part, r)
                if r is None:
                    break  # closed (421)
                if r.startswith(b"334 "):  # a mutated AUTH PLAIN lost its initial response
                    s.send(b"*\r\n")
                    if s.reply(exact(b"501 5.0.0 Authentication cancelled")) is None:
                        break
                elif r[:3] == b"354":
                    got = data_exchange(rng, s, marker)
                    if got is None:
                        break
                    (accepted if got[1] == "accepted" else refused).add(marker)
        finally:
            s.close()
            predicted += s.checked
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
    assert predicted > 10 * SESSIONS, f"only {predicted} replies were checked against the model"
    assert all(exchanges.values()), exchanges
    print(f"\nfuzz seed {SEED}: {SESSIONS} sessions, {predicted} replies as the model said, {checked} malformed "
          f"lines refused, {len(accepted)} messages accepted, {len(refused)} refused, exchanges {exchanges}, "
          f"frontend grew {grown:.1f} MB")


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
