"""jwt mode: a signed token checked here, with the provider's public keys.

- Keys: the discovery document's ``jwks_uri``, read at the first token, again in the background
  once ``oauth_jwks_refresh_seconds`` old (the old keys serve meanwhile, and while the provider is
  down), and at once for a token whose key is not in the set (a rotation), at most every
  ``oauth_jwks_min_refresh_seconds`` (forged key ids cannot make policy hammer the provider).
- Signature: an algorithm of ``oauth_algorithms`` (asymmetric only: never ``none``, never HS*),
  with the key its ``kid`` names, or, without a ``kid``, any key of the set of the algorithm's type.
- Claims (``check_claims``, pure): ``iss`` is the issuer, ``aud`` names an ``oauth_audience``,
  ``exp`` is required and ``exp``/``nbf``/``iat`` hold within ``oauth_leeway_seconds``, the
  required scopes are there, and the login claim is a string.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import import_key

from .metrics import KEY_REFRESHES
from .claims import Identity, check_scope, login_of
from .provider import Provider, ProviderUnavailable, TokenRefused

log = logging.getLogger("submitd.policy")
KEY_TYPES = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}
MAX_TOKEN = 12288  # what fits in an AUTH line


def header_of(token: str) -> dict:
    """The JOSE header, unverified (to choose the key), or TokenRefused."""
    if len(token) > MAX_TOKEN or token.count(".") != 2:
        raise TokenRefused("not a signed JWT")
    part = token.split(".", 1)[0]
    try:
        header = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    except ValueError:
        raise TokenRefused("not a signed JWT") from None
    if not isinstance(header, dict) or not isinstance(header.get("alg"), str):
        raise TokenRefused("not a signed JWT")
    return header


def check_claims(claims: dict, settings, issuer: str, now: float) -> Identity:
    """The registered claims of a verified token, then its login (RFC 7519 §4.1)."""
    leeway = settings.oauth_leeway_seconds
    if claims.get("iss") != issuer:
        raise TokenRefused("issued by another issuer")
    audience = claims.get("aud")
    audiences = [audience] if isinstance(audience, str) else audience if isinstance(audience, list) else []
    if not set(map(str, audiences)) & set(settings.oauth_audience):
        raise TokenRefused("issued for another audience")
    exp, nbf, iat = (claims.get(name) for name in ("exp", "nbf", "iat"))
    if not _number(exp):
        raise TokenRefused("no exp")
    if now >= exp + leeway:
        raise TokenRefused("expired")
    if nbf is not None and (not _number(nbf) or now + leeway < nbf):
        raise TokenRefused("not valid yet")
    if iat is not None and (not _number(iat) or now + leeway < iat):
        raise TokenRefused("issued in the future")
    check_scope(claims, settings.oauth_required_scope)
    return Identity(login_of(claims, settings.oauth_login_claim), float(exp), str(claims.get("sub") or ""))


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def usable_keys(jwks) -> list:
    """The signing keys of a JWKS document that import (others, e.g. encryption keys, are left out)."""
    keys = []
    for data in (jwks.get("keys") if isinstance(jwks, dict) else None) or []:
        if not isinstance(data, dict) or data.get("use", "sig") != "sig" or data.get("kty") == "oct":
            continue
        try:
            keys.append(import_key(data))
        except (JoseError, ValueError, TypeError, KeyError):
            continue
    return keys


def candidates(keys: list, header: dict) -> list:
    """The keys that may have signed a token with this header."""
    kid, alg = header.get("kid"), header["alg"]
    kty = KEY_TYPES.get(alg[:2])
    found = []
    for key in keys:
        if kid is not None and key.kid != kid:
            continue
        if key.key_type != kty or key.get("alg", alg) != alg:
            continue
        found.append(key)
    return found


def verify(token: str, keys: list, header: dict, algorithms: list[str]) -> dict | None:
    """The claims if one of ``keys`` verifies the signature, else None."""
    for key in candidates(keys, header):
        try:
            claims = jwt.decode(token, key, algorithms=algorithms).claims
        except JoseError:
            continue
        except ValueError:  # not JSON, not base64 ...
            raise TokenRefused("not a signed JWT") from None
        return claims
    return None


class JwtChecker:
    mode = "jwt"

    def __init__(self, settings, provider: Provider, clock=time.time) -> None:
        self.settings = settings
        self.provider = provider
        self.clock = clock
        self.algorithms = list(settings.oauth_algorithms)
        self.keys: list = []
        self.issuer = ""  # as the discovery document spells it
        self.read_at: float | None = None  # monotonic
        self.forced_at = float("-inf")
        self._reading: asyncio.Future | None = None

    async def check(self, token: str) -> Identity:
        header = header_of(token)
        if header["alg"] not in self.algorithms:
            raise TokenRefused("signature algorithm not allowed")
        if self.read_at is None:
            await self._read("first")
        elif time.monotonic() - self.read_at > self.settings.oauth_jwks_refresh_seconds and self._reading is None:
            self._start_read("schedule")  # in the background: the keys in hand serve meanwhile
        claims = verify(token, self.keys, header, self.algorithms)
        if claims is None and await self._read_for_unknown_key():
            claims = verify(token, self.keys, header, self.algorithms)
        if claims is None:
            raise TokenRefused("signed by no key of the provider's")
        if not isinstance(claims, dict):
            raise TokenRefused("not a JWT claims set")
        return check_claims(claims, self.settings, self.issuer, self.clock())

    async def _read_for_unknown_key(self) -> bool:
        """Whether the keys were read again for a token none of them verifies."""
        if self._reading is not None:
            await asyncio.shield(self._reading)
            return True
        if time.monotonic() - self.forced_at < self.settings.oauth_jwks_min_refresh_seconds:
            return False
        self.forced_at = time.monotonic()
        await self._read("unknown_key")
        return True

    def _start_read(self, reason: str) -> asyncio.Future:
        if self._reading is None:
            self._reading = asyncio.ensure_future(self._fetch(reason))
            self._reading.add_done_callback(self._read_done)
        return self._reading

    async def _read(self, reason: str) -> None:
        await asyncio.shield(self._start_read(reason))

    def _read_done(self, future: asyncio.Future) -> None:
        self._reading = None
        if not future.cancelled() and future.exception() is not None:
            log.warning("provider keys not read", extra={"fields": {"error": str(future.exception())}})

    async def _fetch(self, reason: str) -> None:
        try:
            document = await self.provider.discovery(fresh=reason != "first")
            url = await self.provider.endpoint("jwks_uri")
            status, jwks = await self.provider.request("jwks", "GET", url)
            if status != 200:
                raise ProviderUnavailable(f"jwks: HTTP {status}")
            keys = usable_keys(jwks)
            if not keys:
                raise ProviderUnavailable("jwks: no signing key")
        except ProviderUnavailable:
            KEY_REFRESHES.labels(reason, "failed").inc()
            raise
        KEY_REFRESHES.labels(reason, "ok").inc()
        self.keys, self.issuer, self.read_at = keys, str(document["issuer"]), time.monotonic()
