"""A policy replica's own copy of counters kept in NATS KV (``counters.py``): an AUTH reads its
lockout counters here, in memory, while every write stays a compare-and-set in KV.

- The server republishes each write the bucket *stores* to ``submitd.mirror.<bucket>.<key>``
  (``jetstream.ensure_kv(mirror_keys=...)``), with its revision (``Nats-Sequence``) and time
  (``Nats-Time-Stamp``); the mirror follows them with a plain core-NATS subscription, no
  consumer (``submitd_common.natsauth``). The bucket's own subjects (``$KV.<bucket>.>``) would
  not do: a compare-and-set that lost is published there all the same, without revision or time.
- A write replaces an older revision only. This replica's own writes go in as soon as KV
  acknowledges them; the server's copy, arriving later, changes nothing but their time.
- An entry counts until its write's time plus the bucket's max age, as in KV (an expiry is
  published nowhere). A delete or purge (``KV-Operation``) is kept as a zero at its revision,
  so that nothing older arriving late can bring the count back.
- Read whole at start, after every reconnection (what was published meanwhile was missed), when
  messages were dropped (a slow consumer) and every ``resync_seconds`` (a purge of the whole
  stream publishes nothing); what arrives during a read is applied on top. Until then, or while
  NATS is unreachable, ``lookup`` answers None and the counters read KV as before: a mirror that
  may have missed a write never answers. Nor does one that did not hear the server's copy of one
  of this replica's writes within ``UNHEARD_SECONDS`` (a grant or a bucket set up otherwise),
  until it hears anything again.

Memory: per key, a dict slot, the key (~40 characters) and a tuple of value, revision and time,
about 230 bytes (``test_lockout_mirror.py`` measures it); a key lives as long as in KV.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from datetime import datetime

from nats.errors import SlowConsumerError
from nats.js.errors import NotFoundError
from prometheus_client import Counter, Gauge

from submitd_common.jetstream import mirror_subject

from .localcopy import LocalCopy

log = logging.getLogger("submitd.policy")

ENTRIES = Gauge("submitd_policy_mirror_entries", "Counters in this replica's mirror of a KV bucket", ["bucket"])
RELOADS = Counter("submitd_policy_mirror_reloads_total", "Whole reads of a mirrored KV bucket", ["bucket", "result"])
DELETED = ("DEL", "PURGE")
READ_CONCURRENCY = 32
UNHEARD_SECONDS = 5.0


class NotRepublished(RuntimeError):
    """The bucket's writes are not republished where the mirror listens: it would never hear one."""


