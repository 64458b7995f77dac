"""OAuth 2.0 bearer tokens through the whole stack, from a real OpenID Connect provider (oidc-provider-mock,
started by the dev kit): its signed ID tokens checked in policy with its published keys (jwt mode), sent
by Python's smtplib and by curl with OAUTHBEARER (RFC 7628) and XOAUTH2. A refused token gets RFC 7628's
exchange: a 334 with the JSON error, the client's dummy response, then 535 5.7.8. (The opaque tokens of
userinfo mode: test_oauth_userinfo.py.)"""

from __future__ import annotations

import base64
import json
import re
import shlex
import shutil
import smtplib
import subprocess
import sys
import time
from pathlib import Path

import pytest
from joserfc import jwt as jose_jwt
from joserfc.jwk import RSAKey

from oauth_clients import provider, provider_up  # noqa: F401 (the module's fixtures)
from oauth_clients import DEMO, MESSAGE, SHARED, Seen, b64, initial, reasons, refused, smtp, token_stack
from submitd_devkit.testing.users import ALICE
from submitd_devkit.testing.waiting import eventually
from submitd_policy.settings import Settings

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def jwt_stack(tmp_path_factory, provider):
    yield from token_stack(tmp_path_factory, provider, "jwt")


@pytest.mark.parametrize("mechanism", ["OAUTHBEARER", "XOAUTH2"])
def test_a_signed_id_token_from_the_provider_sends_mail_as_the_users_rights_allow(jwt_stack, provider, mechanism):
    jwt_stack.sink.handler.reset()
    token = provider.tokens(ALICE).id_token
    with smtp(jwt_stack) as client:
        assert "AUTH PLAIN LOGIN OAUTHBEARER XOAUTH2" in client.ehlo_resp.decode()
        code, text = client.auth(mechanism, Seen(mechanism, initial(mechanism, token, ALICE)))
        assert (code, text[:5]) == (235, b"2.7.0")
        client.sendmail("someone@alias.example.test", ["bob@example.net"], MESSAGE)
        with pytest.raises(smtplib.SMTPSenderRefused) as foreign:
            client.sendmail("boss@example.org", ["bob@example.net"], MESSAGE)
        assert (foreign.value.smtp_code, foreign.value.smtp_error[:5]) == (550, b"5.7.1"), \
            "the rights are the login's in the directory (the users file): not any address"
    [msg] = jwt_stack.sink.handler.wait_for(1, 20)
    assert msg.mail_from == "someone@alias.example.test"


def test_refused_tokens_get_the_rfc_7628_exchange_then_535(jwt_stack, provider):
    issuer = provider.issuer
    expected = {"status": "invalid_token", "openid-configuration": f"{issuer}/.well-known/openid-configuration"}
    real = provider.tokens(ALICE).id_token
    head, payload, signature = real.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    stranger = RSAKey.generate_key(2048, auto_kid=True)  # a key the provider never published
    bad = {
        "another audience": provider.tokens(ALICE, client_id="another-client").id_token,
        "an unknown key": jose_jwt.encode({"alg": "RS256", "kid": stranger.kid}, claims, stranger),
        "tampered": ".".join([head, b64(claims | {"email": "dave@example.test"}), signature]),
        "unsigned": ".".join([b64({"alg": "none"}), payload, ""]),
        "no directory knows its login": provider.tokens("zed@example.test").id_token,
        "a suspended account": provider.tokens("carol@example.test").id_token,
        "an opaque token in jwt mode": provider.tokens(ALICE).access_token,
    }
    for n, (what, token) in enumerate(bad.items()):
        assert refused(jwt_stack, "OAUTHBEARER", initial("OAUTHBEARER", token), f"127.0.1.{n + 1}") == expected, what
    assert [reasons(jwt_stack)[f"127.0.1.{n + 1}"] for n in range(len(bad))] == [
        "issued for another audience", "signed by no key of the provider's", "signed by no key of the provider's",
        "signature algorithm not allowed", "no such account", "suspended", "not a signed JWT"]
    log = (jwt_stack.root / "log" / "policy.log").read_text()
    assert not any(token in log or token[-40:] in log for token in bad.values()), "no token logged, nor its end"
    assert refused(jwt_stack, "XOAUTH2", initial("XOAUTH2", bad["tampered"], ALICE), "127.0.1.99") == {
        "status": "401", "schemes": "Bearer"}, "XOAUTH2: Google's form"


