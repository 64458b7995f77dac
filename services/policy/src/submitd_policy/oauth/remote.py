"""userinfo and introspection modes: the provider itself says whether a token holds.

- userinfo (OpenID Connect Core §5.3): ``GET`` with the token as its bearer; 200 and the claims, or
  400/401/403 for a token it refuses (invalid, expired, revoked).
- introspection (RFC 7662): ``POST token=...`` authenticated as ``oauth_client_id`` (HTTP Basic,
  the secret from ``oauth_client_secret_file``); ``active: false`` for a token that does not hold.
  What the answer states of ``exp``, ``nbf``, ``iss``, ``aud`` and ``scope`` is checked too.

Any other answer means the provider could not say: ProviderUnavailable (454 4.7.0).
"""

from __future__ import annotations

import base64
import logging
import time
from pathlib import Path
from urllib.parse import quote_plus

from .claims import Identity, check_scope, login_of
from .provider import Provider, ProviderUnavailable, TokenRefused

log = logging.getLogger("submitd.policy")
REFUSED = (400, 401, 403)  # RFC 6750 §3.1 (some providers answer an unknown token 400)


class UserinfoChecker:
    mode = "userinfo"

    def __init__(self, settings, provider: Provider) -> None:
        self.settings = settings
        self.provider = provider

    async def check(self, token: str) -> Identity:
        url = await self.provider.endpoint("userinfo_endpoint", self.settings.oauth_userinfo_url)
        status, claims = await self.provider.request("userinfo", "GET", url, headers={"Authorization": f"Bearer {token}"})
        if status in REFUSED:
            raise TokenRefused(f"userinfo: HTTP {status}")
        if status != 200 or not isinstance(claims, dict):
            raise ProviderUnavailable(f"userinfo: HTTP {status}")
        return Identity(login_of(claims, self.settings.oauth_login_claim), None, str(claims.get("sub") or ""))


class IntrospectionChecker:
    mode = "introspection"

    def __init__(self, settings, provider: Provider, clock=time.time) -> None:
        self.settings = settings
        self.provider = provider
        self.clock = clock
        secret = Path(settings.oauth_client_secret_file).read_text().strip()
        # RFC 6749 §2.3.1: each part form-encoded, then HTTP Basic.
        pair = f"{quote_plus(settings.oauth_client_id)}:{quote_plus(secret)}"
        self.authorization = f"Basic {base64.b64encode(pair.encode()).decode()}"

    async def check(self, token: str) -> Identity:
        url = await self.provider.endpoint("introspection_endpoint", self.settings.oauth_introspection_url)
        status, answer = await self.provider.request(
            "introspection", "POST", url, data={"token": token, "token_type_hint": "access_token"},
            headers={"Authorization": self.authorization, "Accept": "application/json"})
        if status in (401, 403):
            log.error("the provider refused policy's introspection client", extra={"fields": {"status": status}})
        if status != 200 or not isinstance(answer, dict):
            raise ProviderUnavailable(f"introspection: HTTP {status}")
        if answer.get("active") is not True:
            raise TokenRefused("introspection: not active")
        return self.identity(answer)

    def identity(self, answer: dict) -> Identity:
        s, now = self.settings, self.clock()
        exp, nbf = answer.get("exp"), answer.get("nbf")
        if isinstance(exp, (int, float)) and now >= exp + s.oauth_leeway_seconds:
            raise TokenRefused("expired")
        if isinstance(nbf, (int, float)) and now + s.oauth_leeway_seconds < nbf:
            raise TokenRefused("not valid yet")
        if "iss" in answer and str(answer["iss"]).rstrip("/") != self.provider.issuer:
            raise TokenRefused("issued by another issuer")
        audience = answer.get("aud")
        if s.oauth_audience and audience is not None:
            audiences = [audience] if isinstance(audience, str) else audience if isinstance(audience, list) else []
            if not set(map(str, audiences)) & set(s.oauth_audience):
                raise TokenRefused("issued for another audience")
        check_scope(answer, s.oauth_required_scope)
        login = login_of(answer, s.oauth_login_claim)
        return Identity(login, float(exp) if isinstance(exp, (int, float)) else None, str(answer.get("sub") or ""))
