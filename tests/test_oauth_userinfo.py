"""OAuth 2.0 opaque access tokens through the whole stack: checked at a real provider's userinfo
endpoint (oidc-provider-mock, started by the dev kit), revoked there, the provider down; and a login
no directory knows, with OAUTH_UNKNOWN_USERS=token."""

from __future__ import annotations

import smtplib
import time

import pytest

from oauth_clients import provider, provider_up  # noqa: F401 (the module's fixtures)
from oauth_clients import MESSAGE, Seen, initial, refused, smtp, token_stack
from submitd_devkit.testing.users import ALICE
from submitd_devkit.testing.waiting import eventually

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def userinfo_stack(tmp_path_factory, provider):
    yield from token_stack(tmp_path_factory, provider, "userinfo", oauth_unknown_users="token")


@pytest.mark.parametrize("mechanism", ["OAUTHBEARER", "XOAUTH2"])
def test_an_opaque_access_token_is_checked_at_userinfo(userinfo_stack, provider, mechanism):
    token = provider.tokens(ALICE).access_token
    with smtp(userinfo_stack) as client:
        assert client.auth(mechanism, Seen(mechanism, initial(mechanism, token, ALICE)))[0] == 235
    refused(userinfo_stack, mechanism, initial(mechanism, token + "x", ALICE), f"127.0.6.{len(mechanism)}")


def test_a_revoked_access_token_is_refused_and_one_in_use_stops_within_the_cache_time(userinfo_stack, provider):
    revoked, in_use = provider.tokens("dave@example.test").access_token, provider.tokens(ALICE).access_token
    with smtp(userinfo_stack) as client:
        assert client.auth("OAUTHBEARER", Seen("OAUTHBEARER", initial("OAUTHBEARER", in_use)))[0] == 235
    provider.revoke("dave@example.test")
    refused(userinfo_stack, "OAUTHBEARER", initial("OAUTHBEARER", revoked), "127.0.7.1")
    provider.revoke(ALICE)
    revoked_at = time.monotonic()

    def refused_now() -> bool:
        seen = Seen("OAUTHBEARER", initial("OAUTHBEARER", in_use))
        with smtp(userinfo_stack, "127.0.7.2") as client:
            try:
                client.auth("OAUTHBEARER", seen)
            except smtplib.SMTPAuthenticationError as error:
                return error.smtp_code == 535 and seen.challenge is not None
            return False

    eventually(refused_now, timeout=15, interval=0.5)
    assert time.monotonic() - revoked_at < 2 + 1.5, "within OAUTH_CACHE_SECONDS (2 s here) and a retry"


def test_a_login_no_directory_knows_may_send_as_itself_only_with_unknown_users_token(userinfo_stack, provider):
    userinfo_stack.sink.handler.reset()
    token = provider.tokens("erin@example.org").access_token
    with smtp(userinfo_stack) as client:
        assert client.auth("XOAUTH2", Seen("XOAUTH2", initial("XOAUTH2", token, "erin@example.org")))[0] == 235
        client.sendmail("erin@example.org", ["bob@example.net"], MESSAGE)
        with pytest.raises(smtplib.SMTPSenderRefused) as foreign:
            client.sendmail(ALICE, ["bob@example.net"], MESSAGE)
        assert foreign.value.smtp_code == 550
    [msg] = userinfo_stack.sink.handler.wait_for(1, 20)
    assert msg.mail_from == "erin@example.org"


def test_the_provider_down_is_454_never_535(userinfo_stack, provider):
    token = provider.tokens(ALICE).access_token
    provider.stop()
    with smtp(userinfo_stack) as client:
        with pytest.raises(smtplib.SMTPAuthenticationError) as error:
            client.auth("OAUTHBEARER", Seen("OAUTHBEARER", initial("OAUTHBEARER", token)))
        assert (error.value.smtp_code, error.value.smtp_error[:5]) == (454, b"4.7.0")
    log = (userinfo_stack.root / "log" / "policy.log").read_text()
    assert "token not checked" in log and token not in log, "logged, without the token"
