"""App password settings (SUBMITD_POLICY_APP_PASSWORDS*)."""

from __future__ import annotations

from pydantic import BaseModel


class AppPasswordSettings(BaseModel):
    pass
