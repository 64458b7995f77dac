"""OAuth 2.0 bearer token settings (SUBMITD_POLICY_OAUTH_*)."""

from __future__ import annotations

from pydantic import BaseModel


class OAuthSettings(BaseModel):
    pass
