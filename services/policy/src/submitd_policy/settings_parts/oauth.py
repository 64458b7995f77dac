"""OAuth 2.0 bearer token settings (SUBMITD_POLICY_OAUTH_*): SASL OAUTHBEARER and XOAUTH2 are
accepted only when ``oauth_mode`` is set."""

from __future__ import annotations

import json
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import NoDecode

# Asymmetric signatures only: the keys come from the provider's public JWKS. "none" and the HMAC
# family (HS256 ...) are refused: with a public key as the "secret", anyone could sign.
ASYMMETRIC = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")


class OAuthSettings(BaseModel):
    oauth_mode: Literal["jwt", "userinfo", "introspection"] | None = Field(
        None, description="How bearer tokens are checked: jwt (signature and claims checked here, keys from the "
        "issuer's JWKS), userinfo (an opaque token sent to the provider's userinfo endpoint) or introspection "
        "(RFC 7662); unset: OAUTHBEARER and XOAUTH2 are not offered",
    )
    oauth_issuer: str = Field(
        "", description="The provider's issuer URL (e.g. https://sso.example.net/realms/mail): its "
        "/.well-known/openid-configuration names the JWKS, userinfo and introspection endpoints",
    )
    oauth_audience: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="jwt: a token's aud must name one of these (the client id the "
        "provider issues mail tokens to), a JSON list or comma-separated; introspection: checked when the answer has an aud",
    )
    oauth_login_claim: str = Field(
        "email", description="The claim that holds the login (email, preferred_username, sub ...); a token whose "
        "email_verified is false never logs in by its email",
    )
    oauth_required_scope: str = Field(
        "", description="Scopes a token must carry (space-separated), checked in jwt and introspection modes "
        "(a userinfo answer does not tell the scope: refused there)",
    )
    oauth_algorithms: Annotated[list[str], NoDecode] = Field(
        list(ASYMMETRIC), description="Signature algorithms accepted in jwt mode (never none nor HS*), a JSON list "
        "or comma-separated"
    )
    oauth_leeway_seconds: float = Field(30, ge=0, le=300, description="Clock skew allowed on exp, nbf and iat")
    oauth_jwks_refresh_seconds: float = Field(
        3600, gt=0, description="The keys (and the discovery document) are read again when this old"
    )
    oauth_jwks_min_refresh_seconds: float = Field(
        30, ge=0, description="A token signed by a key not in the set makes the keys be read again, at most this often"
    )
    oauth_userinfo_url: str = Field("", description="userinfo mode: the endpoint (default: the discovery document's)")
    oauth_introspection_url: str = Field(
        "", description="introspection mode: the endpoint (default: the discovery document's)"
    )
    oauth_client_id: str = Field("", description="introspection mode: the client id policy authenticates as")
    oauth_client_secret_file: str = Field("", description="introspection mode: a file holding that client's secret")
    oauth_cache_seconds: float = Field(
        300, ge=0, description="A token checked at the provider (userinfo, introspection) is believed this long, "
        "never past its exp when known (a revoked token stops working within it); a JWT until its exp"
    )
    oauth_cache_entries: int = Field(10_000, ge=0, description="Most cached tokens (least recently used go first)")
    oauth_timeout: float = Field(
        5.0, gt=0, description="Seconds a provider request may take; slower or down: 454 4.7.0, never 535"
    )
    oauth_ca_file: str = Field("", description="CA bundle for the provider's certificate (default: the system's)")
    oauth_allow_insecure_http: bool = Field(
        False, description="Accept http:// provider URLs (tests, a provider on loopback): tokens then cross in clear"
    )
    oauth_unknown_users: Literal["refuse", "token"] = Field(
        "refuse", description="A valid token whose login no directory knows: refuse (535), or token (an account "
        "that may send as the login only, when it is an address)",
    )

    @field_validator("oauth_audience", "oauth_algorithms", mode="before")
    @classmethod
    def _list(cls, value):
        """A JSON list, or names separated by commas (as the chart writes one audience)."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _check_oauth(self):
        if self.oauth_mode is None:
            return self
        if not self.oauth_issuer:
            raise ValueError("oauth_mode needs oauth_issuer")
        for name in ("oauth_issuer", "oauth_userinfo_url", "oauth_introspection_url"):
            url = getattr(self, name)
            if url and not secure_enough(url, self.oauth_allow_insecure_http):
                raise ValueError(f"{name} must be an https:// URL (oauth_allow_insecure_http allows http://)")
        weak = [a for a in self.oauth_algorithms if a not in ASYMMETRIC]
        if weak or not self.oauth_algorithms:
            raise ValueError(f"oauth_algorithms: only {', '.join(ASYMMETRIC)} (not {', '.join(weak) or 'none'})")
        if self.oauth_mode == "jwt" and not self.oauth_audience:
            raise ValueError("oauth_mode jwt needs oauth_audience (the client id tokens are issued to)")
        if self.oauth_mode == "userinfo" and self.oauth_required_scope:
            raise ValueError("oauth_required_scope cannot be checked in userinfo mode (the endpoint does not tell)")
        if self.oauth_mode == "introspection" and not (self.oauth_client_id and self.oauth_client_secret_file):
            raise ValueError("oauth_mode introspection needs oauth_client_id and oauth_client_secret_file")
        return self


def secure_enough(url: str, allow_http: bool) -> bool:
    scheme = urlsplit(url).scheme
    return scheme == "https" or (allow_http and scheme == "http")
