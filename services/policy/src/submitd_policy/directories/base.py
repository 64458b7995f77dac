"""Directories: where logins, their passwords and their rights come from.

A directory answers two questions about a login: who it is (``lookup``: its rights, as the users
file states them, and its password hash when the directory hands one out), and, for directories
that never hand out a hash (an LDAP bind), whether a password is right (``check_password``).
Several are chained (``chain.Directories``): the first that knows a login answers for it.

Every directory raises ``DirectoryUnavailable`` when it cannot answer (down, slow, its service
account refused): AUTH then answers ``454 4.7.0``, never ``535`` — a user is never told their
password is wrong because a directory is down. The chain adds what all of them share: the
attributes cache with its TTL, the grace for cached logins while a directory is down, the
timeout, metrics and spans. A directory itself does none of that.

Passwords and tokens never appear in an exception's text, a log line or a span.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from submitd_common.users import User


class DirectoryUnavailable(Exception):
    """The directory could not answer (down, slow, refused the service account): 454 4.7.0.
    The message says what failed (no password, no token)."""


@dataclass(frozen=True)
class Account:
    """A login as a directory knows it.

    ``user``: its rights as ``submitd_common.users.User`` holds them (send_as with the addresses of
    its groups folded in, act_as, limits, recipient rules, suspended). ``user.password_hash`` is the
    hash when the directory hands one out (the file, SQL, LDAP compare mode), in a form
    ``submitd_common.users.verify_password`` reads; "" when the directory checks passwords itself
    (LDAP bind mode: ``check_password``). ``source`` is the directory's name. ``detail``: what
    ``submitctl user show`` prints about where the login came from (a DN, a table), no secrets.
    """

    user: User
    source: str
    detail: str = ""

    @property
    def login(self) -> str:
        return self.user.login

    @property
    def verifier(self) -> str:
        """What a cached credential is bound to: a changed hash misses the cache by construction."""
        return self.user.password_hash


class Directory(ABC):
    """One source of logins. ``name`` appears in metrics, spans, logs and ``submitctl``."""

    name: str = "directory"
    remote: bool = True  # answers are cached by the chain for its TTL (the file: in memory already)

    async def start(self) -> None:
        """Connect and check the configuration before policy serves: a configuration the
        directory refuses (a wrong query, filter or attribute map) raises and stops the start;
        the directory being unreachable does not (it answers DirectoryUnavailable until it is back)."""

    @abstractmethod
    async def lookup(self, login: str) -> Account | None:
        """The login's account, or None when this directory does not know it.
        Raises DirectoryUnavailable when it cannot tell."""

    async def check_password(self, account: Account, password: str) -> bool:
        """Only for accounts without a hash (``account.verifier == ""``): whether ``password`` is
        right, asked of the directory itself (an LDAP bind). Raises DirectoryUnavailable."""
        raise NotImplementedError(f"{self.name} hands out password hashes")

    async def accounts(self, limit: int = 1000) -> list[Account]:
        """Some accounts this directory knows, for ``submitctl user ls`` (may be a page)."""
        return []

    def ready(self) -> bool:
        """Whether its last request succeeded (reported by /readyz, never gating it)."""
        return True

    async def close(self) -> None:
        """Let go of connections and pools."""
