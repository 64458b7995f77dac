"""submitctl --local against a real stack, as a new user meets it after `make run`: users added,
suspended and removed while the services run, a DKIM key rotated and retired, the queue looked
at and acted on, the status screen and an end-to-end check."""

from __future__ import annotations

import json
import shutil
import smtplib
import subprocess
import sys

import dkim as dkimpy
import pytest
import yaml
from cryptography.hazmat.primitives import serialization

from submitd_devkit.dns import DnsServer
from submitd_devkit.sink import Sink
from submitd_devkit.stack import Stack, User
from submitd_devkit.testing.ctl import submitctl
from submitd_devkit.testing.plugin import assert_within_grants, stack_options
from submitd_devkit.testing.smtp import connect
from submitd_devkit.testing.waiting import eventually
from submitd_rewriter import dkim as ours

pytestmark = pytest.mark.timeout(240)
DEMO = "demo@example.test"


@pytest.fixture(scope="module")
def local_stack(tmp_path_factory):
    """One stack for the module, laid out as `make run` leaves it (admin token, DKIM keys)."""
    sink = Sink().start()
    root = tmp_path_factory.mktemp("stack")
    token = root / "admin-token"
    token.write_text("local-token\n")
    # Hashed at the default cost, as `make run` does (the users submitctl adds are too).
    stack = Stack(root, **stack_options(
        next_hop=("127.0.0.1", sink.port), users={DEMO: User("demo passphrase", [DEMO, "@example.test"])},
        env={"relay": {"ADMIN_TOKEN_FILE": str(token), "RETRY_SCHEDULE": "[3600]"}}, argon2=None))
    stack.sink = sink
    stack.make_dkim_keys("example.test")
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()
        sink.stop()
    assert_within_grants(stack)


@pytest.fixture
def site(local_stack):
    """The module's stack, its next hop emptied and taking everything again."""
    local_stack.sink.handler.reset()
    return local_stack


def login(stack, user: str, password: str) -> smtplib.SMTP:
    client = connect(stack)
    try:
        client.login(user, password)
    except BaseException:
        client.close()
        raise
    return client


def message(sender: str, subject: str) -> bytes:
    return f"From: {sender}\r\nTo: bob@example.net\r\nSubject: {subject}\r\n\r\nhello\r\n".encode()


