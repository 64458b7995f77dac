"""Bearer tokens for the OAuth tests: the provider and the stacks that trust it, the clients' first
messages (OAUTHBEARER, XOAUTH2), an smtplib authobject that answers RFC 7628's error challenge, and
why policy refused a token (from its log)."""

from __future__ import annotations

import base64
import json
import smtplib

import pytest

from submitd_devkit.oidc import OidcProvider
from submitd_devkit.stack import User
from submitd_devkit.testing.plugin import module_stack
from submitd_devkit.testing.smtp import insecure_context
from submitd_devkit.testing.users import ALICE, ALICE_PASSWORD

SHARED = "shared@example.test"  # alice may act as it
DEMO = "demo@example.test"  # the README's example user
USERS = {
    ALICE: User(ALICE_PASSWORD, [ALICE, "@alias.example.test"], extra={"act_as": [SHARED]}),
    DEMO: User("demo passphrase", [DEMO]),
    "carol@example.test": User("carol's password", ["carol@example.test"], extra={"suspended": True}),
}
MESSAGE = b"From: alice@example.test\r\nTo: bob@example.net\r\nSubject: token\r\n\r\nsent with a token\r\n"
# Short waits: the failure delay is measured below; failures counted per client (5 here), so each test
# that is refused comes from a loopback address of its own.
POLICY = {"AUTH_FAILURE_DELAY": "0.3", "AUTH_FAILURES_PER_CLIENT": "5", "OAUTH_JWKS_MIN_REFRESH_SECONDS": "0",
          "OAUTH_LEEWAY_SECONDS": "1", "OAUTH_CACHE_SECONDS": "2"}


def initial(mechanism: str, token: str, authzid: str = "", padding: str = "") -> str:
    """The client's first message; ``padding``: a host key as long as wanted (RFC 7628 allows it)."""
    if mechanism == "XOAUTH2":
        return f"user={authzid}\x01auth=Bearer {token}\x01\x01"
    host = f"host={padding}\x01" if padding else ""
    return f"n,{'a=' + authzid if authzid else ''},\x01{host}auth=Bearer {token}\x01\x01"


class Seen:
    """An smtplib authobject that records the server's error challenge and answers it as RFC 7628
    (OAUTHBEARER: %x01) or Google (XOAUTH2: an empty line) say."""

    def __init__(self, mechanism: str, message: str) -> None:
        self.mechanism, self.message, self.challenge = mechanism, message, None

    def __call__(self, challenge: bytes | None = None) -> str:
        if challenge is None:
            return self.message
        self.challenge = json.loads(challenge)
        return "\x01" if self.mechanism == "OAUTHBEARER" else ""


def smtp(stack, source: str | None = None) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", stack.ports.submission, timeout=30,
                          source_address=(source, 0) if source else None)
    client.ehlo("client.example.test")
    client.starttls(context=insecure_context())
    client.ehlo("client.example.test")
    return client


def refused(stack, mechanism: str, message: str, source: str) -> dict:
    """AUTH with a token that must fail: the error challenge policy sent, after the 535."""
    seen = Seen(mechanism, message)
    with smtp(stack, source) as client:
        with pytest.raises(smtplib.SMTPAuthenticationError) as error:
            client.auth(mechanism, seen)
        assert (error.value.smtp_code, error.value.smtp_error[:5]) == (535, b"5.7.8"), error.value
        assert client.noop()[0] == 250, "the session goes on"
    assert seen.challenge is not None, "a 334 with the JSON error came before the 535"
    return seen.challenge


def reasons(stack) -> dict[str, str]:
    """Why policy refused each client's last token, from its log (which names no token)."""
    found = {}
    for line in (stack.root / "log" / "policy.log").read_text().splitlines():
        entry = json.loads(line) if line.startswith("{") else {}
        if entry.get("msg") == "token refused":
            found[entry["peer"]] = entry["reason"]
    return found


def b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def token_stack(tmp_path_factory, provider: OidcProvider, mode: str, **more):
    """A whole stack whose policy trusts ``provider`` (``mode``), for a module-scoped fixture."""
    yield from module_stack(tmp_path_factory.mktemp("stack"), users=USERS,
                            env={"policy": POLICY | provider.policy_settings(mode, **more)})


# The provider every OAuth test module shares the shape of: one per module, and running again
# after a test that stopped it.
@pytest.fixture(scope="module")
def provider(tmp_path_factory):
    oidc = OidcProvider(tmp_path_factory.mktemp("oidc")).start()
    yield oidc
    oidc.stop()


@pytest.fixture(autouse=True)
def provider_up(provider):
    """Whatever a test did to the provider, the next one finds it running."""
    yield
    if provider.proc is None:
        provider.start()
