"""submitctl's Kubernetes adapter against a test double of the Kubernetes API server
(tests/kube_double.py: the chart's rendered objects, OpenAPI-validated, resourceVersion conflicts,
the pod proxy) in front of a real stack, and the pure Secret changes as data."""

from __future__ import annotations

import base64
import json
import smtplib
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest
import yaml

from kube_double import KubeApiDouble
from submitd_devkit.stack import User
from submitd_devkit.testing.ctl import run_submitctl
from submitd_devkit.testing.smtp import connect
from submitd_devkit.testing.waiting import eventually
from submitd_ctl import documents, kube
from submitd_ctl.documents import ChangeError
from test_chart import render

pytestmark = pytest.mark.timeout(180)
NS, RELEASE = "mail", "mail"
DEMO = "demo@example.test"


@pytest.fixture
def cluster(make_stack, tmp_path):
    """The chart's objects for release "mail" behind the test double; its pods are a real stack,
    whose users, DKIM and admin-token files are the Secrets' volumes."""
    docs = render({})
    mounts = {"mail-submitd-users": tmp_path / "users", "mail-submitd-dkim": tmp_path / "dkim",
              "mail-submitd-admin": tmp_path / "admin"}
    stack = make_stack(start=False, users={DEMO: User("demo passphrase", [DEMO])},
                       env={"relay": {"ADMIN_TOKEN_FILE": str(mounts["mail-submitd-admin"] / "token")}})
    stack.users_file = mounts["mail-submitd-users"] / "users.yaml"
    stack.dkim_keys_file = mounts["mail-submitd-dkim"] / "keys.yaml"
    double = KubeApiDouble(docs, NS, {"policy": stack.ports.policy_http, "rewriter": stack.ports.rewriter_http,
                                      "relay": stack.ports.relay_http, "frontend": stack.ports.frontend_http},
                           mounts=mounts)
    # The demo user in the users Secret, as an operator's first `user add` would have left it.
    users = yaml.safe_load((stack.root / "users.yaml").read_text())
    double.put_secret_files("mail-submitd-users", {"users.yaml": yaml.safe_dump(users).encode()})
    double.sync_all()
    double.start()
    stack.start()
    yield double, stack
    double.stop()


def submitctl(double, tmp_path, *args, stdin=None) -> subprocess.CompletedProcess:
    config = double.kubeconfig(tmp_path / "kubeconfig")
    return run_submitctl("--kubeconfig", str(config), "--release", RELEASE, *args, stdin=stdin, timeout=90)


def can_login(stack, user, password) -> bool:
    with connect(stack) as client:
        try:
            client.login(user, password)
            return True
        except smtplib.SMTPAuthenticationError:
            return False


def test_api_test_double_user_add_writes_the_secret_over_its_resource_version_and_waits_for_the_pods(cluster, tmp_path):
    double, stack = cluster
    before = double.objects[("Secret", "mail-submitd-users")]["metadata"]["resourceVersion"]
    out = submitctl(double, tmp_path, "user", "add", "carol@example.test", "--password-stdin",
                    stdin="carol's long passphrase\n")
    assert out.returncode == 0, out.stderr
    # One policy pod and one rewriter pod, asked through the pod proxy for the content they use.
    assert out.stdout.strip() == "user carol@example.test added (in use by 2 processes)"
    puts = [(p, h) for m, p, h in double.requests if m == "PUT"]
    assert [p for p, _ in puts] == ["/api/v1/namespaces/mail/secrets/mail-submitd-users"]
    users = yaml.safe_load(double.secret_files("mail-submitd-users")["users.yaml"])["users"]
    assert set(users) == {DEMO, "carol@example.test"}
    assert users["carol@example.test"]["password"].startswith("$argon2id$")
    assert "passphrase" not in json.dumps([h for _, h in puts]) + out.stdout + out.stderr
    assert double.objects[("Secret", "mail-submitd-users")]["metadata"]["resourceVersion"] != before
    assert can_login(stack, "carol@example.test", "carol's long passphrase")
    # The metrics went through the pod proxy without the operator's credentials.
    proxied = [p for _, p, _ in double.requests if "/proxy/" in p]
    assert "/api/v1/namespaces/mail/pods/mail-submitd-policy-5d9c7b6f4-x2x7q:8080/proxy/metrics" in proxied