class KvMirror(LocalCopy):
    def __init__(self, nc, bucket: str, keys: str = ">", *, resync_seconds: float = 300.0,
                 unheard_seconds: float = UNHEARD_SECONDS, clock=time.time) -> None:
        super().__init__(nc, resync_seconds)
        self.js = nc.jetstream()
        self.bucket, self.keys = bucket, keys
        self.what = f"mirror of {bucket}"
        self.stream = f"KV_{bucket}"
        self.unheard_seconds = unheard_seconds
        self.clock = clock
        self.max_age = 0.0  # the bucket's, from its configuration at each whole read (0: none)
        self._prefix = f"$KV.{bucket}."
        self._covered = keys.removesuffix(">")  # the keys mirrored: those starting with this
        self._entries: dict[str, tuple[int | None, int, float]] = {}  # key -> (value, revision, written)
        self._buffer: list[tuple[str, int | None, int, float]] | None = None  # applied during a read
        self._heard = 0  # the newest revision heard from the server (its copy may come before KV's ack)
        self._unheard: tuple[int, float] | None = None  # an own write's revision, and when, not heard back yet
        self._deaf = False  # an own write was never heard back: answer nothing until a message comes
        self._sub = None
        self._swept = time.monotonic()

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self, timeout: float = 10.0) -> None:
        """Follow the bucket and read it whole; what fails is retried in the background (the
        counters read KV meanwhile)."""
        self._sub = await self.nc.subscribe(mirror_subject(self.bucket, self.keys), cb=self._on_message)
        await self._start_reading(timeout)

    async def close(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
        if self._sub is not None and not self.nc.is_closed:
            try:
                await self._sub.unsubscribe()
            except Exception:  # (a closing connection)
                pass

    def dropped(self, error: Exception) -> None:
        """The connection's error callback: messages of this mirror's subscription were dropped
        (this replica too slow to take them), so it may have missed a write."""
        if isinstance(error, SlowConsumerError) and self._sub is not None and error.sub is self._sub:
            log.warning("mirror of %s dropped messages: reading it again", self.bucket)
            self._loaded_at = None

    @property
    def current(self) -> bool:
        """Read whole since the last reconnection, connected, and hearing its own writes: no write
        can have been missed."""
        return not self._deaf and super().current

    def __len__(self) -> int:
        return len(self._entries)

    # -- reading ---------------------------------------------------------------------------

    def covers(self, key: str) -> bool:
        return key.startswith(self._covered)

    def lookup(self, key: str) -> tuple[int, int | None] | None:
        """The key's (value, revision): (0, None) when it has none (or it expired), None when
        the mirror cannot answer (not current, or a value that is no count)."""
        if not self.current:
            return None
        entry = self._entries.get(key)
        if entry is None:
            return 0, None
        value, revision, written = entry
        if self.max_age and self.clock() - written >= self.max_age:
            return 0, None  # gone from KV as well (or going: its expiry runs about every second)
        if value is None:
            return None
        return value, revision

    # -- following the bucket ----------------------------------------------------------------

    def note(self, key: str, value: int, revision: int) -> None:
        """This replica's own write, acknowledged by KV at ``revision``."""
        now = self.clock()
        self._apply(self._entries, key, value, revision, now)
        if self._buffer is not None:
            self._buffer.append((key, value, revision, now))
        if self._unheard is None and revision > self._heard:
            self._unheard = (revision, time.monotonic())

    async def _on_message(self, msg) -> None:
        headers = msg.headers or {}
        try:
            key = headers["Nats-Subject"].removeprefix(self._prefix)
            revision = int(headers["Nats-Sequence"])
            written = datetime.fromisoformat(headers["Nats-Time-Stamp"]).timestamp()
        except (KeyError, ValueError) as e:
            log.warning("mirror of %s: a message without its write's revision or time: %s", self.bucket, e)
            return
        value = 0 if headers.get("KV-Operation") in DELETED else _count(msg.data)
        self._apply(self._entries, key, value, revision, written)
        if self._buffer is not None:
            self._buffer.append((key, value, revision, written))
        self._deaf = False
        self._heard = max(self._heard, revision)
        if self._unheard is not None and revision >= self._unheard[0]:
            self._unheard = None  # (revisions are the stream's sequence: this one came after it)

    @staticmethod
    def _apply(entries: dict, key: str, value: int | None, revision: int, written: float) -> None:
        old = entries.get(key)
        if old is None or revision >= old[1]:
            entries[key] = (value, revision, written)

    async def reload(self) -> None:
        """Read the bucket whole and replace the mirror with it (and whatever arrived meanwhile)."""
        reconnects = self.nc.stats["reconnects"]
        self._buffer = []
        try:
            subjects, config = await self._subjects()
            republish = config.get("republish") or {}
            if ((republish.get("src"), republish.get("dest"), republish.get("headers_only", False))
                    != (f"{self._prefix}{self.keys}", mirror_subject(self.bucket, self.keys), False)):
                raise NotRepublished(f"{self.stream} republishes {republish or 'nothing'}")
            entries: dict[str, tuple[int | None, int, float]] = {}
            limit = asyncio.Semaphore(READ_CONCURRENCY)

            async def read(subject: str) -> None:
                async with limit:
                    try:
                        msg = await self.js.get_msg(self.stream, subject=subject)
                    except NotFoundError:
                        return  # expired meanwhile
                deleted = (msg.headers or {}).get("KV-Operation") in DELETED
                self._apply(entries, subject.removeprefix(self._prefix), 0 if deleted else _count(msg.data),
                            msg.seq, msg.time.timestamp())

            await asyncio.gather(*(read(s) for s in subjects))
            for item in self._buffer:
                self._apply(entries, *item)
        except BaseException:
            RELOADS.labels(self.bucket, "failed").inc()
            raise
        finally:
            self._buffer = None
        self._entries = entries
        self.max_age = config.get("max_age", 0) / 1e9  # nanoseconds
        self._loaded(reconnects)
        ENTRIES.labels(self.bucket).set(len(entries))
        RELOADS.labels(self.bucket, "ok").inc()

    async def _subjects(self) -> tuple[list[str], dict]:
        """The bucket's mirrored keys' subjects (stream info pages them, 100,000 at a time) and
        its configuration."""
        subjects: list[str] = []
        while True:
            request = {"subjects_filter": f"{self._prefix}{self.keys}", "offset": len(subjects)}
            reply = await self.nc.request(f"$JS.API.STREAM.INFO.{self.stream}", json.dumps(request).encode(), timeout=5)
            info = json.loads(reply.data)
            if "error" in info:
                raise RuntimeError(f"{self.stream}: {info['error'].get('description')}")
            page = list((info.get("state") or {}).get("subjects") or {})
            subjects += page
            if not page or len(subjects) >= info.get("total", 0):
                return subjects, info["config"]

    def sweep(self) -> None:
        """Forget what expired (its count is zero already)."""
        if self.max_age:
            oldest = self.clock() - self.max_age
            for key in [k for k, (_, _, written) in self._entries.items() if written <= oldest]:
                del self._entries[key]
        ENTRIES.labels(self.bucket).set(len(self._entries))

    def check_heard(self, now: float | None = None) -> None:
        """Deaf (answering nothing until a message comes) when the server's copy of an own write
        did not come within ``unheard_seconds``."""
        now = time.monotonic() if now is None else now
        if self._unheard is not None and now - self._unheard[1] >= self.unheard_seconds:
            log.error("mirror of %s did not hear this replica's own write: reading KV instead (may policy's "
                      "NATS user subscribe to %s?)", self.bucket, mirror_subject(self.bucket, self.keys))
            self._unheard, self._deaf = None, True

    def _tick(self) -> None:
        if time.monotonic() - self._swept >= 30:
            self._swept = time.monotonic()
            self.sweep()
        self.check_heard()


def _count(data: bytes) -> int | None:
    try:
        return int(data or b"0")
    except ValueError:
        return None  # read from KV, where it fails as it always did
