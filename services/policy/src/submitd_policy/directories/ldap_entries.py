"""What an LDAP entry says about a user, as ``submitd_common.users.User`` holds it: pure functions
(no connection), so the mapping is tested without a server and the I/O in ``ldap.py`` stays small.

Attribute names are compared without case, as LDAP compares them; values arrive as bytes.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from submitd_common.users import Limits, User, normalize

log = logging.getLogger("submitd.policy")

TRUE_VALUES = {"true", "yes", "1", "on"}
ACCOUNT_DISABLE = 0x2  # Active Directory's userAccountControl ACCOUNTDISABLE
# A hash submitd cannot check: verify_password knows no such scheme, so nothing matches it.
UNUSABLE_HASH = "{UNSUPPORTED}"
_SCHEME = re.compile(r"^\{([A-Za-z0-9.-]+)\}")
_PREFIX = re.compile(r"^([A-Za-z0-9]+):(.*)$", re.S)


def escape(value: str) -> str:
    """An assertion value for a search filter (RFC 4515 §3): the five characters that would end or
    widen the filter (``*``, ``(``, ``)``, ``\\``, NUL) as ``\\XX``; the rest as it is (UTF-8)."""
    return "".join(f"\\{ord(c):02x}" if c in "*()\\\0" else c for c in value)


def fill(template: str, **values: str) -> str:
    """``template`` with each ``{name}`` replaced by its value, escaped (no other braces are read)."""
    for name, value in values.items():
        template = template.replace("{" + name + "}", escape(value))
    return template


def text(values) -> list[str]:
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values or ()]


def addresses(values: list[str]) -> set[str]:
    """The addresses among ``values``: as they are, or with an ``smtp:``/``SMTP:`` prefix (AD's
    proxyAddresses) dropped; other prefixed values (X500:, sip:, ...) are not addresses."""
    found = set()
    for value in values:
        value = value.strip()
        prefixed = _PREFIX.match(value)
        if prefixed and "@" not in prefixed.group(1):
            if prefixed.group(1).lower() != "smtp":
                continue
            value = prefixed.group(2).strip()
        if "@" in value:
            found.add(normalize(value))
    return found


def password_hash(values: list[str]) -> str:
    """The first of an entry's userPassword values in a form ``verify_password`` reads:
    {ARGON2}$argon2id$ (OpenLDAP's argon2 module), {CRYPT}$6$ and {CRYPT}$2b$ (libc crypt),
    Dovecot's {BLF-CRYPT} and {SHA512-CRYPT}. None usable: ``UNUSABLE_HASH``."""
    for value in values:
        scheme = _SCHEME.match(value)
        if scheme is None:
            continue  # cleartext in the directory: never compared
        name, rest = scheme.group(1).upper(), value[scheme.end():]
        if name in ("ARGON2", "ARGON2ID", "ARGON2I") and rest.startswith("$argon2"):
            return rest
        if name in ("CRYPT", "SHA512-CRYPT") and rest.startswith("$6$"):
            return rest
        if name in ("CRYPT", "BLF-CRYPT") and rest.startswith(("$2b$", "$2y$", "$2a$")):
            return rest
    return UNUSABLE_HASH


def schemes(values: list[str]) -> list[str]:
    """The schemes of userPassword values, for a log line (never the hashes)."""
    return [m.group(1) if (m := _SCHEME.match(v)) else "cleartext" for v in values]


@dataclass(frozen=True)
class AttributeMap:
    """Which attributes hold what (``LdapSettings``' names, lowercased)."""

    login: str = "uid"
    addresses: tuple[str, ...] = ("mail", "mailalternateaddress", "proxyaddresses")
    group_addresses: tuple[str, ...] = ("mail",)
    suspended: tuple[str, ...] = ("nsaccountlock", "submitdsuspended")
    account_control: str = "useraccountcontrol"
    messages_per_hour: str = "submitdmessagesperhour"
    recipients_per_hour: str = "submitdrecipientsperhour"
    allow_recipients: str = "submitdallowrecipients"
    deny_recipients: str = "submitddenyrecipients"
    password: str = ""  # compare mode: userpassword

    @classmethod
    def from_settings(cls, settings) -> "AttributeMap":
        def low(names) -> tuple[str, ...]:
            return tuple(n.lower() for n in names if n)

        return cls(
            login=settings.ldap_login_attribute.lower(),
            addresses=low(settings.ldap_address_attributes),
            group_addresses=low(settings.ldap_group_address_attributes),
            suspended=low(settings.ldap_suspended_attributes),
            account_control=settings.ldap_account_control_attribute.lower(),
            messages_per_hour=settings.ldap_messages_per_hour_attribute.lower(),
            recipients_per_hour=settings.ldap_recipients_per_hour_attribute.lower(),
            allow_recipients=settings.ldap_allow_recipients_attribute.lower(),
            deny_recipients=settings.ldap_deny_recipients_attribute.lower(),
            password=settings.ldap_password_attribute.lower() if settings.ldap_mode == "compare" else "",
        )

    def requested(self) -> list[str]:
        """The attributes a user search asks for (a server ignores those it does not know)."""
        names = [self.login, *self.addresses, *self.suspended, self.account_control, self.messages_per_hour,
                 self.recipients_per_hour, self.allow_recipients, self.deny_recipients, self.password]
        return sorted({n for n in names if n})

    def user(self, login: str, dn: str, attributes: dict, group_addresses: set[str]) -> User:
        """The user an entry describes. ``login``: what the client gave; the entry's own spelling
        (``login`` attribute) is kept when it matches regardless of case."""
        values = {name.lower(): text(v) for name, v in attributes.items()}

        def get(name: str) -> list[str]:
            return values.get(name, []) if name else []

        own = get(self.login)
        canonical = next((v for v in own if v.casefold() == login.casefold()), own[0] if own else login)
        send_as = set(group_addresses)
        for name in self.addresses:
            send_as |= addresses(get(name))
        allow = get(self.allow_recipients)
        hashed = ""
        if self.password:
            hashed = password_hash(get(self.password))
            if hashed == UNUSABLE_HASH:
                log.warning("ldap: %s has no %s submitd can check (%s): its logins are refused", dn,
                            self.password, ", ".join(schemes(get(self.password))) or "none readable")
        return User(
            login=canonical,
            password_hash=hashed,
            send_as=frozenset(send_as),
            allow_recipients=frozenset(normalize(a) for a in allow) if allow else None,
            deny_recipients=frozenset(normalize(a) for a in get(self.deny_recipients)),
            limits=Limits(_number(dn, self.messages_per_hour, get(self.messages_per_hour)),
                          _number(dn, self.recipients_per_hour, get(self.recipients_per_hour))),
            suspended=self.suspended_by(dn, values),
        )

    def suspended_by(self, dn: str, values: dict[str, list[str]]) -> bool:
        if any(v.strip().lower() in TRUE_VALUES for name in self.suspended for v in values.get(name, [])):
            return True
        flags = _number(dn, self.account_control, values.get(self.account_control, []))
        return flags is not None and bool(flags & ACCOUNT_DISABLE)

    def shared_addresses(self, groups: list[dict]) -> set[str]:
        """The addresses of the groups' entries (their attributes)."""
        found: set[str] = set()
        for attributes in groups:
            values = {name.lower(): text(v) for name, v in attributes.items()}
            for name in self.group_addresses:
                found |= addresses(values.get(name, []))
        return found


def _number(dn: str, name: str, values: list[str]) -> int | None:
    if not values:
        return None
    try:
        return int(values[0].strip())
    except ValueError:
        log.warning("ldap: %s: %s is not a number (%r): the default applies", dn, name, values[0][:40])
        return None
