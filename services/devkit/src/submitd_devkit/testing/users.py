"""The tests' users: the one every test stack knows (``default_users``) and the SMTP helpers
log in as (``smtp.logged_in``)."""

from __future__ import annotations

from submitd_devkit.stack import User

ALICE = "alice@example.test"
ALICE_PASSWORD = "correct horse battery staple"


def default_users() -> dict[str, User]:
    return {ALICE: User(ALICE_PASSWORD, [ALICE, "@alias.example.test"])}
