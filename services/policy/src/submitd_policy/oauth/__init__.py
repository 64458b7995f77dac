"""OAuth 2.0 bearer tokens on SMTP AUTH: SASL OAUTHBEARER (RFC 7628) and XOAUTH2.

- ``mechanisms``: the SASL messages, and the RFC 7628 §3.2.2 error exchange.
- ``tokens``: the cache in front of one of three checkers, as Dovecot's ``oauth2`` offers them
  (``oauth_mode``): ``jwt`` (``jwt.py``: signature and claims checked here with the provider's
  published keys), ``userinfo`` and ``introspection`` (``remote.py``: the provider says).
- ``provider``: discovery and HTTPS to the provider; down or slow → 454 4.7.0, never 535.
- ``auth``: a checked token's login, its rights from the directories, the authzid, the reply.
"""

from __future__ import annotations

from .mechanisms import MECHANISMS
from .provider import Provider, ProviderUnavailable, TokenRefused
from .tokens import TokenValidator


def token_mechanisms(settings) -> list[str]:
    """The token mechanisms AUTH accepts (and EHLO advertises): both once ``oauth_mode`` is set."""
    return list(MECHANISMS) if settings.oauth_mode else []


def build_validator(settings) -> TokenValidator:
    """The mode's checker behind the cache; nothing is fetched until the first token."""
    from .jwt import JwtChecker
    from .remote import IntrospectionChecker, UserinfoChecker

    provider = Provider(settings)
    checkers = {"jwt": JwtChecker, "userinfo": UserinfoChecker, "introspection": IntrospectionChecker}
    checker = checkers[settings.oauth_mode](settings, provider)
    return TokenValidator(checker, cache_seconds=settings.oauth_cache_seconds, max_entries=settings.oauth_cache_entries)


__all__ = ["MECHANISMS", "ProviderUnavailable", "TokenRefused", "TokenValidator", "build_validator", "token_mechanisms"]
