"""The OpenID Connect provider as policy talks to it: its discovery document and JSON over HTTPS.

Every request has ``oauth_timeout`` seconds; a provider that is down, slow, or answers what is not
JSON makes ``ProviderUnavailable`` (AUTH answers 454 4.7.0, never 535: a user is never told their
token is bad because the provider is down). Tokens travel in headers and form bodies only, never
in a URL, and no error text here carries one.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time

import aiohttp

from ..settings_parts.oauth import secure_enough
from .metrics import PROVIDER_REQUESTS, PROVIDER_SECONDS

MAX_BODY = 1 << 20  # a JWKS or userinfo answer is a few KB


class ProviderUnavailable(Exception):
    """The provider did not answer usefully (down, slow, an HTTP error, not JSON): 454 4.7.0."""


class TokenRefused(Exception):
    """The token does not log in (invalid, expired, for another audience, revoked ...): the RFC 7628
    error exchange, then 535. ``status`` is the RFC 6750 error code the client is told; the message
    says why, for the log, and never holds the token."""

    def __init__(self, reason: str, status: str = "invalid_token") -> None:
        super().__init__(reason)
        self.status = status


class Provider:
    def __init__(self, settings) -> None:
        self.issuer = settings.oauth_issuer.rstrip("/")
        self.discovery_url = f"{self.issuer}/.well-known/openid-configuration"
        self.refresh_seconds = settings.oauth_jwks_refresh_seconds
        self.timeout = settings.oauth_timeout
        self.allow_http = settings.oauth_allow_insecure_http
        self.ca_file = settings.oauth_ca_file or None
        self._session: aiohttp.ClientSession | None = None
        self._document: dict | None = None
        self._document_read = 0.0

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:  # made on the running loop, at first use
            context = ssl.create_default_context(cafile=self.ca_file)
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                connector=aiohttp.TCPConnector(ssl=context, limit=32),
                trust_env=False,
            )
        return self._session

    async def discovery(self, *, fresh: bool = False) -> dict:
        """The discovery document, read again when ``fresh`` or older than the keys' refresh."""
        if self._document is None or fresh or time.monotonic() - self._document_read > self.refresh_seconds:
            status, document = await self.request("discovery", "GET", self.discovery_url)
            if status != 200 or not isinstance(document, dict):
                raise ProviderUnavailable(f"discovery: HTTP {status}")
            if str(document.get("issuer", "")).rstrip("/") != self.issuer:
                raise ProviderUnavailable("discovery: the document names another issuer")
            self._document, self._document_read = document, time.monotonic()
        return self._document

    async def endpoint(self, name: str, configured: str = "") -> str:
        """A URL the settings give, else the discovery document's ``name``; https unless allowed."""
        url = configured or str((await self.discovery()).get(name) or "")
        if not url:
            raise ProviderUnavailable(f"discovery: no {name}")
        if not secure_enough(url, self.allow_http):
            raise ProviderUnavailable(f"discovery: {name} is not https")
        return url

    async def request(self, what: str, method: str, url: str, *, headers: dict | None = None,
                      data: dict | None = None) -> tuple[int, object]:
        """(HTTP status, the JSON body or None). Raises ProviderUnavailable when no answer came."""
        started = time.perf_counter()
        outcome = "error"
        try:
            async with asyncio.timeout(self.timeout):
                async with self.session().request(method, url, headers=headers, data=data,
                                                  allow_redirects=False) as response:
                    body = await response.content.read(MAX_BODY + 1)
                    status = response.status
            outcome = str(status)
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as e:
            # The type only: some texts repeat what was sent.
            raise ProviderUnavailable(f"{what}: {type(e).__name__}") from None
        finally:
            PROVIDER_REQUESTS.labels(what, outcome).inc()
            PROVIDER_SECONDS.labels(what).observe(time.perf_counter() - started)
        if len(body) > MAX_BODY:
            raise ProviderUnavailable(f"{what}: answer over {MAX_BODY} octets")
        try:
            return status, json.loads(body) if body else None
        except ValueError:
            return status, None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
