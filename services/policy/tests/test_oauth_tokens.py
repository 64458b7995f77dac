"""Token checks without a provider: a JWT's signature and claims with keys made here (the provider's
own keys are used in tests/test_oauth.py), and the cache in front of any mode."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time

import pytest
from cryptography.hazmat.primitives import serialization
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey

from submitd_policy.oauth.claims import Identity
from submitd_policy.oauth.jwt import JwtChecker, check_claims, header_of, usable_keys, verify
from submitd_policy.oauth.provider import TokenRefused
from submitd_policy.oauth.tokens import TokenValidator
from submitd_policy.settings import Settings

ISSUER = "https://sso.example.net/realms/mail"
NOW = 1_800_000_000
SETTINGS = Settings(users_file="u", oauth_mode="jwt", oauth_issuer=ISSUER, oauth_audience=["submitd"])
ALGORITHMS = list(SETTINGS.oauth_algorithms)
RSA = RSAKey.generate_key(2048, auto_kid=True)
OTHER_RSA = RSAKey.generate_key(2048, parameters={"kid": RSA.kid})  # same kid, another key
EC = ECKey.generate_key("P-256", auto_kid=True)


def claims(**changes) -> dict:
    base = {"iss": ISSUER, "aud": ["submitd"], "exp": NOW + 300, "iat": NOW - 10, "sub": "u1",
            "email": "alice@example.test"}
    return {k: v for k, v in (base | changes).items() if v is not None}


def sign(key, alg="RS256", kid=True, **changes) -> str:
    header = {"alg": alg} | ({"kid": key.kid} if kid else {})
    return jwt.encode(header, claims(**changes), key, algorithms=[alg])


def b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def test_a_token_with_every_claim_right_gives_its_login_and_expiry():
    identity = check_claims(claims(), SETTINGS, ISSUER, NOW)
    assert identity == Identity("alice@example.test", NOW + 300, "u1")
    assert check_claims(claims(aud="submitd"), SETTINGS, ISSUER, NOW).login == "alice@example.test"
    assert check_claims(claims(exp=NOW - 20), SETTINGS, ISSUER, NOW).login, "within the leeway (30 s)"


@pytest.mark.parametrize("changes, reason", [
    ({"iss": "https://evil.example.net"}, "another issuer"),
    ({"aud": ["another-client"]}, "another audience"),
    ({"aud": None}, "another audience"),
    ({"exp": None}, "no exp"),
    ({"exp": NOW - 31}, "expired"),
    ({"exp": True}, "no exp"),
    ({"nbf": NOW + 60}, "not valid yet"),
    ({"iat": NOW + 60}, "in the future"),
    ({"email": None}, "no email claim"),
    ({"email": ["alice@example.test"]}, "no email claim"),
    ({"email_verified": False}, "not verified"),
])
def test_a_claim_out_of_place_refuses_the_token(changes, reason):
    with pytest.raises(TokenRefused, match=reason):
        check_claims(claims(**changes), SETTINGS, ISSUER, NOW)


def test_a_required_scope_is_read_from_scope_or_scp_and_its_absence_is_insufficient_scope():
    settings = SETTINGS.model_copy(update={"oauth_required_scope": "mail.send"})
    assert check_claims(claims(scope="openid mail.send"), settings, ISSUER, NOW).login
    assert check_claims(claims(scp=["mail.send"]), settings, ISSUER, NOW).login
    with pytest.raises(TokenRefused) as refused:
        check_claims(claims(scope="openid email"), settings, ISSUER, NOW)
    assert refused.value.status == "insufficient_scope"
    login = SETTINGS.model_copy(update={"oauth_login_claim": "preferred_username"})
    assert check_claims(claims(preferred_username="alice"), login, ISSUER, NOW).login == "alice"


def test_the_signature_is_checked_with_the_key_the_kid_names_or_any_key_of_its_type():
    keys = usable_keys({"keys": [EC.as_dict(private=False), RSA.as_dict(private=False)]})
    token = sign(RSA)
    assert verify(token, keys, header_of(token), ALGORITHMS)["email"] == "alice@example.test"
    no_kid = sign(RSA, kid=False)
    assert verify(no_kid, keys, header_of(no_kid), ALGORITHMS)["sub"] == "u1", "no kid: the RSA keys are tried"
    ec = sign(EC, alg="ES256")
    assert verify(ec, keys, header_of(ec), ALGORITHMS)["sub"] == "u1"
    forged = sign(OTHER_RSA)  # the right kid, another key
    assert verify(forged, keys, header_of(forged), ALGORITHMS) is None
    head, payload, signature = token.split(".")
    tampered = ".".join([head, b64(claims(email="mallory@example.test")), signature])
    assert verify(tampered, keys, header_of(tampered), ALGORITHMS) is None
    assert verify(token, keys, header_of(token), ["ES256"]) is None, "an algorithm not allowed"
    assert usable_keys({"keys": [RSA.as_dict(private=False) | {"use": "enc"}, {"kty": "nope"}, "x"]}) == []


async def test_none_and_an_hmac_signed_with_the_public_key_are_refused_before_any_key_is_read():
    """No provider here: the checker refuses on the header alone (reading keys would fail)."""
    checker = JwtChecker(SETTINGS, provider=None)
    unsigned = f"{b64({'alg': 'none'})}.{b64(claims())}."
    public_pem = RSA.get_op_key("verify").public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo)
    # The classic confusion: the public key's PEM as an HMAC secret (joserfc would not sign it).
    signing_input = f"{b64({'alg': 'HS256', 'kid': RSA.kid})}.{b64(claims())}"
    mac = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    confused = f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"
    for token in (unsigned, confused, "not.a-jwt", "a.b", "x" * 13000 + ".a.b"):
        with pytest.raises(TokenRefused):
            await checker.check(token)


class Checker:
    """A checker that answers from a table: what the cache in front of it does is under test."""

    def __init__(self, mode: str, answers: dict) -> None:
        self.mode, self.answers, self.calls = mode, answers, 0

    async def check(self, token: str) -> Identity:
        self.calls += 1
        await asyncio.sleep(0)
        answer = self.answers[token]
        if isinstance(answer, Exception):
            raise answer
        return answer


async def test_a_jwt_is_cached_until_its_exp_and_a_provider_answer_at_most_cache_seconds():
    now = [1000.0]
    jwt_checker = Checker("jwt", {"t": Identity("a", 1600.0)})
    cache = TokenValidator(jwt_checker, cache_seconds=60, max_entries=10, clock=lambda: now[0])
    await cache.validate("t")
    now[0] = 1599.0
    await cache.validate("t")
    assert jwt_checker.calls == 1, "a JWT is believed until its exp"
    now[0] = 1600.0
    await cache.validate("t")
    assert jwt_checker.calls == 2, "and never past it"
    remote = Checker("userinfo", {"u": Identity("a", None), "v": Identity("b", 1010.0)})
    cache = TokenValidator(remote, cache_seconds=60, max_entries=10, clock=lambda: now[0])
    now[0] = 1000.0
    await cache.validate("u"), await cache.validate("v")
    now[0] = 1009.0
    await cache.validate("u"), await cache.validate("v")
    assert remote.calls == 2
    now[0] = 1011.0
    await cache.validate("v")
    assert remote.calls == 3, "never past a known exp"
    now[0] = 1060.0
    await cache.validate("u")
    assert remote.calls == 4, "at most oauth_cache_seconds"
    assert all(len(key) == 32 and b"u" != key for key in cache._cache), "keyed by SHA-256, not the token"


async def test_refusals_are_not_cached_the_cache_is_bounded_and_one_token_at_a_time_is_checked_once():
    checker = Checker("userinfo", {"bad": TokenRefused("no"), **{f"t{i}": Identity(f"u{i}", None) for i in range(5)}})
    cache = TokenValidator(checker, cache_seconds=60, max_entries=3, clock=time.time)
    for _ in range(2):
        with pytest.raises(TokenRefused):
            await cache.validate("bad")
    assert checker.calls == 2
    results = await asyncio.gather(*[cache.validate("t0") for _ in range(20)])
    assert {r.login for r in results} == {"u0"} and checker.calls == 3, "twenty at once: one check"
    for i in range(5):
        await cache.validate(f"t{i}")
    assert len(cache) == 3
