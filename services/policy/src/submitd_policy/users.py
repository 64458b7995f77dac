"""The users file: logins, password hashes and the addresses each user may send as.

    users:
      alice:
        password: "$argon2id$v=19$m=65536,t=3,p=4$..."
        send_as: [alice@example.net, "@sales.example.net"]
        suspended: false

``send_as`` entries are exact addresses (a ``+detail`` sub-address of one is included) or
``@domain`` for a whole domain. A login that is itself an address may always send as itself.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from submitd_common.files import load_yaml

_hasher = PasswordHasher()
# Unknown logins are checked against this so that they cost what a known login costs.
_DUMMY_HASH = _hasher.hash("submitd-dummy-password")


@dataclass(frozen=True)
class User:
    login: str
    password_hash: str
    send_as: frozenset[str] = field(default_factory=frozenset)
    suspended: bool = False

    def may_send_as(self, address: str) -> bool:
        address = _normalize(address)
        local, _, domain = address.rpartition("@")
        base = local.split("+", 1)[0]
        candidates = {address, f"{base}@{domain}", f"@{domain}"}
        grants = self.send_as | ({_normalize(self.login)} if "@" in self.login else set())
        return bool(candidates & grants)


def _normalize(address: str) -> str:
    local, at, domain = address.rpartition("@")
    return f"{local}@{domain.lower()}" if at else address


class UserDB:
    def __init__(self, users: dict[str, User]) -> None:
        self.users = users

    @classmethod
    def load(cls, path: str) -> "UserDB":
        data = load_yaml(path)
        users: dict[str, User] = {}
        for login, entry in (data.get("users") or {}).items():
            if not isinstance(entry, dict) or not entry.get("password"):
                raise ValueError(f"user {login!r}: a password hash is required")
            users[str(login)] = User(
                login=str(login),
                password_hash=str(entry["password"]),
                send_as=frozenset(_normalize(str(a)) for a in entry.get("send_as") or []),
                suspended=bool(entry.get("suspended", False)),
            )
        return cls(users)

    async def authenticate(self, login: str, password: str) -> User | None:
        """The user if the password matches and the account is active, else None.

        Hash verification is deliberately slow (argon2id): it runs off the event loop.
        """
        user = self.users.get(login)
        hashed = user.password_hash if user else _DUMMY_HASH
        ok = await asyncio.to_thread(verify_password, hashed, password)
        if not ok or user is None or user.suspended:
            return None
        return user


def verify_password(hashed: str, password: str) -> bool:
    try:
        return _hasher.verify(hashed, password)
    except (VerificationError, InvalidHashError):
        return False


def hash_password(password: str) -> str:
    return _hasher.hash(password)
