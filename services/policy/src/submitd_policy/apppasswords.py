"""SMTP-only app passwords, as every policy replica checks them: a local mirror of the NATS KV
bucket that ``submitctl app-password`` writes (the record: ``submitd_common.apppasswords``).

- An AUTH reads nothing remote: the mirror is a dict in memory, and checking a password against
  a login's app passwords is one HMAC per app password of that login (they are 160 random bits,
  so a fast keyed hash is a sound verifier; see ``submitd_common.apppasswords``).
- The mirror follows the bucket with a subscription to its subjects: an app password revoked is
  gone from every replica as soon as the purge reaches it (milliseconds). It is read whole when
  policy starts, after every reconnection to NATS (what was published meanwhile was missed) and
  every ``app_passwords_resync_seconds``; changes that arrive during a read are applied on top.
- While the mirror may be stale (NATS unreachable, or reconnected and not read again yet), a
  password that matches an app password is answered 454 4.7.0 (``AppPasswordsUnavailable``):
  it may have been revoked meanwhile. Main passwords are not affected.
- The last-used time is written at most once per ``app_passwords_last_used_seconds`` per app
  password across all replicas (each one sees the others' writes; a compare-and-set settles a
  tie), in the background: an AUTH never waits for it.

Policy's NATS user may read the bucket and write ``used.*`` keys, nothing else: it can neither
make nor revoke an app password (``submitd_common.natsauth``).
"""

from __future__ import annotations

import asyncio
import logging
import time

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from prometheus_client import Counter, Gauge

from submitd_common import apppasswords as records
from submitd_common.apppasswords import AppPassword
from submitd_common.jetstream import APPPASSWORDS_BUCKET

from .directories.base import DirectoryUnavailable
from .localcopy import LocalCopy

log = logging.getLogger("submitd.policy")

ENTRIES = Gauge("submitd_policy_app_passwords", "App passwords in this replica's mirror")
USES = Counter("submitd_policy_app_password_logins_total", "AUTHs that succeeded with an app password")
RELOADS = Counter("submitd_policy_app_password_reloads_total", "Whole reads of the app-password bucket", ["result"])
_PREFIX = f"$KV.{APPPASSWORDS_BUCKET}."


class AppPasswordsUnavailable(DirectoryUnavailable):
    """The password is one of the login's app passwords, but the mirror may be stale: 454."""


