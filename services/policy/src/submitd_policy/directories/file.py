"""The users file (and a Dovecot passwd-file) as a directory: read into memory and watched, so a
lookup costs nothing remote and a change is seen at the next reload (``reload_interval``)."""

from __future__ import annotations

from submitd_common.files import WatchedFile
from submitd_common.users import UserDB

from .base import Account, Directory


class FileDirectory(Directory):
    name = "file"
    remote = False

    def __init__(self, users: WatchedFile[UserDB], path: str = "") -> None:
        self.users = users
        self.path = path

    async def lookup(self, login: str) -> Account | None:
        user = self.users.value.users.get(login)
        return None if user is None else Account(user, self.name, self.path)

    async def accounts(self, limit: int = 1000) -> list[Account]:
        users = self.users.value.users
        return [Account(users[login], self.name, self.path) for login in sorted(users)[:limit]]


def build(settings, users: WatchedFile[UserDB]) -> FileDirectory:
    return FileDirectory(users, settings.users_file)
