"""Message bodies in the JetStream Object Store, written and read as streams.

nats-py's ``ObjectStore.put`` takes bytes or a blocking file, and its ``get`` pushes every chunk
of an object into the client as fast as the server sends them: neither lets a message flow
through a service without being held whole. These write and read the same objects (the same
subjects, the same metadata record, so ``ObjectStore.list/get/delete`` and the orphan sweep see
them) a chunk at a time:

- :class:`BodyWriter` publishes each chunk as it comes, with at most ``window`` chunks waiting
  for their acknowledgement: a slow server slows the writer, nothing piles up. The object exists
  (its metadata is published) only once every chunk is stored; an abandoned write purges its chunks.
- :func:`read_chunks` asks for one chunk at a time (a direct get of the next message on the
  object's chunk subject, one request ahead): the reader's pace sets the transfer's pace.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timezone

from nats.js import JetStreamContext, api
from nats.js.errors import NotFoundError, ObjectNotFoundError

log = logging.getLogger(__name__)

CHUNK = 256 << 10  # (nats-py's is 128 KiB: fewer, larger publishes cost less CPU on both sides)
WINDOW = 3  # chunks awaiting their acknowledgement, per writer


def stream_name(bucket: str) -> str:
    return f"OBJ_{bucket}"


def chunk_subject(bucket: str, nuid: str) -> str:
    return f"$O.{bucket}.C.{nuid}"


def meta_subject(bucket: str, name: str) -> str:
    return f"$O.{bucket}.M.{base64.urlsafe_b64encode(name.encode()).decode()}"


class BodyWriter:
    """One object, written a chunk at a time. ``close()`` makes it exist; ``abort()`` removes
    what was written. Counts its size and whether all of it is ASCII (for BODY=8BITMIME)."""

    def __init__(self, js: JetStreamContext, bucket: str, name: str, *, timeout: float,
                 chunk: int = CHUNK, window: int = WINDOW,
                 abandon: Callable[[str], Awaitable[None]] | None = None) -> None:
        """``abandon(nuid)``: how an aborted write's chunks go, for a writer that may not purge
        them itself (the frontend asks the relay); without it they are purged here."""
        self.js = js
        self.abandon = abandon
        self.bucket = bucket
        self.name = name
        self.timeout = timeout
        self.chunk = chunk
        self.window = window
        self.nuid = js._nc._nuid.next().decode()
        self.subject = chunk_subject(bucket, self.nuid)
        self.buffer = bytearray()
        self.pending: deque[asyncio.Future] = deque()
        self.sha = hashlib.sha256()
        self.size = 0
        self.chunks = 0
        self.ascii = True
        self.closed = False

    async def write(self, data: bytes) -> None:
        if not data:
            return
        self.ascii = self.ascii and data.isascii()
        self.buffer += data
        while len(self.buffer) >= self.chunk:
            piece = bytes(self.buffer[: self.chunk])
            del self.buffer[: self.chunk]
            await self._publish(piece)

    async def _publish(self, piece: bytes) -> None:
        while len(self.pending) >= self.window:
            await self._settle(self.pending.popleft())
        self.sha.update(piece)
        self.size += len(piece)
        self.chunks += 1
        self.pending.append(await self.js.publish_async(self.subject, piece))

    async def _settle(self, future: asyncio.Future) -> None:
        try:
            await asyncio.wait_for(future, self.timeout)
        except BaseException:
            future.cancel()
            raise

    async def close(self) -> api.ObjectInfo:
        """Store what is left, wait for every chunk, then publish the metadata."""
        if self.buffer:
            piece, self.buffer = bytes(self.buffer), bytearray()
            await self._publish(piece)
        while self.pending:
            await self._settle(self.pending.popleft())
        info = api.ObjectInfo(
            name=self.name, bucket=self.bucket, nuid=self.nuid, size=self.size, chunks=self.chunks,
            mtime=datetime.now(timezone.utc).isoformat(),
            digest="SHA-256=" + base64.urlsafe_b64encode(self.sha.digest()).decode(),
            options=api.ObjectMetaOptions(max_chunk_size=self.chunk),
        )
        await self.js.publish(
            meta_subject(self.bucket, self.name), json.dumps(info.as_dict()).encode(),
            headers={api.Header.ROLLUP: "sub"}, timeout=self.timeout,
        )
        self.closed = True
        return info

    async def abort(self) -> None:
        """Forget the object: nothing refers to its chunks, so they go now (or, if NATS is
        away, to the sweep of chunks without metadata)."""
        pending, self.pending = list(self.pending), deque()
        self.buffer = bytearray()
        if pending:
            # A chunk already sent may be stored after a purge sent behind it (the stream and
            # the JetStream API are served apart): wait for those acknowledgements first, or
            # the purge can miss them and leave them to the sweep.
            await asyncio.wait(pending, timeout=2.0)
            for future in pending:
                future.cancel()
        if self.chunks and not self.closed:
            try:
                if self.abandon is not None:
                    await asyncio.wait_for(self.abandon(self.nuid), 2.0)
                    return
                await asyncio.wait_for(self.js.purge_stream(stream_name(self.bucket), subject=self.subject), 2.0)
            except Exception as e:
                log.info("could not remove the chunks of an unfinished body %s: %r", self.name, e)


async def object_info(js: JetStreamContext, bucket: str, name: str) -> api.ObjectInfo:
    try:
        raw = await js.get_msg(stream_name(bucket), subject=meta_subject(bucket, name), direct=True)
    except NotFoundError:
        raise ObjectNotFoundError from None
    info = api.ObjectInfo.from_response(json.loads(raw.data))
    if info.deleted:
        raise ObjectNotFoundError
    return info


async def delete(js: JetStreamContext, bucket: str, name: str) -> None:
    """Remove an object and every trace of it: its chunks, and its metadata record too (nats-py's
    ``ObjectStore.delete`` leaves a "deleted" record behind, one per message, forever)."""
    stream = stream_name(bucket)
    try:
        info = await js.get_msg(stream, subject=meta_subject(bucket, name), direct=True)
        nuid = json.loads(info.data).get("nuid", "")
    except NotFoundError:
        return
    if nuid:
        await js.purge_stream(stream, subject=chunk_subject(bucket, nuid))
    await js.purge_stream(stream, subject=meta_subject(bucket, name))


async def read_chunks(js: JetStreamContext, bucket: str, name: str) -> AsyncIterator[bytes]:
    """The object's chunks in order, one request ahead of the consumer; the digest is checked
    at the end (a damaged body raises rather than being delivered)."""
    info = await object_info(js, bucket, name)
    if not info.size:
        return
    stream, subject = stream_name(bucket), chunk_subject(bucket, info.nuid)

    def fetch(seq: int) -> asyncio.Task:
        return asyncio.ensure_future(js.get_msg(stream, seq=seq, subject=subject, next=True, direct=True))

    sha = hashlib.sha256()
    size = 0
    ahead = fetch(1)
    try:
        for n in range(info.chunks):
            raw = await ahead
            ahead = fetch(raw.seq + 1) if n + 1 < info.chunks else None
            data = raw.data or b""
            sha.update(data)
            size += len(data)
            yield data
    finally:
        if ahead is not None:
            ahead.cancel()
    want = base64.urlsafe_b64decode(info.digest.partition("=")[2])
    if size != info.size or sha.digest() != want:
        raise ValueError(f"body {name} is damaged: size or digest differs from its metadata")


async def list_objects(js: JetStreamContext, bucket: str) -> list[api.ObjectInfo]:
    """The objects of ``bucket`` (not deleted ones). nats-py's ``ObjectStore.list`` can wait
    forever when the last object is removed while it starts (it checks, then subscribes):
    here each metadata subject the stream holds is read once."""
    stream = stream_name(bucket)
    try:
        info = await js.stream_info(stream, subjects_filter=f"$O.{bucket}.M.>")
    except NotFoundError:
        return []
    out = []
    for subject in info.state.subjects or {}:
        try:
            raw = await js.get_msg(stream, subject=subject, direct=True)
        except NotFoundError:
            continue  # removed meanwhile
        obj = api.ObjectInfo.from_response(json.loads(raw.data))
        if not obj.deleted:
            out.append(obj)
    return out


async def sweep_unfinished(js: JetStreamContext, bucket: str, min_age: float) -> int:
    """Purge chunk subjects that no object's metadata names and that got nothing for
    ``min_age`` seconds: the writes of a service that died mid-message."""
    stream = stream_name(bucket)
    info = await js.stream_info(stream, subjects_filter=f"$O.{bucket}.C.>")
    subjects = info.state.subjects or {}
    live = {obj.nuid for obj in await list_objects(js, bucket)}
    removed = 0
    for subject in subjects:
        prefix = f"$O.{bucket}.C."
        if not subject.startswith(prefix) or subject[len(prefix):] in live:
            continue
        last = await js.get_msg(stream, subject=subject)  # not direct: carries the time
        if last.time is not None and time.time() - last.time.timestamp() < min_age:
            continue
        await js.purge_stream(stream, subject=subject)
        removed += 1
    return removed


async def purge_abandoned(js: JetStreamContext, bucket: str, nuid: str) -> bool:
    """Remove the chunks of an abandoned write named by its nuid (random, 22 characters: known
    only to its writer). False for a malformed one."""
    if not (len(nuid) == 22 and nuid.isascii() and nuid.isalnum()):
        return False
    await js.purge_stream(stream_name(bucket), subject=chunk_subject(bucket, nuid))
    return True