def test_api_test_double_a_concurrent_change_is_merged_never_overwritten(cluster, tmp_path):
    double, stack = cluster
    hashed = yaml.safe_load(double.secret_files("mail-submitd-users")["users.yaml"])["users"][DEMO]["password"]
    done = []

    def someone_else(name):
        # Between submitctl's read and its write, another operator adds eve with kubectl.
        if name == "mail-submitd-users" and not done:
            done.append(name)
            doc = yaml.safe_load(double.secret_files(name)["users.yaml"])
            doc["users"]["eve@example.test"] = {"password": hashed}
            double.put_secret_files(name, {"users.yaml": yaml.safe_dump(doc).encode()})

    double.after_secret_get = someone_else
    out = submitctl(double, tmp_path, "user", "suspend", DEMO, "--no-wait")
    assert out.returncode == 0, out.stderr
    assert double.conflicts == 1
    users = yaml.safe_load(double.secret_files("mail-submitd-users")["users.yaml"])["users"]
    assert set(users) == {DEMO, "eve@example.test"} and users[DEMO]["suspended"] is True

    # Someone who never stops writing: submitctl gives up, says so, and wrote nothing of its own.
    double.after_secret_get = lambda name: double.put_secret_files(name, double.secret_files(name))
    out = submitctl(double, tmp_path, "user", "suspend", "eve@example.test", "--no-wait")
    assert out.returncode == 2 and "changed while this command ran" in out.stderr
    assert "suspended" not in yaml.safe_load(double.secret_files("mail-submitd-users")["users.yaml"])["users"]["eve@example.test"]


def test_api_test_double_dkim_rotate_fills_the_charts_empty_dkim_secret_and_the_rewriter_signs(cluster, tmp_path):
    double, stack = cluster
    out = submitctl(double, tmp_path, "dkim", "rotate", "example.test", "--selector", "k8s1")
    assert out.returncode == 0, out.stderr
    assert "k8s1._domainkey.example.test. IN TXT" in out.stdout and "(in use by 1 process)" in out.stdout
    files = double.secret_files("mail-submitd-dkim")
    assert set(files) == {"keys.yaml", "example.test.k8s1.pem"}
    with connect(stack) as client:
        client.login(DEMO, "demo passphrase")
        client.sendmail(DEMO, ["bob@example.net"], f"From: {DEMO}\r\nSubject: k8s\r\n\r\nhi\r\n".encode())
    [got] = stack.sink.handler.wait_for(1, 30)
    assert b"s=k8s1;" in got.data.replace(b" ", b"")


