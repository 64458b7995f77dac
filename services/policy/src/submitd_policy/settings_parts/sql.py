"""SQL directory settings (SUBMITD_POLICY_SQL_*)."""

from __future__ import annotations

from pydantic import BaseModel


class SqlSettings(BaseModel):
    pass