def test_a_user_added_with_submitctl_submits_at_once_and_suspend_and_rm_take_effect(site):
    new = "carol@example.test"
    out = submitctl(site, "user", "add", new, "--password-stdin", stdin="carol's long passphrase\n")
    assert out.returncode == 0, out.stderr
    assert "user carol@example.test added (in use by 2 processes)" in out.stdout
    # The password is nowhere in what the tool printed, and the file holds an argon2id hash.
    assert "passphrase" not in out.stdout + out.stderr
    entry = yaml.safe_load((site.root / "users.yaml").read_text())["users"][new]
    assert entry["password"].startswith("$argon2id$")
    if shutil.which("swaks"):
        swaks = subprocess.run(
            ["swaks", "--server", f"127.0.0.1:{site.ports.submission}", "--tls",
             "--auth-user", new, "--auth-password", "carol's long passphrase", "--from", new, "--to", "bob@example.net"],
            capture_output=True, text=True, timeout=60)
        assert swaks.returncode == 0 and "250 2.0.0 Ok: queued as" in swaks.stdout, swaks.stdout[-800:]
    else:
        with login(site, new, "carol's long passphrase") as client:
            client.sendmail(new, ["bob@example.net"], message(new, "first"))
    [got] = site.sink.handler.wait_for(1, 30)
    assert got.mail_from == new

    listing = submitctl(site, "user", "ls", "-o", "json")
    rows = {r["login"]: r for r in json.loads(listing.stdout)}
    assert set(rows) == {DEMO, new} and rows[new]["suspended"] is False
    assert "argon2" not in listing.stdout.replace('"scheme": "argon2id"', "")  # no hash printed
    assert rows[new]["source"] == "file", "policy says which directory each login comes from"
    shown = submitctl(site, "user", "show", DEMO)
    assert shown.returncode == 0, shown.stderr
    assert "source:     file" in shown.stdout and "send_as:    @example.test, demo@example.test" in shown.stdout
    missing = submitctl(site, "user", "show", "nobody@example.test")
    assert missing.returncode != 0 and "no directory knows nobody@example.test" in missing.stderr

    # Suspended while logged in: the next MAIL is refused; AUTH is refused from then on.
    client = login(site, new, "carol's long passphrase")
    out = submitctl(site, "user", "suspend", new)
    assert out.returncode == 0, out.stderr
    code, text = client.mail(new)
    assert (code, text) == (550, b"5.7.1 Account suspended")
    client.quit()
    with pytest.raises(smtplib.SMTPAuthenticationError):
        login(site, new, "carol's long passphrase")
    assert submitctl(site, "user", "resume", new).returncode == 0
    login(site, new, "carol's long passphrase").quit()

    out = submitctl(site, "user", "passwd", new, "--password-stdin", stdin="a new long passphrase\n")
    assert out.returncode == 0, out.stderr
    with pytest.raises(smtplib.SMTPAuthenticationError):
        login(site, new, "carol's long passphrase")
    login(site, new, "a new long passphrase").quit()

    assert submitctl(site, "user", "rm", new).returncode == 0
    with pytest.raises(smtplib.SMTPAuthenticationError):
        login(site, new, "a new long passphrase")
    # Refusals say why, with exit code 1, and change nothing.
    out = submitctl(site, "user", "rm", new)
    assert (out.returncode, out.stderr.strip()) == (1, "submitctl: no user 'carol@example.test'")
    out = submitctl(site, "user", "add", DEMO, "--password-stdin", stdin="whatever long one\n")
    assert out.returncode == 1 and "exists" in out.stderr
    out = submitctl(site, "user", "add", "dave@example.test", "--password-stdin", stdin="short\n")
    assert out.returncode == 1 and "at least 8" in out.stderr


def test_dkim_rotate_signs_with_the_new_selector_check_compares_dns_and_retire_waits(site):
    out = submitctl(site, "dkim", "rotate", "example.test", "--selector", "next", "--algorithm", "ed25519")
    assert out.returncode == 0, out.stderr
    assert "next._domainkey.example.test. IN TXT" in out.stdout and "in use by 1 process" in out.stdout
    keys = {e["selector"]: e for e in yaml.safe_load((site.root / "dkim" / "keys.yaml").read_text())["keys"]}
    assert set(keys) == {"submitd-rsa", "submitd-ed25519", "next"}

    def pem(selector):
        return serialization.load_pem_private_key((site.root / "dkim" / keys[selector]["key_file"]).read_bytes(), None)

    records = {f"{s}._domainkey.example.test.".encode(): ours.txt_value(pem(s)) for s in keys}
    with login(site, DEMO, "demo passphrase") as client:
        client.sendmail(DEMO, ["bob@example.net"], message(DEMO, "signed"))
    [got] = site.sink.handler.wait_for(1, 30)
    signatures = [v for k, v in _fields(got.data) if k.lower() == b"dkim-signature"]
    assert sorted(_tag(s, b"s") for s in signatures) == [b"next", b"submitd-ed25519", b"submitd-rsa"]
    for i in range(len(signatures)):
        assert dkimpy.DKIM(got.data).verify(idx=i, dnsfunc=lambda name, timeout=5: records.get(name))

    # DNS: the old selectors published, the new one not yet.
    # (zone-file text: the record's quoted strings, as `dkim rotate` printed them for the new one)
    zone = {f"{s}._domainkey.example.test": {"TXT": [ours.txt_record(pem(s), "example.test", s).split("( ")[1][:-2]]}
            for s in ("submitd-rsa", "submitd-ed25519")}
    dns = DnsServer(zone).start()
    try:
        out = submitctl(site, "dkim", "check", "example.test", "--nameserver", "127.0.0.1", "--dns-port", str(dns.port),
                        "-o", "json")
    finally:
        dns.stop()
    assert out.returncode == 1
    assert {r["name"]: r["record"] for r in json.loads(out.stdout)} == {
        "submitd-rsa._domainkey.example.test": "ok", "submitd-ed25519._domainkey.example.test": "ok",
        "next._domainkey.example.test": "missing"}

    # The new key is minutes old: retiring the old one is refused until it has signed for the grace.
    out = submitctl(site, "dkim", "retire", "example.test", "submitd-rsa")
    assert out.returncode == 1 and "less than 2 days" in out.stderr
    out = submitctl(site, "dkim", "retire", "example.test", "submitd-rsa", "--grace", "0")
    assert out.returncode == 0, out.stderr
    assert not any(p.name.endswith("submitd-rsa.pem") for p in (site.root / "dkim").iterdir())
    site.sink.handler.reset()
    with login(site, DEMO, "demo passphrase") as client:
        client.sendmail(DEMO, ["bob@example.net"], message(DEMO, "after retire"))
    [got] = site.sink.handler.wait_for(1, 30)
    selectors = sorted(_tag(v, b"s") for k, v in _fields(got.data) if k.lower() == b"dkim-signature")
    assert selectors == [b"next", b"submitd-ed25519"]