def test_the_authzid_must_be_the_tokens_login_or_one_it_may_act_as(jwt_stack, provider):
    token = provider.tokens(ALICE).id_token
    for n, (mechanism, authzid) in enumerate([("OAUTHBEARER", "bob@example.test"), ("XOAUTH2", "bob@example.test")]):
        refused(jwt_stack, mechanism, initial(mechanism, token, authzid), f"127.0.2.{n + 1}")
    with smtp(jwt_stack) as client:
        assert client.auth("OAUTHBEARER", Seen("OAUTHBEARER", initial("OAUTHBEARER", token, SHARED)))[0] == 235
    with smtp(jwt_stack) as client:
        assert client.auth("XOAUTH2", Seen("XOAUTH2", initial("XOAUTH2", token, "ALICE@example.test")))[0] == 235


def test_a_refusal_waits_auth_failure_delay_and_counts_against_the_client(jwt_stack, provider, raw):
    token = provider.tokens(ALICE).id_token
    forged = token[:-8] + ("AAAAAAAA" if not token.endswith("AAAAAAAA") else "BBBBBBBB")
    client = raw(jwt_stack.ports.submissions, tls=True, source="127.0.3.1")
    client.reply()
    client.send(b"EHLO client.example.test\r\n")
    client.reply()
    for _ in range(5):  # AUTH_FAILURES_PER_CLIENT
        started = time.monotonic()
        client.send(b"AUTH OAUTHBEARER " + base64.b64encode(initial("OAUTHBEARER", forged).encode()) + b"\r\n")
        challenge = client.reply()
        assert time.monotonic() - started >= 0.3, "answered AUTH_FAILURE_DELAY after the token came, not sooner"
        assert challenge.startswith("334 ") and json.loads(base64.b64decode(challenge[4:]))["status"] == "invalid_token"
        client.send(b"AQ==\r\n")
        assert client.reply() == "535 5.7.8 Authentication credentials invalid"
    client.send(b"AUTH OAUTHBEARER " + base64.b64encode(initial("OAUTHBEARER", token).encode()) + b"\r\n")
    assert client.reply().startswith("421 4.7.0"), "even a good token, from a client past its limit"


def test_a_12_kb_initial_response_is_read_and_a_13_kb_one_is_500_556(jwt_stack, provider, raw):
    token = provider.tokens(ALICE).id_token
    def line(size: int) -> bytes:
        pad = "h" * ((size - 20 - 4 * len(initial("OAUTHBEARER", token, padding="x")) // 3) * 3 // 4)
        return b"AUTH OAUTHBEARER " + base64.b64encode(initial("OAUTHBEARER", token, padding="x" + pad).encode()) + b"\r\n"
    small, big = line(12 * 1024), line(13 * 1024)
    assert 12_000 < len(small) <= 12288 < 13_000 < len(big)
    client = raw(jwt_stack.ports.submissions, tls=True)
    client.reply()
    client.send(b"EHLO client.example.test\r\n")
    client.reply()
    client.send(big)
    assert client.reply() == "500 5.5.6 Authentication Exchange line is too long"
    client.send(b"NOOP\r\n")
    assert client.reply().startswith("250"), "the session goes on"
    client.send(small)
    assert client.reply() == "235 2.7.0 Authentication successful", "read whole: the token at its end was checked"


def test_tokens_of_a_provider_restarted_with_a_new_key_are_accepted_and_the_old_keys_go(jwt_stack, provider):
    before = provider.tokens(ALICE).id_token
    with smtp(jwt_stack) as client:
        assert client.auth("OAUTHBEARER", Seen("OAUTHBEARER", initial("OAUTHBEARER", before)))[0] == 235
    provider.restart()  # a new signing key; policy holds the old one
    after, unused = provider.tokens(ALICE).id_token, provider.tokens(ALICE).id_token
    assert after.split(".")[2] != before.split(".")[2]
    with smtp(jwt_stack) as client:
        assert client.auth("OAUTHBEARER", Seen("OAUTHBEARER", initial("OAUTHBEARER", after)))[0] == 235, \
            "a token no held key verifies makes policy read the keys again"
    provider.restart()
    with smtp(jwt_stack) as client:
        assert client.auth("OAUTHBEARER", Seen("OAUTHBEARER", initial("OAUTHBEARER", provider.tokens(ALICE).id_token)))[0] == 235
    # A token of the key the provider no longer publishes, never seen before: refused.
    refused(jwt_stack, "OAUTHBEARER", initial("OAUTHBEARER", unused), "127.0.4.1")
    assert reasons(jwt_stack)["127.0.4.1"] == "signed by no key of the provider's"


def test_an_expired_token_is_refused(jwt_stack, provider):
    provider.restart(token_lifetime=3)
    try:
        token = provider.tokens(ALICE).id_token
        with smtp(jwt_stack) as client:  # accepted while it holds (and cached until its exp)
            assert client.auth("OAUTHBEARER", Seen("OAUTHBEARER", initial("OAUTHBEARER", token)))[0] == 235
        exp = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "==="))["exp"]
        eventually(lambda: time.time() > exp + 1.2, timeout=10)  # past exp and the leeway (1 s here)
        assert refused(jwt_stack, "OAUTHBEARER", initial("OAUTHBEARER", token), "127.0.5.1")["status"] == "invalid_token"
    finally:
        provider.restart(token_lifetime=3600)
    assert reasons(jwt_stack)["127.0.5.1"] == "expired"


