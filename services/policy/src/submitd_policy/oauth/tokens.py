"""Bearer tokens checked once and remembered: the cache in front of the mode's checker.

- Keyed by the SHA-256 of the token: the cache holds no token.
- A JWT is believed until its ``exp`` (never longer); a token the provider vouched for (userinfo,
  introspection) at most ``oauth_cache_seconds`` and never past its ``exp`` when known: a token
  revoked at the provider stops working within that time. Refusals are not remembered.
- At most ``oauth_cache_entries`` (least recently used go first).
- Checks of one token at one time share one check (a client that opens twenty sessions at once
  costs the provider one request).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict

from opentelemetry import trace

from .metrics import VALIDATIONS
from .claims import Identity
from .provider import ProviderUnavailable, TokenRefused

tracer = trace.get_tracer("submitd.policy")


class TokenValidator:
    def __init__(self, checker, *, cache_seconds: float, max_entries: int, clock=time.time) -> None:
        self.checker = checker
        self.mode = checker.mode
        self.cache_seconds = cache_seconds
        self.max_entries = max_entries
        self.clock = clock
        self._cache: OrderedDict[bytes, tuple[Identity, float]] = OrderedDict()  # digest -> (identity, until)
        self._running: dict[bytes, asyncio.Future[Identity]] = {}

    def __len__(self) -> int:
        return len(self._cache)

    async def validate(self, token: str) -> Identity:
        """The token's identity. Raises TokenRefused or ProviderUnavailable."""
        digest = hashlib.sha256(token.encode()).digest()
        entry = self._cache.get(digest)
        if entry is not None:
            identity, until = entry
            if self.clock() < until:
                self._cache.move_to_end(digest)
                VALIDATIONS.labels(self.mode, "cached").inc()
                return identity
            del self._cache[digest]
        running = self._running.get(digest)
        if running is None:
            running = self._running[digest] = asyncio.ensure_future(self._check(token, digest))
            running.add_done_callback(lambda f, d=digest: self._finished(d, f))
        return await asyncio.shield(running)

    async def _check(self, token: str, digest: bytes) -> Identity:
        with tracer.start_as_current_span("oauth.validate", attributes={"submitd.oauth.mode": self.mode}) as span:
            outcome = "unavailable"
            try:
                identity = await self.checker.check(token)
                outcome = "valid"
            except TokenRefused:
                outcome = "refused"
                raise
            except ProviderUnavailable as e:
                span.set_status(trace.StatusCode.ERROR, str(e))
                raise
            finally:
                span.set_attribute("submitd.oauth.outcome", outcome)
                VALIDATIONS.labels(self.mode, outcome).inc()
        self._remember(digest, identity)
        return identity

    def _remember(self, digest: bytes, identity: Identity) -> None:
        now = self.clock()
        until = identity.expires if identity.expires is not None else float("inf")
        if self.mode != "jwt":
            until = min(until, now + self.cache_seconds)
        if until <= now or self.max_entries <= 0:
            return
        self._cache[digest] = (identity, until)
        self._cache.move_to_end(digest)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)

    def _finished(self, digest: bytes, future: asyncio.Future) -> None:
        if self._running.get(digest) is future:
            del self._running[digest]
        if not future.cancelled():
            future.exception()  # retrieved: every waiter may have gone

    async def close(self) -> None:
        await self.checker.provider.close()
