"""The rewriter through the real frontend: signatures that independent verifiers accept,
header checks answered in the SMTP session, and bounded memory for large messages."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import dkim as dkimpy
import pytest
import yaml

from submitd_devkit.stack import User
from submitd_devkit.testing.users import ALICE, ALICE_PASSWORD
from submitd_devkit.testing.smtp import logged_in
from submitd_devkit.testing.trace import without_received
from submitd_devkit.testing.waiting import eventually
from submitd_rewriter import dkim

pytestmark = pytest.mark.timeout(180)
HEADER = f"From: Alice <{ALICE}>\r\nTo: bob@example.net\r\nSubject: signed\r\n".encode()


class Keys:
    """DKIM keys for example.test on disk, as an operator's mounted Secret would hold them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.file = root / "dkim.yaml"
        self.keys: dict[str, object] = {}
        self.entries: list[dict] = []

    def add(self, selector: str, algorithm: str, domain: str = "example.test") -> None:
        key = dkim.generate_key(algorithm)
        path = self.root / f"{selector}.pem"
        path.write_bytes(dkim.private_pem(key))
        self.keys[f"{selector}._domainkey.{domain}."] = key
        self.entries.append({"domain": domain, "selector": selector, "key_file": str(path)})
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump({"keys": self.entries}))
        tmp.replace(self.file)

    def dns(self, name: bytes, timeout: float = 5) -> bytes:
        key = self.keys.get(name.decode())
        return dkim.txt_value(key) if key else b""

    def opendkim_results(self, message: bytes) -> list[str]:
        """What opendkim (a C verifier, in its offline test mode) says of each signature."""
        assert shutil.which("opendkim"), "opendkim is not installed (.ci/run installs it with apt)"
        (self.root / "msg.eml").write_bytes(message)
        (self.root / "keys.txt").write_text(
            "".join(f"{name.rstrip('.')} {dkim.txt_value(key).decode()}\n" for name, key in self.keys.items())
        )
        (self.root / "opendkim.conf").write_text(
            f"Mode v\nTestPublicKeys {self.root / 'keys.txt'}\nSyslog no\nAlwaysAddARHeader yes\nAuthservID test\n"
        )
        out = subprocess.run(
            ["opendkim", "-x", str(self.root / "opendkim.conf"), "-t", str(self.root / "msg.eml"), "-vv"],
            capture_output=True, text=True, timeout=60,
        )
        return re.findall(r"dkim=(\w+)", out.stdout + out.stderr)


@pytest.fixture
def keys(tmp_path) -> Keys:
    k = Keys(tmp_path / "dkim")
    k.root.mkdir()
    k.add("rsa2026", "rsa")
    k.add("ed2026", "ed25519")
    return k


@pytest.fixture
def signing_stack(make_stack, keys):
    users = {ALICE: User(ALICE_PASSWORD, [ALICE, "@alias.example.test"])}
    return make_stack(users=users, env={"rewriter": {"DKIM_KEYS_FILE": str(keys.file)}})


def verify_all(message: bytes, keys: Keys) -> list[bool]:
    d = dkimpy.DKIM(message)
    header = message.split(b"\r\n\r\n", 1)[0]  # not the signatures of a message it carries
    count = len(re.findall(rb"^DKIM-Signature:", header, flags=re.MULTILINE | re.IGNORECASE))
    results = []
    for i in range(count):
        try:
            results.append(bool(d.verify(idx=i, dnsfunc=keys.dns)))
        except dkimpy.ValidationError:
            results.append(False)
    return results


def test_signatures_verify_with_dkimpy_and_opendkim(signing_stack, keys):
    body = b"Hello  \t world\r\n\r\n.dot line\r\ncaf\xc3\xa9\r\n"
    with logged_in(signing_stack) as client:
        client.sendmail(ALICE, ["bob@example.net"], HEADER + b"\r\n" + body)
    [msg] = signing_stack.sink.handler.wait_for(1, 20)
    assert msg.data.startswith(b"DKIM-Signature: v=1; a=")
    assert msg.data.endswith(b"\r\n\r\n" + body), "the body leaves byte for byte"
    assert verify_all(msg.data, keys) == [True, True]
    assert keys.opendkim_results(msg.data) == ["pass", "pass"]
    tampered = msg.data.replace(b"Hello", b"Jello")
    assert verify_all(tampered, keys) == [False, False]
    assert keys.opendkim_results(tampered) == ["fail", "fail"]