def test_jwt_mode_keeps_working_while_the_provider_is_down_once_it_has_the_keys(jwt_stack, provider):
    first, token = provider.tokens(ALICE).id_token, provider.tokens(ALICE).id_token
    with smtp(jwt_stack) as client:  # policy holds the provider's current key
        assert client.auth("OAUTHBEARER", Seen("OAUTHBEARER", initial("OAUTHBEARER", first)))[0] == 235
    provider.stop()
    with smtp(jwt_stack) as client:  # a token never seen: checked with the key in hand
        assert client.auth("OAUTHBEARER", Seen("OAUTHBEARER", initial("OAUTHBEARER", token)))[0] == 235
    stranger = RSAKey.generate_key(2048, auto_kid=True)
    payload = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "==="))
    with smtp(jwt_stack, "127.0.8.1") as client:  # a key policy does not hold, and no provider to ask
        with pytest.raises(smtplib.SMTPAuthenticationError) as error:
            client.auth("OAUTHBEARER", Seen("OAUTHBEARER", initial(
                "OAUTHBEARER", jose_jwt.encode({"alg": "RS256", "kid": stranger.kid}, payload, stranger))))
        assert error.value.smtp_code == 454, "the provider may have rotated its keys: a temporary failure"


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is installed by .ci/run")
def test_curl_sends_with_a_bearer_token(jwt_stack, provider, tmp_path):
    """A third party's client: curl's SMTP with --oauth2-bearer, which takes OAUTHBEARER when it is
    offered (curl 7.88 does so even when asked for XOAUTH2) and sends its message after an empty 334
    (a token does not fit the 512 octets curl allows itself on the AUTH line)."""
    jwt_stack.sink.handler.reset()
    message = tmp_path / "message.eml"
    message.write_bytes(MESSAGE)
    token = provider.tokens(ALICE).id_token
    result = subprocess.run(
        ["curl", "--verbose", "--insecure", f"smtps://127.0.0.1:{jwt_stack.ports.submissions}",
         "--user", f"{ALICE}:", "--oauth2-bearer", token,
         "--mail-from", ALICE, "--mail-rcpt", "bob@example.net", "--upload-file", str(message)],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "> AUTH OAUTHBEARER" in result.stderr.splitlines()
    [msg] = jwt_stack.sink.handler.wait_for(1, 20)
    assert msg.mail_from == ALICE and b"sent with a token" in msg.data


def readme_block(containing: str) -> str:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    [found] = [b for b in re.findall(r"```\w*\n(.*?)```", readme, re.S) if containing in b]
    return found


def test_the_readme_examples_configure_policy_and_send_mail(jwt_stack, provider, tmp_path, monkeypatch):
    for line in readme_block("SUBMITD_POLICY_OAUTH_ISSUER").splitlines():
        name, _, value = line.partition("=")
        monkeypatch.setenv(name, " ".join(shlex.split(value)))
    settings = Settings(users_file="users.yaml")
    assert (settings.oauth_mode, settings.oauth_audience) == ("jwt", ["submitd"]), "the Keycloak example is valid"
    jwt_stack.sink.handler.reset()
    python = readme_block("submitd_devkit.oidc").replace('"9400"', f'"{provider.port}"')
    python = python.replace("2587", str(jwt_stack.ports.submission))
    result = subprocess.run([sys.executable, "-c", python], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-1500:]
    [msg] = jwt_stack.sink.handler.wait_for(1, 20)
    assert msg.mail_from == DEMO and b"sent with a token" in msg.data
