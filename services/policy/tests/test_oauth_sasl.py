"""The token mechanisms' messages (RFC 7628 OAUTHBEARER, XOAUTH2) and their error exchange, without
a server: what a client sends → the token and the authorization identity, or 501 (SaslMalformed)."""

from __future__ import annotations

import json

import pytest

from submitd_policy.oauth import token_mechanisms
from submitd_policy.oauth.mechanisms import MECHANISMS, OAuthBearer, XOAuth2
from submitd_policy.sasl import SaslMalformed
from submitd_policy.settings import Settings

TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhIn0.c2ln-_~+/=="


@pytest.mark.parametrize("message, authzid", [
    # RFC 7628 §4.1's example, with host and port
    (f"n,a=user@example.com,\x01host=server.example.com\x01port=143\x01auth=Bearer {TOKEN}\x01\x01", "user@example.com"),
    (f"n,,\x01auth=Bearer {TOKEN}\x01\x01", ""),
    (f"y,,\x01auth=bearer  {TOKEN}\x01\x01", ""),  # the scheme in any case, more than one space
    (f"n,a=a=2Cb=3Dc@example.com,\x01auth=Bearer {TOKEN}\x01x=ignored\x01\x01", "a,b=c@example.com"),
])
def test_oauthbearer_yields_the_token_and_the_authzid(message, authzid):
    step = OAuthBearer().start(message.encode())
    assert step.token is not None and step.credentials is None
    assert (step.token.authzid, step.token.token) == (authzid, TOKEN)
    assert TOKEN not in repr(step.token), "the token never shows in a repr (logs, tracebacks)"


@pytest.mark.parametrize("message", [
    f"p=tls-unique,,\x01auth=Bearer {TOKEN}\x01\x01",  # channel binding
    f"n,,\x01auth=Bearer {TOKEN}\x01",  # one %x01 at the end
    f"n,,auth=Bearer {TOKEN}\x01\x01",  # no %x01 after the GS2 header
    f"n,b=x,\x01auth=Bearer {TOKEN}\x01\x01",  # not a=
    f"n,a=bad=2Xname,\x01auth=Bearer {TOKEN}\x01\x01",  # = not followed by 2C or 3D
    "n,,\x01host=h\x01\x01",  # no auth
    f"n,,\x01auth=Basic {TOKEN}\x01\x01",
    "n,,\x01auth=Bearer tok en\x01\x01",  # not a b64token
    f"n,,\x01auth=Bearer {TOKEN}\x01auth=Bearer x\x01\x01",  # twice
    f"n,,\x01au th=Bearer {TOKEN}\x01\x01",  # a key is letters only
    "\x01",  # the dummy response, as a first message
])
def test_oauthbearer_refuses_what_rfc_7628_does_not_allow(message):
    with pytest.raises(SaslMalformed):
        OAuthBearer().start(message.encode())


def test_oauthbearer_without_an_initial_response_asks_with_an_empty_challenge():
    mech = OAuthBearer()
    assert mech.start(None).challenge == b""
    assert mech.respond(f"n,,\x01auth=Bearer {TOKEN}\x01\x01".encode()).token.token == TOKEN
    with pytest.raises(SaslMalformed):
        OAuthBearer().start(b"n,,\x01auth=Bearer \xff\x01\x01")


def test_a_refused_token_is_answered_with_rfc_7628_json_then_the_dummy_response_ends_it():
    mech = OAuthBearer()
    mech.start(f"n,,\x01auth=Bearer {TOKEN}\x01\x01".encode())
    challenge = mech.failure("invalid_token", "mail", "https://sso.example.net/.well-known/openid-configuration")
    assert json.loads(challenge) == {"status": "invalid_token", "scope": "mail",
                                     "openid-configuration": "https://sso.example.net/.well-known/openid-configuration"}
    assert mech.respond(b"\x01").failed
    bare = OAuthBearer()
    assert json.loads(bare.failure("invalid_token", "", "")) == {"status": "invalid_token"}
    assert bare.respond(b"anything else").failed, "whatever follows the error, the exchange fails"