def test_new_selector_signs_without_restart(signing_stack, keys):
    keys.add("next2027", "ed25519")
    deadline = time.monotonic() + 10
    while True:
        with logged_in(signing_stack) as client:
            client.sendmail(ALICE, ["bob@example.net"], HEADER + b"\r\nrotation\r\n")
        msg = signing_stack.sink.handler.wait_for(1, 20)[-1]
        if b"s=next2027" in msg.data:
            break
        assert time.monotonic() < deadline, "the added key never signed"
        signing_stack.sink.handler.reset()
        time.sleep(0.5)
    assert verify_all(msg.data, keys) == [True, True, True]


def test_header_errors_answer_in_the_session(stack):
    with logged_in(stack) as client:
        client.mail(ALICE)
        client.rcpt("bob@example.net")
        code, text = client.data(HEADER.replace(b"bob@example.net", b"bob@intranet") + b"\r\nx\r\n")
        assert (code, text[:5]) == (554, b"5.6.0") and b"To header" in text
        client.mail(ALICE)
        client.rcpt("bob@example.net")
        code, text = client.data(b"From: ceo@example.test\r\nSubject: x\r\n\r\nx\r\n")
        assert (code, text[:5]) == (550, b"5.7.1")
        assert client.noop()[0] == 250, "the session goes on"
        client.sendmail(ALICE, ["bob@example.net"], HEADER + b"\r\nfine\r\n")
    assert len(stack.sink.handler.wait_for(1, 20)) == 1


def test_a_resent_from_the_user_does_not_own_is_550_571(stack):
    # RFC 6409 §6.3 for a message the user resends: Resent-From is checked as From is.
    resent = b"Resent-Date: Mon, 07 Dec 2026 12:00:00 +0000\r\nResent-From: %s\r\n"
    with logged_in(stack) as client:
        client.mail(ALICE)
        client.rcpt("bob@example.net")
        code, text = client.data(resent % b"ceo@example.test" + HEADER + b"\r\nresent\r\n")
        assert (code, text) == (550, f"5.7.1 Resent-From header address <ceo@example.test> not owned by user {ALICE}".encode())
        client.sendmail(ALICE, ["bob@example.net"], resent % b"sales@alias.example.test" + HEADER + b"\r\nresent\r\n")
    [msg] = stack.sink.handler.wait_for(1, 20)
    assert b"\r\nResent-From: sales@alias.example.test\r\n" in msg.data


def test_a_from_nested_past_the_address_parsers_depth_is_554_not_451(stack):
    # Before: the parser's RecursionError left the rewriter as a 451 (try again, for ever).
    with logged_in(stack) as client:
        client.mail(ALICE)
        client.rcpt("bob@example.net")
        code, text = client.data(b"From: " + b"(" * 600 + ALICE.encode() + b"\r\nSubject: x\r\n\r\nx\r\n")
        assert (code, text) == (554, b"5.6.0 Invalid address in From header: nested too deep")
        client.sendmail(ALICE, ["bob@example.net"], HEADER + b"\r\nfine\r\n")
    assert len(stack.sink.handler.wait_for(1, 20)) == 1


def test_more_than_1000_header_fields_is_552_534_and_the_session_goes_on(stack):
    # MAX_HEADER_FIELDS (1,000 by default) counts the fields the client sent.
    thousand = HEADER + b"".join(b"X-Tag-%d: t\r\n" % i for i in range(997))
    with logged_in(stack) as client:
        client.mail(ALICE)
        client.rcpt("bob@example.net")
        code, text = client.data(thousand + b"X-One-Too-Many: t\r\n\r\nbody\r\n")
        assert (code, text) == (552, b"5.3.4 Too many header fields (more than 1000)")
        client.sendmail(ALICE, ["bob@example.net"], thousand + b"\r\nbody\r\n")
    [msg] = stack.sink.handler.wait_for(1, 20)
    assert thousand in msg.data and b"X-One-Too-Many" not in msg.data


def test_sender_is_added_for_an_alias(stack):
    with logged_in(stack) as client:
        client.sendmail("sales@alias.example.test", ["bob@example.net"],
                        b"From: Sales <sales@alias.example.test>\r\nSubject: x\r\n\r\nbody\r\n")
    [msg] = stack.sink.handler.wait_for(1, 20)
    assert f"\r\nSender: {ALICE}\r\n".encode() in msg.data


def peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def test_40mb_message_streams_end_to_end_signed_with_flat_memory(make_stack, keys):
    # Issue 13: no service holds the message. Peak RSS (VmHWM) of each service before and
    # after a 40 MB message goes from the client to the next hop, signed.
    stack = make_stack(env={"rewriter": {"DKIM_KEYS_FILE": str(keys.file)},
                            "frontend": {"MAX_MESSAGE_SIZE": str(50 << 20)},
                            "relay": {"COMMAND_TIMEOUT": "60"}})
    line = b"0123456789abcdefghijklmnopqrstuvwxyz" * 2 + b"\r\n"
    body = line * ((40 << 20) // len(line))
    services = ("frontend", "rewriter", "relay")
    before = {name: peak_rss_kb(stack.procs[name].pid) for name in services}
    with logged_in(stack) as client:
        client.sendmail(ALICE, ["bob@example.net"], HEADER + b"\r\n" + body)
    [msg] = stack.sink.handler.wait_for(1, 120)
    grown = {name: (peak_rss_kb(stack.procs[name].pid) - before[name]) / 1024 for name in services}
    print(f"\n{len(body) / 2**20:.0f} MB message, peak RSS growth: "
          + ", ".join(f"{name} {mb:.1f} MB" for name, mb in grown.items()), file=sys.stderr)
    assert msg.data.endswith(b"\r\n\r\n" + body), "byte for byte at the next hop"
    assert verify_all(msg.data, keys) == [True, True]
    assert keys.opendkim_results(msg.data) == ["pass", "pass"]
    for name, mb in grown.items():
        assert mb < 24, f"{name} grew {mb:.0f} MB: its memory must not follow the message size"


def test_dkim_key_commands(tmp_path):
    out = tmp_path / "k.pem"
    gen = subprocess.run([sys.executable, "-m", "submitd_rewriter", "dkim-keygen", "example.test", "sel1", "--algorithm", "ed25519",
                          "--out", str(out)], capture_output=True, text=True, check=True)
    assert gen.stdout.startswith('sel1._domainkey.example.test. IN TXT ( "v=DKIM1; k=ed25519; p=')
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    again = subprocess.run([sys.executable, "-m", "submitd_rewriter", "dkim-txt", "example.test", "sel1", str(out)],
                           capture_output=True, text=True, check=True)
    assert again.stdout == gen.stdout
    rsa = subprocess.run([sys.executable, "-m", "submitd_rewriter", "dkim-keygen", "example.test", "sel2", "--out", str(tmp_path / "r.pem")],
                         capture_output=True, text=True, check=True)
    assert "k=rsa; p=MIIBIjAN" in rsa.stdout.replace('" "', "")


def test_rewrite_rules_reach_the_envelope_and_headers(make_stack, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"rules": [{"match": "jru@example.test", "replace": "J.Random.User@example.test"}]}))
    stack = make_stack(users={ALICE: User(ALICE_PASSWORD, [ALICE, "jru@example.test"])},
                       env={"rewriter": {"REWRITE_RULES_FILE": str(rules)}})
    with logged_in(stack) as client:
        client.sendmail("jru@example.test", ["bob@example.net"],
                        b"From: Jay <jru@example.test>\r\nSubject: rules\r\n\r\nbody\r\n")
    [msg] = stack.sink.handler.wait_for(1, 20)
    assert msg.mail_from == "J.Random.User@example.test", "the envelope change travelled back to the frontend"
    assert without_received(msg.data).startswith(b"From: Jay <J.Random.User@example.test>\r\n")


