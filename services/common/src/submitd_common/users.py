"""The users file: logins, password hashes and what each user may do.

    users:
      alice@example.net:
        password: "$argon2id$v=19$m=65536,t=3,p=4$..."
        send_as: [alice@example.net, "@sales.example.net"]
        act_as: [shared-mailbox]            # SASL authzid values this user may take
        recipients:                         # RFC 6409 §6.2; absent means any recipient
          allow: ["@example.net"]           # only these (addresses or @domains) ...
          deny: [ceo@example.net]           # ... and never these
        limits: {messages_per_hour: 200, recipients_per_hour: 1000}
        suspended: false
    aliases:                                # shared sender addresses -> logins that may use them
      sales@example.net: [alice@example.net, bob@example.net]

``send_as`` entries are exact addresses (their ``+detail`` sub-addresses included) or
``@domain`` for a whole domain. A login that is itself an address may always send as itself.

Addresses are compared in one form (``addresses.address_key``): source routes dropped, quotes
dropped where they change nothing, domains case-insensitive (IDNs as A-labels), and local parts
case-insensitive unless the file says otherwise:

    local_parts: case-sensitive             # default: case-insensitive (CEO@ is ceo@)

Passwords: argon2id (``$argon2id$...``), and, so that a site can bring its Dovecot users along
without resetting passwords, bcrypt (``$2y$``/``$2b$``, Dovecot ``{BLF-CRYPT}``) and SHA512-CRYPT
(``$6$``, Dovecot ``{SHA512-CRYPT}``). A Dovecot passwd-file can be read directly as well
(``SUBMITD_POLICY_DOVECOT_PASSWD_FILE``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from passlib.hash import bcrypt as bcrypt_hash
from passlib.hash import sha512_crypt

from .addresses import AddressError, address_key, parse_mailbox
from .files import load_yaml

# argon2-cffi's defaults (RFC 9106's second recommended option: t=3, 64 MiB, p=4), stronger than
# OWASP's minimum for argon2id (19 MiB with t=2, or an equivalent memory x time).
ARGON2_DEFAULTS = {"time_cost": 3, "memory_kib": 65536, "parallelism": 4}
_hasher = PasswordHasher()
_dummy: str | None = None


def check_argon2_parameters(time_cost: int, memory_kib: int, parallelism: int) -> None:
    """Refuse parameters weaker than OWASP's argon2id minimum (m >= 7 MiB and m x t >= 35 MiB,
    the weakest of its equivalent configurations: 46/1, 19/2, 12/3, 9/4, 7/5 MiB/passes)."""
    if time_cost < 1 or parallelism < 1 or memory_kib < 7168 or memory_kib * time_cost < 35840:
        raise ValueError(
            f"argon2id t={time_cost} m={memory_kib} KiB p={parallelism} is weaker than OWASP's minimum "
            "(for example t=2 with m=19456 KiB)"
        )


def configure_hashing(time_cost: int, memory_kib: int, parallelism: int) -> None:
    """The argon2id parameters of new hashes (and of the dummy hash unknown logins cost).
    Existing hashes carry their own parameters and keep verifying."""
    global _hasher, _dummy
    check_argon2_parameters(time_cost, memory_kib, parallelism)
    _hasher = PasswordHasher(time_cost=time_cost, memory_cost=memory_kib, parallelism=parallelism)
    _dummy = None


def dummy_hash() -> str:
    """A hash no password matches, at the configured parameters: unknown logins are checked
    against it so that they cost what a known login costs."""
    global _dummy
    if _dummy is None:
        _dummy = _hasher.hash(os.urandom(16).hex())
    return _dummy
_SCHEME = re.compile(r"^\{([A-Z0-9-]+)\}")
LOCAL_PARTS = ("case-insensitive", "case-sensitive")


@dataclass(frozen=True)
class Limits:
    messages_per_hour: int | None = None
    recipients_per_hour: int | None = None


@dataclass(frozen=True)
class User:
    login: str
    password_hash: str
    send_as: frozenset[str] = field(default_factory=frozenset)
    act_as: frozenset[str] = field(default_factory=frozenset)
    allow_recipients: frozenset[str] | None = None
    deny_recipients: frozenset[str] = field(default_factory=frozenset)
    limits: Limits = field(default_factory=Limits)
    suspended: bool = False
    header_from_check: bool = True  # RFC 6409 §6.3: the header From must be the user's too
    fold_local: bool = True  # the users file's ``local_parts``: case-insensitive unless it says so
    # The grants as compared (``address_key``), made once: the fields above keep them as written.
    _send_as: frozenset[str] = field(init=False, repr=False, compare=False)
    _allow: frozenset[str] | None = field(init=False, repr=False, compare=False)
    _deny: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        keys = self.keys
        grants = keys(self.send_as) | (keys([self.login]) if "@" in self.login else frozenset())
        object.__setattr__(self, "_send_as", grants)
        object.__setattr__(self, "_allow", None if self.allow_recipients is None else keys(self.allow_recipients))
        object.__setattr__(self, "_deny", keys(self.deny_recipients))

    def keys(self, addresses) -> frozenset[str]:
        return frozenset(address_key(str(a), fold_local=self.fold_local) for a in addresses or ())

    @property
    def address(self) -> str | None:
        """The user's own address: the login when it is one, else the first exact grant."""
        if "@" in self.login:
            return normalize(self.login)
        exact = sorted(a for a in self.send_as if not a.startswith("@"))
        return exact[0] if exact else None

    def may_send_as(self, address: str, aliases: dict[str, frozenset[str]] | None = None) -> bool:
        candidates = _candidates(address, self.fold_local)
        if candidates & self._send_as:
            return True
        return any(self.login in (aliases or {}).get(c, ()) for c in candidates)

    def may_send_to(self, address: str) -> bool:
        candidates = _candidates(address, self.fold_local)
        if candidates & self._deny:
            return False
        return self._allow is None or bool(candidates & self._allow)


