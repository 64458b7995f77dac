"""What a checked token says, whichever mode checked it: the login and until when it holds."""

from __future__ import annotations

from dataclasses import dataclass

from .provider import TokenRefused


@dataclass(frozen=True)
class Identity:
    login: str  # from the claim ``oauth_login_claim`` names
    expires: float | None  # the token's exp (seconds since the epoch), when the provider said
    subject: str = ""  # sub, for the log


def login_of(claims: dict, claim: str) -> str:
    """The login from ``claim``; an email the provider marks unverified is no login (whoever
    registered an address they do not own would otherwise log in as its owner)."""
    value = claims.get(claim)
    if not isinstance(value, str) or not value.strip():
        raise TokenRefused(f"no {claim} claim")
    if claim == "email" and claims.get("email_verified") is False:
        raise TokenRefused("email not verified")
    return value.strip()


def check_scope(claims: dict, required: str) -> None:
    """Every required scope in ``scope`` (space-separated, RFC 8693 §4.2) or ``scp`` (a list, as
    Entra ID writes it)."""
    needed = set(required.split())
    if not needed:
        return
    granted = claims.get("scope", claims.get("scp", ""))
    if isinstance(granted, str):
        granted = granted.split()
    if not isinstance(granted, list) or not needed <= {str(s) for s in granted}:
        raise TokenRefused("a required scope is missing", "insufficient_scope")