def test_api_test_double_queue_and_status_through_the_pod_proxy_with_the_admin_token_from_its_secret(cluster, tmp_path):
    double, stack = cluster
    token = double.secret_files("mail-submitd-admin")["token"].decode().strip()
    assert len(token) >= 16, "the chart's token is a real secret, not a word any output might hold"
    printed = []

    def run(*args):
        out = submitctl(double, tmp_path, *args)
        printed.append(out.stdout + out.stderr)
        return out

    out = run("queue", "totals", "-o", "json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["messages"] == 0
    proxied = [h for m, p, h in double.requests if p.endswith("/proxy/api/v1/queue/totals")]
    assert proxied and proxied[-1].get(kube.TOKEN_HEADER) == token

    out = run("status", "-o", "json")
    report = json.loads(out.stdout)
    rows = {s["name"]: s for s in report["services"]}
    assert set(rows) == {"frontend", "policy", "rewriter", "relay"}
    target = double.objects[("HorizontalPodAutoscaler", "mail-submitd-frontend")]["spec"]["metrics"][0]
    assert rows["frontend"]["autoscaler"]["metrics"] == [f"cpu 91%/{target['resource']['target']['averageUtilization']}%"]
    assert rows["frontend"]["autoscaler"]["last_scaling"]["message"].startswith("New size: 3")
    assert rows["relay"]["disruptions_allowed"] == 1 and report["queue"]["messages"] == 0
    screen = run("status").stdout
    assert "frontend" in screen and "2->3 of" in screen and "queue: 0 messages" in screen

    # A token the relay does not hold: refused, exit 2, and said so.
    double.mounts.pop("mail-submitd-admin")  # (the pod keeps its file: a token out of step)
    wrong = "not-the-relays-token-0123456789"
    double.put_secret_files("mail-submitd-admin", {"token": wrong.encode()})
    out = run("queue", "totals")
    assert out.returncode == 2 and "refused the token" in out.stderr

    # Neither token, nor the Secret's base64 of it, is in anything submitctl printed.
    for secret in (token, wrong):
        for shown in (secret, base64.b64encode(secret.encode()).decode()):
            leaks = sum(shown in text for text in printed)
            assert leaks == 0, f"a token ({shown[:4]}...) was in what {leaks} submitctl run(s) printed"


def test_api_test_double_app_passwords_with_submitctls_own_nats_user_from_the_releases_secret(cluster, tmp_path):
    # From outside the cluster NATS is reached through `kubectl port-forward` (here: the stack's
    # server on loopback); submitctl's password is read from the release's NATS Secret.
    double, stack = cluster
    double.put_secret_files("mail-submitd-nats-auth", {"submitctl": stack.nats.passwords["submitctl"].encode()})
    nats = ["--nats-url", stack.nats.service_url]
    out = submitctl(double, tmp_path, "-o", "json", "app-password", "add", DEMO, "--name", "scanner", *nats)
    assert out.returncode == 0, out.stderr
    made = json.loads(out.stdout)
    assert can_login(stack, DEMO, made["password"])
    assert ("GET", "/api/v1/namespaces/mail/secrets/mail-submitd-nats-auth") in [(m, p) for m, p, _ in double.requests]
    out = submitctl(double, tmp_path, "-o", "json", "app-password", "ls", DEMO, *nats)
    assert [r["name"] for r in json.loads(out.stdout)] == ["scanner"] and made["password"] not in out.stdout
    out = submitctl(double, tmp_path, "app-password", "revoke", DEMO, made["id"], *nats)
    assert out.returncode == 0, out.stderr
    eventually(lambda: not can_login(stack, DEMO, made["password"]), timeout=5)  # (milliseconds: test_app_passwords)
    assert can_login(stack, DEMO, "demo passphrase")


def test_no_cluster_reachable_is_exit_code_2(tmp_path):
    config = tmp_path / "kubeconfig"
    config.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "gone",
        "clusters": [{"name": "gone", "cluster": {"server": "http://127.0.0.1:9"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "gone", "context": {"cluster": "gone", "user": "u"}}]}))
    out = subprocess.run([sys.executable, "-m", "submitd_ctl", "--kubeconfig", str(config), "user", "ls"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "not reachable" in out.stderr


# -- the changes, as data --------------------------------------------------------------------

NOW = datetime(2026, 12, 3, 8, 0, tzinfo=timezone.utc)


def test_secret_data_round_trip_keeps_the_resource_version():
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s", "resourceVersion": "42"},
              "data": {"users.yaml": base64.b64encode(b"users: {}\n").decode()}}
    files = kube.secret_files(secret)
    out = kube.secret_with_files(secret, {**files, "x": b"\x00\xff"})
    assert out["metadata"]["resourceVersion"] == "42"
    assert kube.secret_files(out) == {"users.yaml": b"users: {}\n", "x": b"\x00\xff"}
    assert kube.fullname("mail") == "mail-submitd" and kube.fullname("submitd-prod") == "submitd-prod"


def test_user_changes_as_data():
    files = documents.add_user({}, "a@example.net", "$argon2id$x", ["@sales.example.net"])
    files = documents.add_user(files, "b@example.net", "$argon2id$y")
    doc = yaml.safe_load(files["users.yaml"])
    doc["aliases"] = {"team@example.net": ["a@example.net", "b@example.net"], "solo@example.net": ["a@example.net"]}
    files = {"users.yaml": yaml.safe_dump(doc).encode()}
    files = documents.set_suspended(files, "a@example.net", True)
    assert yaml.safe_load(files["users.yaml"])["users"]["a@example.net"]["suspended"] is True
    files = documents.remove_user(files, "a@example.net")
    doc = yaml.safe_load(files["users.yaml"])
    assert set(doc["users"]) == {"b@example.net"}
    assert doc["aliases"] == {"team@example.net": ["b@example.net"]}  # a shared address nobody holds goes
    with pytest.raises(ChangeError, match="exists"):
        documents.add_user(files, "b@example.net", "$argon2id$z")
    with pytest.raises(ChangeError, match="fully qualified"):
        documents.add_user(files, "c@localhost", "$argon2id$z")
    with pytest.raises(ChangeError, match="no user"):
        documents.set_password(files, "zed@example.net", "$argon2id$z")
    with pytest.raises(ValueError):  # what the policy would refuse is never written
        documents.add_user(files, "d@example.net", "")


def test_dkim_rotation_and_retirement_as_data():
    files = documents.rotate({}, "Example.NET", "rsa", NOW - timedelta(days=30), "old").files
    rotation = documents.rotate(files, "example.net", "ed25519", NOW - timedelta(days=1))
    assert rotation.selector == "s202612e"
    assert rotation.record.startswith("s202612e._domainkey.example.net. IN TXT")
    entries = {e.selector: e for e in documents.key_entries(rotation.files)}
    assert {s: e.algorithm for s, e in entries.items()} == {"old": "rsa", "s202612e": "ed25519"}
    assert documents.record_matches(rotation.files["example.net.s202612e.pem"],
                                    rotation.record.split('"')[1])
    assert not documents.record_matches(rotation.files["example.net.old.pem"], rotation.record.split('"')[1])
    assert documents.rotate(rotation.files, "example.net", "ed25519", NOW).selector == "s202612e2"
    with pytest.raises(ChangeError, match="less than 2 days"):
        documents.retire(rotation.files, "example.net", "old", NOW, timedelta(days=2))
    after = documents.retire(rotation.files, "example.net", "old", NOW, timedelta(hours=12))
    assert set(after) == {"keys.yaml", "example.net.s202612e.pem"}
    with pytest.raises(ChangeError, match="last key"):
        documents.retire(after, "example.net", "s202612e", NOW, timedelta(0))
    with pytest.raises(ChangeError, match="fully qualified"):
        documents.rotate({}, "localhost", "ed25519", NOW)