def _fields(data: bytes) -> list[tuple[bytes, bytes]]:
    head = data.split(b"\r\n\r\n", 1)[0]
    out = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and out:
            out[-1] = (out[-1][0], out[-1][1] + b"\r\n" + line)
        else:
            name, _, value = line.partition(b":")
            out.append((name, value))
    return out


def _tag(signature: bytes, tag: bytes) -> bytes:
    for part in signature.replace(b"\r\n", b"").split(b";"):
        name, _, value = part.strip().partition(b"=")
        if name == tag:
            return value.strip()
    raise AssertionError(f"no {tag!r} in {signature!r}")


def test_queue_commands_on_real_queued_mail(site):
    site.sink.handler.rcpt_replies["later@example.net"] = "450 4.2.0 not now"
    ids = []
    with login(site, DEMO, "demo passphrase") as client:
        for n in range(3):
            client.mail(DEMO)
            client.rcpt("later@example.net")
            code, text = client.data(message(DEMO, f"queued {n}"))
            assert code == 250
            ids.append(text.decode().rsplit(" ", 1)[1])

    def listed():
        out = submitctl(site, "queue", "ls", "-o", "json")
        assert out.returncode == 0, out.stderr
        return {m["id"]: m for m in json.loads(out.stdout)["messages"]}

    eventually(lambda: set(listed()) == set(ids) and all(m["state"] == "deferred" for m in listed().values()), 30)
    table = submitctl(site, "queue", "ls")
    assert table.stdout.splitlines()[0].split()[:4] == ["ID", "STATE", "AGE", "SIZE"]
    assert all(i in table.stdout for i in ids) and "450 4.2.0 not now" in table.stdout

    shown = yaml.safe_load(submitctl(site, "queue", "show", ids[0]).stdout)
    assert shown["recipients"] == ["later@example.net"] and shown["attempts"] == 1
    totals = json.loads(submitctl(site, "queue", "totals", "-o", "json").stdout)
    assert totals["messages"] == 3 and totals["deferred"] == 3

    # retry: the next hop takes it now
    del site.sink.handler.rcpt_replies["later@example.net"]
    out = submitctl(site, "queue", "retry", ids[0])
    assert out.returncode == 0 and f"{ids[0]}: retry" in out.stdout, out.stdout + out.stderr
    [got] = site.sink.handler.wait_for(1, 30)
    assert b"queued 0" in got.data
    # bounce: the sender gets a report (delivered to the sink, which takes everything now)
    out = submitctl(site, "queue", "bounce", ids[1])
    assert out.returncode == 0 and "report" in out.stdout, out.stdout + out.stderr
    msgs = site.sink.handler.wait_for(2, 30)
    assert msgs[1].rcpt_tos == [DEMO] and b"multipart/report" in msgs[1].data
    # delete: gone without a report
    assert submitctl(site, "queue", "delete", ids[2]).returncode == 0
    eventually(lambda: listed() == {}, 15)
    out = submitctl(site, "queue", "show", ids[2])
    assert (out.returncode, out.stderr.strip()) == (1, f"submitctl: no queued message {ids[2]}")
    assert len(site.sink.handler.messages) == 2


