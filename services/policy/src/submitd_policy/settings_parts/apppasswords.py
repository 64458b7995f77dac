"""App password settings (SUBMITD_POLICY_APP_PASSWORDS*)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class AppPasswordSettings(BaseModel):
    app_passwords: bool = Field(
        True, description="Accept SMTP-only app passwords made with `submitctl app-password add` (kept in NATS KV) "
        "with AUTH PLAIN and LOGIN, whatever directory the login lives in"
    )
    app_passwords_last_used_seconds: float = Field(
        60, description="An app password's last-used time is written at most this often (across all replicas)"
    )
    app_passwords_resync_seconds: float = Field(
        300, description="Each replica reads the app-password bucket whole this often (besides following its "
        "changes as they come, and after a reconnection to NATS)"
    )