def test_rewriter_actions_are_counted(stack):
    import urllib.request

    def counter(name: str, label: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{stack.ports.rewriter_http}/metrics", timeout=5) as r:
            text = r.read().decode()
        m = re.search(rf'^{name}{{{label}}} ([0-9.e+]+)$', text, flags=re.MULTILINE)
        return float(m.group(1)) if m else 0.0

    before = counter("submitd_rewriter_actions_total", 'action="date_added"')
    refused = counter("submitd_rewriter_refused_total", 'code="550"')
    with logged_in(stack) as client:
        for _ in range(3):
            client.sendmail(ALICE, ["bob@example.net"], HEADER + b"\r\nno date\r\n")
        client.mail(ALICE)
        client.rcpt("bob@example.net")
        assert client.data(b"From: ceo@example.test\r\n\r\nx\r\n")[0] == 550
    assert counter("submitd_rewriter_actions_total", 'action="date_added"') == before + 3
    assert counter("submitd_rewriter_refused_total", 'code="550"') == refused + 1


def test_8bit_text_is_made_7bit_before_signing(make_stack, keys):
    import email

    stack = make_stack(env={"rewriter": {"DKIM_KEYS_FILE": str(keys.file), "SEVEN_BIT": "true"}})
    body = "Grüße aus Köln\r\n".encode()
    with logged_in(stack) as client:
        client.sendmail(ALICE, ["bob@example.net"], HEADER + b"Content-Type: text/plain; charset=utf-8\r\n\r\n" + body,
                        mail_options=["BODY=8BITMIME"])
    [msg] = stack.sink.handler.wait_for(1, 20)
    assert msg.data.isascii() and b"Content-Transfer-Encoding: quoted-printable\r\n" in msg.data
    assert "BODY=8BITMIME" not in msg.mail_options, "the relay no longer declares an 8-bit body"
    assert email.message_from_bytes(msg.data).get_payload(decode=True) == body
    assert verify_all(msg.data, keys) == [True, True], "signed after the conversion"


def bounce_stack(make_stack, keys):
    """Reports come from postmaster@example.test, the domain the keys sign for."""
    users = {ALICE: User(ALICE_PASSWORD, [ALICE])}
    return make_stack(users=users, env={"rewriter": {"DKIM_KEYS_FILE": str(keys.file)},
                                        "relay": {"BOUNCE_FROM": "postmaster@example.test", "RETRY_SCHEDULE": "[0.5]"}})


@pytest.mark.parametrize("size", [2_000, 1_500_000], ids=["inline", "streamed"])
def test_reports_are_dkim_signed_like_any_message_of_the_domain(make_stack, keys, size):
    # A report with the whole original (RET=FULL): small, it goes inline; 1.5 MB, it streams
    # through the rewriter into the Object Store. Either way both signatures verify.
    from relay_helpers import parse_report, reports

    stack = bounce_stack(make_stack, keys)
    stack.sink.handler.rcpt_replies["nobody@example.net"] = "550 5.1.1 no such user"
    original = HEADER.replace(b"bob@", b"nobody@") + b"\r\n" + b"a line of the original message\r\n" * (size // 32)
    with logged_in(stack) as client:
        client.sendmail(ALICE, ["nobody@example.net"], original, mail_options=["RET=FULL"])
    eventually(lambda: reports(stack.sink), 30)
    (report,) = reports(stack.sink)
    assert report.data.startswith(b"DKIM-Signature: ")
    assert verify_all(report.data, keys) == [True, True]
    _, blocks, returned = parse_report(report)
    assert blocks[1]["Status"] == "5.1.1"
    assert returned.get_payload()[0]["Subject"] == "signed"
    assert report.data.count(b"a line of the original message") == size // 32


def test_a_report_waits_for_the_rewriter_and_is_not_lost(make_stack, keys):
    from relay_helpers import reports

    stack = bounce_stack(make_stack, keys)
    stack.sink.handler.rcpt_replies["nobody@example.net"] = "550 5.1.1 no such user"
    stack.stop_service("relay")
    with logged_in(stack) as client:
        client.sendmail(ALICE, ["nobody@example.net", "bob@example.net"], HEADER + b"\r\nreport me\r\n")
    stack.stop_service("rewriter")  # the message is queued; its bounce will find no rewriter
    stack.start_service("relay")
    eventually(lambda: [m for m in stack.sink.handler.messages if m.rcpt_tos == ["bob@example.net"]], 30)
    time.sleep(2)
    assert reports(stack.sink) == [], "no unsigned report while the rewriter is away"
    stack.start_service("rewriter")
    eventually(lambda: reports(stack.sink), 30)
    time.sleep(1)
    (report,) = reports(stack.sink)
    assert verify_all(report.data, keys) == [True, True]
    assert [m.rcpt_tos for m in stack.sink.handler.messages if m.mail_from] == [["bob@example.net"]], \
        "bob got the message once: the report's retry did not deliver it again"
