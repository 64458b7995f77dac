"""Policy's admin API: the users every directory knows, and what one login may do, as policy
sees them now (``submitctl user ls`` and ``user show``). Behind the admin token; never a
password, a hash or a token in an answer."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Query
from pydantic import BaseModel

from submitd_common.adminauth import authorizer

from .directories import Account, DirectoryUnavailable
from .directories.chain import Directories


class UserView(BaseModel):
    login: str
    source: str  # the directory that answered: file, ldap, sql
    detail: str = ""  # where in it (a DN, a table, a file)
    send_as: list[str]  # its groups' addresses included; the login itself when it is an address
    act_as: list[str]
    suspended: bool
    scheme: str  # the password hash's scheme (argon2id, 2y, 6), or "directory" when the directory checks it (a bind)
    limits: dict[str, int]  # the user's own limits; the site's apply where absent
    allow_recipients: list[str] | None  # None: any recipient
    deny_recipients: list[str]


class UserListing(BaseModel):
    users: list[UserView]
    unavailable: list[str]  # directories that could not be asked


def view(account: Account) -> UserView:
    user = account.user
    hashed = user.password_hash.split("}", 1)[-1]
    limits = {k: v for k in ("messages_per_hour", "recipients_per_hour") if (v := getattr(user.limits, k)) is not None}
    return UserView(
        login=user.login, source=account.source, detail=account.detail,
        send_as=sorted(user.send_as), act_as=sorted(user.act_as), suspended=user.suspended,
        scheme=(hashed.split("$")[1] if hashed.count("$") > 1 else "unknown") if user.password_hash else "directory",
        limits=limits, allow_recipients=sorted(user.allow_recipients) if user.allow_recipients is not None else None,
        deny_recipients=sorted(user.deny_recipients),
    )


def router(settings, directories: Directories) -> APIRouter:
    api = APIRouter(prefix="/api/v1", dependencies=[Depends(authorizer(settings, "users"))], tags=["users"])

    @api.get("/users", response_model=UserListing, summary="The logins each directory knows (a page of each)")
    async def users(limit: int = Query(1000, ge=1, le=100_000)) -> UserListing:
        rows: list[UserView] = []
        unavailable: list[str] = []
        seen: set[str] = set()
        for directory in directories.directories:
            try:
                accounts = await directories.listing(directory, limit)
            except DirectoryUnavailable:
                unavailable.append(directory.name)
                continue
            for account in accounts:
                if account.login not in seen:  # the first directory that knows a login answers for it
                    seen.add(account.login)
                    rows.append(view(account))
        return UserListing(users=rows, unavailable=unavailable)

    @api.get("/users/{login}", response_model=UserView, summary="One login: which directory, what it may do")
    async def user(login: str) -> UserView:
        directories.forget(login)  # the directory's answer now, not the cached one
        try:
            account = await directories.lookup(login)
        except DirectoryUnavailable as e:
            raise HTTPException(503, f"directory unavailable: {e}") from None
        if account is None:
            raise HTTPException(404, f"no directory knows {login}")
        return view(account)

    return api