class AppPasswords(LocalCopy):
    what = "app passwords"

    def __init__(self, nc, *, last_used_seconds: float = 60, resync_seconds: float = 300, clock=time.time) -> None:
        super().__init__(nc, resync_seconds)
        self.js = nc.jetstream()
        self.last_used_seconds = last_used_seconds
        self.clock = clock
        self.kv = None
        self._entries: dict[str, dict[str, AppPassword]] = {}  # login hash -> id -> record
        self._used: dict[str, int] = {}  # used.* key -> last used (unix seconds), as stored
        self._written: dict[str, float] = {}  # used.* key -> when this replica last wrote it
        self._buffer: list[tuple[str, str | None, bytes]] | None = None  # changes seen during a read
        self._sub = None
        self._tasks: set[asyncio.Task] = set()

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self, timeout: float = 10.0) -> None:
        """Follow the bucket and read it whole (as provisioning made it: streams.app_passwords).
        What fails is retried in the background: meanwhile no app password is accepted, and
        policy serves main passwords as ever."""
        self._sub = await self.nc.subscribe(f"{_PREFIX}>", cb=self._on_change)
        await self._start_reading(timeout)

    async def _open(self):
        # As provisioning made it (streams.app_passwords); until then reload() fails and is retried.
        return await self.js.key_value(APPPASSWORDS_BUCKET)

    async def close(self) -> None:
        for task in [self._supervisor, *self._tasks]:
            if task is not None:
                task.cancel()
        if self._sub is not None and not self.nc.is_closed:
            try:
                await self._sub.unsubscribe()
            except Exception:  # (a closing connection)
                pass

    def __len__(self) -> int:
        return sum(len(v) for v in self._entries.values())

    # -- the check -------------------------------------------------------------------------

    def check(self, login: str, password: str) -> AppPassword | None:
        """The app password of ``login`` that ``password`` is, or None. Raises
        AppPasswordsUnavailable when it is one but the mirror may be stale."""
        letters = records.normalize(password)
        if letters is None:
            return None
        for record in self._entries.get(records.login_key(login), {}).values():
            if record.matches(login, letters):
                if not self.current:
                    raise AppPasswordsUnavailable("app passwords: the mirror of NATS KV is not current")
                USES.inc()
                self._note_use(record)
                return record
        return None

    def for_login(self, login: str) -> list[AppPassword]:
        return [r for r in self._entries.get(records.login_key(login), {}).values() if r.login == login]

    # -- last used -------------------------------------------------------------------------

    def _note_use(self, record: AppPassword) -> None:
        key = records.used_key(record.login, record.ident)
        now = self.clock()
        if now - max(self._used.get(key, 0), self._written.get(key, 0)) < self.last_used_seconds:
            return
        self._written[key] = now
        task = asyncio.create_task(self._write_used(key, now))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write_used(self, key: str, now: float) -> None:
        try:
            try:
                entry = await self.kv.get(key)
            except KeyNotFoundError:
                await self.kv.create(key, records.last_used_json(now))
                return
            if now - records.last_used_of(entry.value or b"") < self.last_used_seconds:
                return  # another replica wrote it
            await self.kv.update(key, records.last_used_json(now), last=entry.revision)
        except KeyWrongLastSequenceError:
            pass  # another replica wrote it at the same moment
        except Exception as e:
            log.info("app password last-used time not written: %s", type(e).__name__)

    # -- following the bucket ----------------------------------------------------------------

    async def _on_change(self, msg) -> None:
        op = (msg.headers or {}).get("KV-Operation")
        self._apply(self._entries, self._used, msg.subject, op, msg.data)
        if self._buffer is not None:
            self._buffer.append((msg.subject, op, msg.data))
        ENTRIES.set(len(self))

    def _apply(self, entries: dict, used: dict, subject: str, op: str | None, data: bytes) -> None:
        key = subject.removeprefix(_PREFIX)
        kind, _, rest = key.partition(".")
        login_hash, _, ident = rest.partition(".")
        if kind == records.USED:
            if op in ("DEL", "PURGE"):
                used.pop(key, None)
            else:
                used[key] = records.last_used_of(data)
            return
        if kind != records.ENTRY or not ident:
            return
        if op in ("DEL", "PURGE"):
            entries.get(login_hash, {}).pop(ident, None)
            if not entries.get(login_hash, True):
                del entries[login_hash]
            self._written.pop(f"{records.USED}.{rest}", None)
            return
        try:
            record = AppPassword.from_json(data)
        except (ValueError, KeyError, TypeError) as e:
            log.warning("unreadable app password entry %s: %s", ident, type(e).__name__)
            return
        if records.login_key(record.login) != login_hash or record.ident != ident:
            log.warning("app password entry %s is not under its login's key: ignored", ident)
            return
        entries.setdefault(login_hash, {})[ident] = record

    async def reload(self) -> None:
        """Read the bucket whole and replace the mirror with it (and whatever changed meanwhile)."""
        reconnects = self.nc.stats["reconnects"]
        if self.kv is None:
            self.kv = await self._open()
        self._buffer = []
        try:
            found = await records.read_entries(self.js, self.kv, APPPASSWORDS_BUCKET)
            entries: dict[str, dict[str, AppPassword]] = {}
            used: dict[str, int] = {}
            for key, (value, _) in found.items():
                self._apply(entries, used, _PREFIX + key, None, value)
            for subject, op, data in self._buffer:
                self._apply(entries, used, subject, op, data)
        except BaseException:
            RELOADS.labels("failed").inc()
            raise
        finally:
            self._buffer = None
        self._entries, self._used = entries, used
        self._loaded(reconnects)
        ENTRIES.set(len(self))
        RELOADS.labels("ok").inc()

