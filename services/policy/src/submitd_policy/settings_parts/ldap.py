"""LDAP directory settings (SUBMITD_POLICY_LDAP_*): OpenLDAP, FreeIPA, Active Directory."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class LdapSettings(BaseModel):
    ldap_url: str = Field(
        "", description="ldaps://host[:port] or ldap://host[:port] (with ldap_starttls); several separated by "
        "spaces are tried in order"
    )
    ldap_mode: Literal["bind", "compare"] = Field(
        "bind", description="bind: the password is checked by binding as the user (the directory never hands out "
        "hashes); compare: the user's ldap_password_attribute is read and checked here ({ARGON2}, {CRYPT}$6$, "
        "{CRYPT}$2b$, {BLF-CRYPT})"
    )
    ldap_starttls: bool = Field(False, description="StartTLS on ldap:// URLs (ldaps:// has TLS from the start)")
    ldap_ca_file: str | None = Field(
        None, description="CA certificates (PEM) the server's certificate must chain to; none: the system's. The "
        "certificate must name the URL's host"
    )
    ldap_bind_dn: str = Field("", description="The service account that searches users (empty: anonymous search)")
    ldap_bind_password_file: str | None = Field(
        None, description="File holding the service account's password (a mounted Secret; read at each new connection)"
    )
    ldap_base_dn: str = Field("", description="Where users are searched (subtree)")
    ldap_user_filter: str = Field(
        "(&(objectClass=inetOrgPerson)(uid={login}))",
        description="Finds one user; {login} is the AUTH login, escaped (RFC 4515). More than one entry: refused. "
        "Active Directory: (&(objectClass=user)(sAMAccountName={login}))",
    )
    ldap_login_attribute: str = Field(
        "uid", description="The login as submitd names the user (limits, logs, submitctl): the entry's value that "
        "matches the AUTH login regardless of case, else its first (AD: sAMAccountName)"
    )
    ldap_address_attributes: list[str] = Field(
        ["mail", "mailAlternateAddress", "proxyAddresses"],
        description="Addresses the user may send as; values with a prefix (AD proxyAddresses) count only as "
        "smtp:/SMTP:, the prefix dropped",
    )
    ldap_group_base_dn: str = Field("", description="Where groups are searched (empty: ldap_base_dn)")
    ldap_group_filter: str = Field(
        "(&(objectClass=groupOfNames)(member={dn}))",
        description="The groups a user is in; {dn} is the user's DN, {login} the login (both escaped); their "
        "ldap_group_address_attributes are addresses every member may send as. Empty: no groups",
    )
    ldap_group_address_attributes: list[str] = Field(["mail"], description="A group's shared addresses")
    ldap_suspended_attributes: list[str] = Field(
        ["nsAccountLock", "submitdSuspended"], description="A true value (TRUE, yes, 1) in any of them suspends "
        "the user (nsAccountLock: FreeIPA and 389 DS)"
    )
    ldap_account_control_attribute: str = Field(
        "userAccountControl", description="Active Directory's flags: the disabled bit (0x2) suspends the user"
    )
    ldap_messages_per_hour_attribute: str = Field(
        "submitdMessagesPerHour", description="The user's message rate (absent: messages_per_hour)"
    )
    ldap_recipients_per_hour_attribute: str = Field(
        "submitdRecipientsPerHour", description="The user's recipient rate (absent: recipients_per_hour)"
    )
    ldap_allow_recipients_attribute: str = Field(
        "submitdAllowRecipients", description="Where set, the only recipients (addresses or @domains) the user may use"
    )
    ldap_deny_recipients_attribute: str = Field(
        "submitdDenyRecipients", description="Recipients (addresses or @domains) the user may never use"
    )
    ldap_password_attribute: str = Field("userPassword", description="The hash read in compare mode")
    ldap_pool_size: int = Field(
        4, ge=1, le=64, description="Requests to the directory at once, each on its own connection (and one more "
        "connection each for the users' binds)"
    )
