"""The admin APIs' bearer token (the relay's queue API, policy's users API): one token, from a
setting or a file (a mounted Secret, read on every request so a rotation applies without a
restart), given as ``Authorization: Bearer`` or, through the Kubernetes API server's pod proxy
(which strips ``Authorization``), as ``X-Submitd-Admin-Token``."""

from __future__ import annotations

import hmac
from pathlib import Path

from fastapi import Depends, Header, HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

TOKEN_HEADER = "X-Submitd-Admin-Token"


def authorizer(settings, what: str):
    """A FastAPI dependency that refuses a request without the admin token (403 while no token
    is configured: the API is off)."""
    bearer = HTTPBearer(auto_error=False)

    def expected_token() -> str | None:
        if settings.admin_token_file:
            return Path(settings.admin_token_file).read_text().strip() or None
        return settings.admin_token

    async def authorize(
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
        token_header: str | None = Header(None, alias=TOKEN_HEADER),
    ) -> None:
        expected = expected_token()
        if not expected:
            raise HTTPException(403, f"the {what} admin API is off: set ADMIN_TOKEN or ADMIN_TOKEN_FILE")
        given = credentials.credentials if credentials is not None else token_header
        if given is None or not hmac.compare_digest(given.encode(), expected.encode()):
            raise HTTPException(401, "a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"})

    return authorize
