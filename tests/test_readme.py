"""The README's commands and examples, run as a new user would run them (with this test's ports
and files in place of `make run`'s). The Kubernetes and image commands are exercised by the chart
tests; no cluster or registry is reachable here."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from submitd_devkit.stack import User
from submitd_common.users import UserDB, verify_password
from submitd_rewriter.rules import load_rules

ROOT = Path(__file__).resolve().parent.parent
DEMO = "demo@example.test"


def block(containing: str) -> str:
    """The one fenced block of the README that contains ``containing``."""
    found = [b for b in re.findall(r"```\w*\n(.*?)```", (ROOT / "README.md").read_text(), re.S) if containing in b]
    assert len(found) == 1, f"README blocks with {containing!r}: {len(found)}"
    return found[0]


@pytest.fixture
def demo(make_stack, tmp_path):
    """A stack with the demo user, and a working directory laid out as `make run` leaves it."""
    var = tmp_path / "var"
    var.mkdir()
    (var / "demo-password").write_text("demo passphrase\n")
    (var / "admin-token").write_text("readme-token\n")
    stack = make_stack(start=False, users={DEMO: User("demo passphrase", [DEMO])},
                       env={"relay": {"ADMIN_TOKEN_FILE": str(var / "admin-token")}})
    stack.make_dkim_keys("example.test")  # as `make run` makes them
    stack.start()
    return stack, tmp_path


def test_the_swaks_and_python_examples_submit_mail(demo):
    stack, cwd = demo
    port = str(stack.ports.submission)
    swaks = block("swaks --server").replace("127.0.0.1:2587", f"127.0.0.1:{port}")
    out = subprocess.run(["bash", "-c", swaks], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "250 2.0.0 Ok: queued as" in out.stdout, out.stdout[-1500:] + out.stderr[-500:]
    python = block("import smtplib, ssl").replace("2587", port)
    out = subprocess.run([sys.executable, "-c", python], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-1500:]
    got = stack.sink.handler.wait_for(2, 20)
    assert [m.mail_from for m in got] == [DEMO, DEMO]
    for m in got:
        assert re.search(rb"(?mi)^Message-ID: <", m.data) and re.search(rb"(?m)^Date: ", m.data), m.data[:400]
        # "two DKIM signatures (RSA and Ed25519)", as the README says the message arrives
        assert sorted(re.findall(rb"(?m)^DKIM-Signature: v=1; a=([\w-]+);", m.data)) == [b"ed25519-sha256", b"rsa-sha256"], \
            m.data[:600]


def test_the_queue_admin_curl_example_answers(demo):
    assert shutil.which("curl"), "curl is not installed (.ci/run installs it)"
    stack, cwd = demo
    curl = block("curl -H").replace("8082", str(stack.ports.relay_http))
    out = subprocess.run(["bash", "-c", curl], cwd=cwd, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and '"messages"' in out.stdout, out.stdout + out.stderr


def test_the_hash_command_and_the_users_file_example_work_together(tmp_path):
    command = block("submitd-policy hash-password")
    out = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    hashed = out.stdout.strip()
    assert hashed.startswith("$argon2id$") and verify_password(hashed, "a long passphrase")
    example = block("aliases:")
    assert "$argon2id$v=19$m=65536,t=3,p=4$..." in example
    path = tmp_path / "users.yaml"
    path.write_text(example.replace("$argon2id$v=19$m=65536,t=3,p=4$...", hashed))
    db = UserDB.load(str(path))
    alice = db.users["alice@example.net"]
    assert verify_password(alice.password_hash, "a long passphrase")
    assert alice.may_send_as("bob@sales.example.net", db.aliases) and alice.may_send_as("sales@example.net", db.aliases)
    assert not alice.suspended


def test_the_rewrite_rules_example_loads_and_rewrites(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text(block("J.Random.User@example.net"))
    rules = load_rules(str(path))
    assert rules.rewrite("jru@example.net") == "J.Random.User@example.net"
    assert rules.rewrite("anne@east.sales.example.net") == "anne@example.net"
    assert rules.rewrite("anne@example.net") is None
    assert rules.headers and not rules.recipients
    assert yaml.safe_load(path.read_text())["headers"] is True


def test_the_submitctl_local_example_runs_against_the_stack(make_stack, tmp_path):
    stack = make_stack(start=False, users={DEMO: User("demo passphrase", [DEMO, "@example.test"])},
                       env={"relay": {"ADMIN_TOKEN_FILE": str(tmp_path / "admin-token")}})
    (tmp_path / "admin-token").write_text("readme-token\n")
    stack.make_dkim_keys("example.test")
    stack.start()
    commands = block("submitctl --local var user add").replace("--local var", f"--local {stack.root}")
    out = subprocess.run(["bash", "-ec", commands], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-1500:] + out.stderr[-1500:]
    assert "user you@example.test added (in use by 2 processes)" in out.stdout
    assert "._domainkey.example.test. IN TXT" in out.stdout and "queue: 0 messages" in out.stdout
    assert verify_password(UserDB.load(str(stack.users_file)).users["you@example.test"].password_hash, "a long passphrase")