def test_xoauth2_yields_the_token_and_the_user():
    step = XOAuth2().start(f"user=alice@example.test\x01auth=Bearer {TOKEN}\x01\x01".encode())
    assert (step.token.authzid, step.token.token) == ("alice@example.test", TOKEN)
    for bad in (f"auth=Bearer {TOKEN}\x01\x01", f"user=\x01auth=Bearer {TOKEN}\x01\x01",
                f"user=a\x01auth=Bearer {TOKEN}\x01", "user=a\x01\x01", f"n,,\x01auth=Bearer {TOKEN}\x01\x01"):
        with pytest.raises(SaslMalformed):
            XOAuth2().start(bad.encode())


def test_xoauth2_failure_is_googles_json_and_an_empty_line_ends_it():
    mech = XOAuth2()
    mech.start(f"user=a@example.test\x01auth=Bearer {TOKEN}\x01\x01".encode())
    assert json.loads(mech.failure("invalid_token", "", "https://x/.well-known/openid-configuration")) == {
        "status": "401", "schemes": "Bearer"}
    assert mech.respond(b"").failed
    assert json.loads(XOAuth2().failure("insufficient_scope", "mail", ""))["status"] == "403"


def test_the_token_mechanisms_are_offered_only_with_an_oauth_mode():
    assert token_mechanisms(Settings(users_file="u")) == []
    settings = Settings(users_file="u", oauth_mode="userinfo", oauth_issuer="https://sso.example.net")
    assert token_mechanisms(settings) == ["OAUTHBEARER", "XOAUTH2"] == list(MECHANISMS)


@pytest.mark.parametrize("bad, says", [
    ({"oauth_mode": "jwt"}, "oauth_issuer"),
    ({"oauth_mode": "jwt", "oauth_issuer": "https://sso.example.net"}, "oauth_audience"),
    ({"oauth_mode": "userinfo", "oauth_issuer": "http://sso.example.net"}, "https"),
    ({"oauth_mode": "jwt", "oauth_issuer": "https://s", "oauth_audience": ["m"], "oauth_algorithms": ["HS256"]}, "HS256"),
    ({"oauth_mode": "jwt", "oauth_issuer": "https://s", "oauth_audience": ["m"], "oauth_algorithms": ["none"]}, "none"),
    ({"oauth_mode": "userinfo", "oauth_issuer": "https://s", "oauth_required_scope": "mail"}, "userinfo"),
    ({"oauth_mode": "introspection", "oauth_issuer": "https://s"}, "oauth_client_id"),
])
def test_settings_refuse_what_would_not_be_checked(bad, says):
    with pytest.raises(ValueError, match=says):
        Settings(users_file="u", **bad)
    assert Settings(users_file="u", oauth_mode="userinfo", oauth_issuer="http://127.0.0.1:1",
                    oauth_allow_insecure_http=True).oauth_issuer.startswith("http://")


def test_the_audience_and_algorithms_are_a_json_list_or_comma_separated(monkeypatch):
    monkeypatch.setenv("SUBMITD_POLICY_OAUTH_AUDIENCE", "submitd")  # as the chart writes one
    monkeypatch.setenv("SUBMITD_POLICY_OAUTH_ALGORITHMS", "RS256, ES256")
    settings = Settings(users_file="u", oauth_mode="jwt", oauth_issuer="https://s")
    assert (settings.oauth_audience, settings.oauth_algorithms) == (["submitd"], ["RS256", "ES256"])
    monkeypatch.setenv("SUBMITD_POLICY_OAUTH_AUDIENCE", '["a", "b"]')
    assert Settings(users_file="u", oauth_mode="jwt", oauth_issuer="https://s").oauth_audience == ["a", "b"]