def normalize(address: str) -> str:
    """An address as it is written back (users file, envelope): its canonical form (source
    route dropped, quotes dropped where they change nothing, domain lowercased), the local
    part's case kept. A text that does not parse only has its domain lowercased."""
    try:
        return str(parse_mailbox(address, utf8=True).canonical)
    except AddressError:
        local, at, domain = address.rpartition("@")
        return f"{local}@{domain.lower()}" if at else address


def _candidates(address: str, fold_local: bool) -> set[str]:
    """The grant keys that would cover ``address``: itself, its base address, its domain."""
    key = address_key(address, fold_local=fold_local)
    local, at, domain = key.rpartition("@")
    if not at:
        return {key}
    return {key, f"{local.split('+', 1)[0]}@{domain}", f"@{domain}"}


def _addresses(values) -> frozenset[str]:
    return frozenset(normalize(str(a)) for a in values or [])


class UserDB:
    def __init__(self, users: dict[str, User], aliases: dict[str, frozenset[str]] | None = None) -> None:
        self.users = users
        self.aliases = aliases or {}

    @classmethod
    def load(cls, path: str, dovecot_passwd: str | None = None) -> "UserDB":
        return cls.from_mapping(load_yaml(path), load_dovecot_passwd(dovecot_passwd) if dovecot_passwd else {})

    @classmethod
    def from_mapping(cls, data: dict, users: dict[str, User] | None = None) -> "UserDB":
        """The users file's content (``users``, ``aliases``, ``local_parts``) over ``users``
        already read."""
        local_parts = str(data.get("local_parts") or LOCAL_PARTS[0])
        if local_parts not in LOCAL_PARTS:
            raise ValueError(f"local_parts: {local_parts!r} is neither {' nor '.join(LOCAL_PARTS)}")
        fold = local_parts == LOCAL_PARTS[0]
        users = {login: replace(user, fold_local=fold) for login, user in (users or {}).items()}
        for login, entry in (data.get("users") or {}).items():
            if not isinstance(entry, dict) or not entry.get("password"):
                raise ValueError(f"user {login!r}: a password hash is required")
            recipients = entry.get("recipients") or {}
            limits = entry.get("limits") or {}
            users[str(login)] = User(
                login=str(login),
                password_hash=str(entry["password"]),
                send_as=_addresses(entry.get("send_as")),
                act_as=frozenset(str(a) for a in entry.get("act_as") or []),
                allow_recipients=_addresses(recipients["allow"]) if "allow" in recipients else None,
                deny_recipients=_addresses(recipients.get("deny")),
                limits=Limits(limits.get("messages_per_hour"), limits.get("recipients_per_hour")),
                suspended=bool(entry.get("suspended", False)),
                header_from_check=bool(entry.get("header_from_check", True)),
                fold_local=fold,
            )
        aliases: dict[str, frozenset[str]] = {}
        for address, logins in (data.get("aliases") or {}).items():
            key = address_key(str(address), fold_local=fold)
            aliases[key] = aliases.get(key, frozenset()) | frozenset(str(u) for u in logins or [])
        return cls(users, aliases)


def load_dovecot_passwd(path: str) -> dict[str, User]:
    """Dovecot passwd-file lines: ``user:{SCHEME}hash:uid:gid:gecos:home:shell:extra``."""
    users: dict[str, User] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            login, sep, rest = line.partition(":")
            if not sep or not login:
                raise ValueError(f"{path}:{number}: expected user:password")
            users[login] = User(login=login, password_hash=rest.split(":", 1)[0])
    return users


def verify_password(hashed: str, password: str) -> bool:
    scheme = None
    m = _SCHEME.match(hashed)
    if m:
        scheme, hashed = m.group(1), hashed[m.end() :]
    try:
        if hashed.startswith("$argon2") and scheme in (None, "ARGON2ID", "ARGON2I"):
            return _hasher.verify(hashed, password)
        if hashed.startswith(("$2y$", "$2b$", "$2a$")) and scheme in (None, "BLF-CRYPT"):
            return bcrypt_hash.verify(password, hashed)
        if hashed.startswith("$6$") and scheme in (None, "SHA512-CRYPT"):
            return sha512_crypt.verify(password, hashed)
    except (VerificationError, InvalidHashError, ValueError):
        return False
    return False  # an unknown scheme never matches


def hash_password(password: str) -> str:
    return _hasher.hash(password)
