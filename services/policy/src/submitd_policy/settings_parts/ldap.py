"""LDAP directory settings (SUBMITD_POLICY_LDAP_*)."""

from __future__ import annotations

from pydantic import BaseModel


class LdapSettings(BaseModel):
    pass
