"""Policy's token checks against a real OpenID Connect provider (oidc-provider-mock, started by the dev
kit), without the rest of the stack: introspection (RFC 7662, the dev kit's endpoint in front of the
provider), the claims a login comes from, and when the provider's keys are read again."""

from __future__ import annotations


import pytest
from joserfc import jwt
from joserfc.jwk import RSAKey
from prometheus_client import REGISTRY

from submitd_devkit.oidc import OidcProvider
from submitd_devkit.testing.users import ALICE
from submitd_devkit.testing.waiting import eventually_async
from submitd_policy.oauth import ProviderUnavailable, TokenRefused, build_validator
from submitd_policy.settings import Settings

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def provider(tmp_path):
    oidc = OidcProvider(tmp_path / "oidc").start()
    yield oidc
    oidc.stop()


def validator(provider: OidcProvider, mode: str, **more):
    return build_validator(Settings(users_file="u", **provider.policy_settings(mode, **more)))


def jwks_reads() -> float:
    return sum(REGISTRY.get_sample_value("submitd_policy_oauth_provider_requests_total",
                                         {"request": "jwks", "status": status}) or 0 for status in ("200", "error"))


async def test_introspection_says_whether_an_access_token_holds(provider, tmp_path):
    tokens = validator(provider, "introspection")
    try:
        token = provider.tokens(ALICE).access_token
        identity = await tokens.validate(token)
        assert (identity.login, identity.subject) == (ALICE, ALICE)
        provider.revoke(ALICE)
        with pytest.raises(TokenRefused, match="not active"):
            await tokens.validate(provider.tokens(ALICE).access_token[:-1] + "x")
    finally:
        await tokens.close()
    wrong = tmp_path / "wrong-secret"
    wrong.write_text("not the secret\n")
    tokens = validator(provider, "introspection", oauth_client_secret_file=str(wrong))
    try:
        with pytest.raises(ProviderUnavailable, match="HTTP 401"):  # policy's own credentials: never 535
            await tokens.validate(provider.tokens(ALICE).access_token)
    finally:
        await tokens.close()


async def test_the_login_comes_from_the_configured_claim_and_never_from_an_unverified_email(provider):
    provider.set_user("u-1", {"email": ALICE, "preferred_username": "alice"})
    provider.set_user("u-2", {"email": "victim@example.test", "email_verified": False})
    by_name = validator(provider, "userinfo", oauth_login_claim="preferred_username")
    by_email = validator(provider, "userinfo")
    try:
        assert (await by_name.validate(provider.tokens("u-1").access_token)).login == "alice"
        assert (await by_email.validate(provider.tokens("u-1").access_token)).login == ALICE
        with pytest.raises(TokenRefused, match="not verified"):
            await by_email.validate(provider.tokens("u-2").access_token)
        with pytest.raises(TokenRefused, match="no preferred_username claim"):
            await by_name.validate(provider.tokens("u-2").access_token)
    finally:
        await by_name.close()
        await by_email.close()


async def test_an_unknown_key_makes_the_keys_be_read_again_at_most_every_min_refresh_seconds(provider):
    tokens = validator(provider, "jwt", oauth_jwks_min_refresh_seconds=60, oauth_jwks_refresh_seconds=3600)
    try:
        assert (await tokens.validate(provider.tokens(ALICE).id_token)).login == ALICE
        provider.restart()
        reads = jwks_reads()
        assert (await tokens.validate(provider.tokens(ALICE).id_token)).login == ALICE, "read again at once"
        assert jwks_reads() == reads + 1
        provider.restart()
        for _ in range(5):  # within the minute: refused without asking the provider again
            with pytest.raises(TokenRefused, match="no key"):
                await tokens.validate(provider.tokens(ALICE).id_token)
        assert jwks_reads() == reads + 1
    finally:
        await tokens.close()


async def test_the_keys_are_read_again_on_schedule_without_an_unknown_key_forcing_it(provider):
    tokens = validator(provider, "jwt", oauth_jwks_min_refresh_seconds=3600, oauth_jwks_refresh_seconds=1)
    try:
        assert (await tokens.validate(provider.tokens(ALICE).id_token)).login == ALICE
        stranger = RSAKey.generate_key(2048, auto_kid=True)
        with pytest.raises(TokenRefused):  # a key nobody published: the hour's one forced read is spent on it
            await tokens.validate(jwt.encode({"alg": "RS256", "kid": stranger.kid}, {"sub": "x"}, stranger))
        forced, scheduled = refreshes("unknown_key"), refreshes("schedule")
        provider.restart()
        token = provider.tokens(ALICE).id_token

        async def accepted() -> bool:
            try:
                return (await tokens.validate(token)).login == ALICE
            except TokenRefused:
                return False

        await eventually_async(accepted, 15, 0.2)  # the scheduled read brings the new key
        assert refreshes("unknown_key") == forced and refreshes("schedule") > scheduled
    finally:
        await tokens.close()


def refreshes(reason: str) -> float:
    return REGISTRY.get_sample_value("submitd_policy_oauth_key_refreshes_total", {"reason": reason, "outcome": "ok"}) or 0


async def test_a_provider_that_is_down_is_unavailable_not_a_refusal(provider):
    tokens = validator(provider, "userinfo")
    token = provider.tokens(ALICE).access_token
    provider.stop()
    try:
        for _ in range(2):
            with pytest.raises(ProviderUnavailable):
                await tokens.validate(token)
    finally:
        await tokens.close()
    tokens = validator(provider, "jwt")
    try:
        with pytest.raises(ProviderUnavailable, match="discovery"):
            await tokens.validate("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhIn0.c2ln")
    finally:
        await tokens.close()