def test_status_and_check_on_the_local_stack(site):
    out = submitctl(site, "status")
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert [ln.split()[:2] for ln in lines if ln.split()[:1] in (["frontend"], ["policy"], ["rewriter"], ["relay"])] == [
        ["frontend", "1/1"], ["policy", "1/1"], ["rewriter", "1/1"], ["relay", "1/1"]]
    assert any(ln.startswith("queue: 0 messages") for ln in lines)
    out = submitctl(site, "check", "--user", DEMO, "--password-stdin", "--to", "bob@example.net", "--insecure",
                    stdin="demo passphrase\n")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "STARTTLS, AUTH as demo@example.test, submitted; queued as" in out.stdout
    [got] = site.sink.handler.wait_for(1, 30)
    assert b"Subject: submitd check" in got.data
    # The relay down: status says so and exits 1.
    site.stop_service("relay")
    try:
        out = submitctl(site, "status")
        assert out.returncode == 1 and "relay      0/1" in out.stdout, out.stdout
        report = json.loads(submitctl(site, "status", "-o", "json").stdout)
        assert {s["name"]: s["ready"] for s in report["services"]}["relay"] == 0
        assert "error" in report["queue"]
    finally:
        site.start_service("relay")
        site.wait_ready("relay")


def test_nothing_to_talk_to_is_exit_code_2(tmp_path):
    out = subprocess.run([sys.executable, "-m", "submitd_ctl", "--local", str(tmp_path), "user", "ls"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "run.json not found" in out.stderr


def test_the_helm_test_pods_check_submits_verifies_the_certificate_by_name_and_asks_the_relay(site, tmp_path):
    """submitd_common.smtpcheck, as the chart's submission test pod runs it inside a cluster:
    dialling an address (a Service's) while checking the certificate against the public name."""
    password = tmp_path / "password"
    password.write_text("demo passphrase\n")

    def check(*extra):
        return subprocess.run(
            [sys.executable, "-m", "submitd_common.smtpcheck", f"--server=127.0.0.1:{site.ports.submission}",
             f"--user={DEMO}", f"--password-file={password}", "--to=bob@example.net",
             f"--admin-url=http://127.0.0.1:{site.ports.relay_http}", f"--admin-token-file={site.root / 'admin-token'}",
             *extra], capture_output=True, text=True, timeout=60)

    out = check("--tls-name=localhost", f"--cafile={site.cert}")
    assert out.returncode == 0, out.stderr
    assert "STARTTLS, AUTH as demo@example.test, submitted; queued as" in out.stdout
    assert "the relay" in out.stdout
    [got] = site.sink.handler.wait_for(1, 30)
    assert b"Subject: submitd check" in got.data
    out = check("--tls-name=mail.example.org", f"--cafile={site.cert}")
    assert out.returncode == 1 and "certificate" in out.stderr.lower(), out.stderr
    password.write_text("wrong\n")
    out = check("--insecure")
    assert out.returncode == 1 and "check failed: 535" in out.stderr, out.stderr


def test_policy_users_api_refuses_without_the_admin_token(site):
    """Who may send as what is the operator's to read: no token, or a wrong one, is refused."""
    import urllib.error
    import urllib.request

    url = f"http://127.0.0.1:{site.ports.policy_http}/api/v1/users/{DEMO}"
    for headers in ({}, {"Authorization": "Bearer not-the-token"}, {"X-Submitd-Admin-Token": "local-token-x"}):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10)
        refused.value.close()
        assert refused.value.code == 401
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Authorization": "Bearer local-token"}),
                                timeout=10) as answer:
        shown = json.loads(answer.read())
    assert shown["login"] == DEMO and shown["source"] == "file" and "password" not in json.dumps(shown)
