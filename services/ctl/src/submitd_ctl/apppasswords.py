"""``submitctl app-password add|ls|revoke``: SMTP-only app passwords, in the NATS KV bucket that
every policy replica mirrors (``submitd_common.apppasswords``).

submitctl reaches NATS with a user of its own (``submitctl`` in ``submitd_common.natsauth``),
which may write and purge app passwords and nothing else: with ``--local``, the stack's
``run.json`` names the server and the passwords file; on a cluster, its password is in the
release's ``<release>-submitd-nats-auth`` Secret and the server is reached at ``--nats-url`` (e.g.
through ``kubectl port-forward``)."""

from __future__ import annotations

import asyncio
import re
import sys
import time
from datetime import datetime, timezone

import nats
from nats.js.errors import BucketNotFoundError

from submitd_common import apppasswords as records
from submitd_common.jetstream import APPPASSWORDS_BUCKET

from . import output
from .documents import ChangeError
from .site import SiteError

# A revoked entry's purge marker is kept this long (seconds), then goes: a policy replica
# that missed the purge reads the bucket whole again anyway when it reconnects.
MARKER_TTL = 86400


async def _connect(options: dict):
    async def quiet(e: Exception) -> None:  # the failure is raised to the caller
        pass

    where = ",".join(re.sub(r"//[^@/]*@", "//", s) for s in options.get("servers") or [])  # no credentials
    try:
        nc = await nats.connect(**options, allow_reconnect=False, connect_timeout=5, max_reconnect_attempts=0,
                                error_cb=quiet)
    except Exception as e:
        raise SiteError(f"NATS at {where} could not be reached as {options.get('user')}: {type(e).__name__} {e}") from e
    js = nc.jetstream(timeout=5)
    try:
        kv = await js.key_value(APPPASSWORDS_BUCKET)
    except BucketNotFoundError:
        await nc.close()
        raise SiteError("there is no app-password store yet: policy's provisioning makes it before policy starts "
                        "(with app passwords on)") from None
    except Exception as e:
        await nc.close()
        raise SiteError(f"NATS at {where}: {type(e).__name__} {e}") from e
    return nc, js, kv


def run(coroutine):
    try:
        return asyncio.run(coroutine)
    except (ChangeError, SiteError):
        raise
    except Exception as e:  # a request refused or timed out half-way
        raise SiteError(f"NATS: {type(e).__name__} {e}") from e


async def _entries(js, kv, login: str) -> dict[str, tuple[records.AppPassword, int | None]]:
    """id -> (record, last used) of ``login``'s app passwords."""
    found = await records.read_entries(js, kv, APPPASSWORDS_BUCKET, f"*.{records.login_key(login)}.*")
    out = {}
    for key, (value, _) in found.items():
        kind, _, rest = key.partition(".")
        if kind != records.ENTRY:
            continue
        record = records.AppPassword.from_json(value)
        if record.login != login:
            continue
        used = found.get(f"{records.USED}.{rest}")
        out[record.ident] = (record, records.last_used_of(used[0]) if used else None)
    return out


async def add(options: dict, login: str, name: str) -> tuple[records.AppPassword, str]:
    nc, js, kv = await _connect(options)
    try:
        if len(await _entries(js, kv, login)) >= records.MAX_PER_LOGIN:
            raise ChangeError(f"{login} has {records.MAX_PER_LOGIN} app passwords already: revoke one first")
        record, password = records.new(login, name, time.time())
        await kv.create(record.key, record.to_json())
        return record, password
    finally:
        await nc.close()


async def listing(options: dict, login: str) -> list[dict]:
    nc, js, kv = await _connect(options)
    try:
        entries = await _entries(js, kv, login)
    finally:
        await nc.close()
    return [{"id": r.ident, "name": r.name, "created": _when(r.created), "last_used": _when(used) if used else "never"}
            for r, used in sorted(entries.values(), key=lambda e: (e[0].created, e[0].ident))]


async def revoke(options: dict, login: str, ident: str | None) -> list[records.AppPassword]:
    """Revoke ``login``'s app password ``ident``, or all of them (None); returns those revoked."""
    nc, js, kv = await _connect(options)
    try:
        entries = await _entries(js, kv, login)
        if ident is not None and ident not in entries:
            raise ChangeError(f"{login} has no app password {ident} (see `submitctl app-password ls {login}`)")
        gone = [entries[ident][0]] if ident is not None else [r for r, _ in entries.values()]
        for record in gone:
            await kv.purge(records.entry_key(login, record.ident), msg_ttl=MARKER_TTL)
            await kv.purge(records.used_key(login, record.ident), msg_ttl=MARKER_TTL)
        return gone
    finally:
        await nc.close()


def revoke_removed_user(site, login: str) -> None:
    """After ``user rm``: a login made again later must not find the old one's app passwords.
    Best effort: the user is removed either way, and what could not be done is said."""
    try:
        gone = run(revoke(site.nats_options(None), login, None))
    except (SiteError, ChangeError) as e:
        print(f"submitctl: the app passwords of {login} (if any) were not revoked: {e}; "
              f"run `submitctl app-password revoke {login} --all`", file=sys.stderr)
        return
    if gone:
        print(f"{len(gone)} app password{'s' if len(gone) != 1 else ''} of {login} revoked")


def _when(unix: int) -> str:
    return datetime.fromtimestamp(unix, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- what the commands print --------------------------------------------------------------


def show_added(fmt: str, record: records.AppPassword, password: str) -> None:
    if fmt != "table":
        output.emit(fmt, {"login": record.login, "id": record.ident, "name": record.name,
                          "created": _when(record.created), "password": password}, [])
        return
    print(f"App password {record.ident} ({record.name}) for {record.login}. It is shown only this once:\n\n"
          f"  {password}\n\n"
          f"It works for SMTP submission only (AUTH PLAIN or LOGIN as {record.login}), until "
          f"`submitctl app-password revoke {record.login} {record.ident}`.")


def check_name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > 64 or not name.isprintable():
        raise ChangeError("--name: 1 to 64 printable characters, e.g. the device or script it is for")
    return name
