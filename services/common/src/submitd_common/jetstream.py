"""The NATS connection and the JetStream queue every service agrees on."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError, BucketNotFoundError, NotFoundError

log = logging.getLogger(__name__)

STREAM = "SUBMITD_QUEUE"
SUBJECT_PREFIX = "submitd.queue"
SUBMIT_SUBJECT = f"{SUBJECT_PREFIX}.submit"
BODY_BUCKET = "SUBMITD_BODIES"
COUNTERS_BUCKET = "SUBMITD_COUNTERS"
AUTHFAIL_BUCKET = "SUBMITD_AUTHFAIL"
# The clients each login has authenticated from (hashed together), for the AUTH failure budget.
AUTHKNOWN_BUCKET = "SUBMITD_AUTHKNOWN"
# SMTP-only app passwords (submitd_common.apppasswords): written by submitctl, read by policy.
APPPASSWORDS_BUCKET = "SUBMITD_APPPASSWORDS"
# Per-queue-id delivery record: recipients done, attempts and their replies (relay).
DELIVERY_BUCKET = "SUBMITD_DELIVERY"
# TLS reporting (RFC 8460, relay): each replica's counts per day and policy domain, merged
# (counts.<day>.<domain>), and which replica sends each day's report (sent.<day>.<domain>).
TLSRPT_BUCKET = "SUBMITD_TLSRPT"
# MTA-STS policies (RFC 8461) the relay fetched, by domain: shared by every relay replica.
MTA_STS_BUCKET = "SUBMITD_MTA_STS"
# On a queue entry: a delivery record may exist for its queue id (an admin retry's copy).
RECORD_HEADER = "Submitd-Record"
# The one durable pull consumer every relay replica shares.
RELAY_DURABLE = "relay"
# Outcome events (core NATS, outside the queue stream): submitd.events.<delivered|deferred|bounced|...>
EVENTS_PREFIX = "submitd.events"
# A frontend's body write that was abandoned (core NATS, JSON {"nuid": ...}): the relay removes its
# chunks, since the internet-facing frontend may not purge anything itself.
ABANDONED_SUBJECT = "submitd.bodies.abandoned"
# A KV bucket's writes, as stored (each with its revision and time), republished by the server
# for the replicas that mirror it: <MIRROR_PREFIX>.<bucket>.<key>. Only accepted writes come
# here (a compare-and-set that lost is not stored), and only the server publishes here.
MIRROR_PREFIX = "submitd.mirror"
# Mirrored by every policy replica: the whole AUTHFAIL bucket, and of COUNTERS the logins' AUTH
# failure budgets (their windows' keys start with "authbudget."), not the rates.
BUDGET_KIND = "authbudget"
BUDGET_KEYS = f"{BUDGET_KIND}.>"

# JetStream's answer when a stream of that name exists with another configuration.
STREAM_NAME_IN_USE = 10058

# Acknowledged messages could be lost by older servers (fixed in 2.10.23).
MIN_SERVER_VERSION = (2, 10, 23)


class ServerTooOld(RuntimeError):
    pass


@dataclass(frozen=True)
class QueueConfig:
    max_bytes: int = 1 << 30
    replicas: int = 1
    # Longer than a frontend's publish retry (seconds) and than the relay's AckWait (30 s by
    # default): a DSN queued just before a relay crashed is not queued again on redelivery.
    duplicate_window_s: float = 1800.0


async def connect(name: str, options: dict, **kwargs) -> NATS:
    """Connect with endless reconnects: a NATS outage must never end a service."""

    async def error_cb(e: Exception) -> None:
        log.warning("nats error: %s", e)

    async def disconnected_cb() -> None:
        log.warning("nats disconnected")

    async def reconnected_cb() -> None:
        log.info("nats reconnected")

    nc = await nats.connect(
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=2,
        # A publish that finds the outgoing buffer full flushes it first; nats-py waits for
        # that flush without a limit by default, and a connection that died unnoticed never
        # completes it: the publish (and the session behind it) hung until a drain cut it.
        flush_timeout=5,
        allow_reconnect=True,
        error_cb=kwargs.pop("error_cb", error_cb),
        disconnected_cb=kwargs.pop("disconnected_cb", disconnected_cb),
        reconnected_cb=kwargs.pop("reconnected_cb", reconnected_cb),
        **options,
        **kwargs,
    )
    check_server_version(nc)
    return nc


async def close(nc: NATS, timeout: float = 5.0) -> None:
    """Drain (finish what is in flight, then close); a server that is gone ends it sooner."""
    try:
        await asyncio.wait_for(nc.drain(), timeout)
    except Exception as e:
        log.warning("nats drain incomplete: %r", e)
        if not nc.is_closed:
            await nc.close()


def mirror_subject(bucket: str, keys: str = ">") -> str:
    """Where the server republishes the writes of ``bucket``'s keys matching ``keys``."""
    return f"{MIRROR_PREFIX}.{bucket}.{keys}"


def republish(bucket: str, keys: str):
    from nats.js.api import RePublish

    return RePublish(src=f"$KV.{bucket}.{keys}", dest=mirror_subject(bucket, keys))


@dataclass(frozen=True)
class KvSpec:
    """A KV bucket as its service wants it: entries kept ``ttl`` seconds (0: until removed), and
    with ``mirror_keys``, the writes of those keys republished for mirrors (``mirror_subject``)."""

    bucket: str
    ttl: float
    replicas: int = 1
    mirror_keys: str | None = None


async def ensure_kv(js: JetStreamContext, bucket: str, ttl: float, replicas: int = 1, mirror_keys: str | None = None):
    """Provisioning's (submitd_common.provision): the KV bucket, created or brought to this TTL
    (a changed setting must not stop a restart); with ``mirror_keys``, its writes of those keys
    republished for mirrors. The services themselves may not create or change a stream
    (``open_kv``): a stream's configuration can copy it elsewhere (republish, sources)."""
    from nats.js.api import KeyValueConfig

    again = republish(bucket, mirror_keys) if mirror_keys else None
    try:
        await js.create_key_value(KeyValueConfig(bucket=bucket, history=1, ttl=ttl, replicas=replicas, republish=again))
    except BadRequestError as e:
        if e.err_code != STREAM_NAME_IN_USE:
            raise
        config = (await js.stream_info(f"KV_{bucket}")).config
        config.max_age = ttl
        config.num_replicas = replicas
        if ttl:
            config.duplicate_window = min(config.duplicate_window or ttl, ttl)  # may not exceed max age
        if again is not None:
            config.republish = again
        # Writes may carry a time to live of their own (the relay's finished delivery records):
        # set on buckets made before that (nats-py sets it on those it creates).
        config.allow_msg_ttl = True
        await js.update_stream(config)
    return await js.key_value(bucket)


def _kv_drift(spec: KvSpec, config: StreamConfig) -> list[str]:
    drift = []
    if abs((config.max_age or 0) - spec.ttl) > 0.001:
        drift.append(f"entries kept {config.max_age or 0:g} s, not {spec.ttl:g} s")
    want = mirror_subject(spec.bucket, spec.mirror_keys) if spec.mirror_keys else None
    have = config.republish.dest if config.republish else None
    if have != want:
        drift.append(f"writes republished to {have}, not {want}")
    if not config.allow_msg_ttl:
        drift.append("no time to live of a write's own allowed")
    return drift


async def open_kv(js: JetStreamContext, spec: KvSpec, *, every: float = 1.0):
    """The bucket as provisioning made it, waited for while it is not there yet (the chart's
    init container makes it before the service starts; ``make run`` and the tests likewise). A
    bucket whose configuration differs from this service's settings is used as it is, and
    said, loudly: a provisioning run with these settings brings it to them."""
    info = await provisioned(lambda: js.stream_info(f"KV_{spec.bucket}"), f"the {spec.bucket} bucket",
                             "submitd_<service>", every)
    drift = _kv_drift(spec, info.config)
    if drift:
        log.error("the %s bucket is not as this service's settings say (%s): run its provisioning "
                  "with these settings", spec.bucket, "; ".join(drift))
    return await js.key_value(spec.bucket)


def check_server_version(nc: NATS) -> None:
    v = nc.connected_server_version
    found = (v.major, v.minor, v.patch)
    if found < MIN_SERVER_VERSION:
        want = ".".join(map(str, MIN_SERVER_VERSION))
        raise ServerTooOld(
            f"nats-server {'.'.join(map(str, found))} is too old: submitd needs {want} or newer "
            "(older servers can lose acknowledged JetStream messages)"
        )


def stream_config(cfg: QueueConfig) -> StreamConfig:
    return StreamConfig(
        name=STREAM,
        subjects=[f"{SUBJECT_PREFIX}.>"],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        num_replicas=cfg.replicas,
        # A full queue refuses new messages; it never drops accepted ones.
        discard=DiscardPolicy.NEW,
        max_bytes=cfg.max_bytes,
        duplicate_window=cfg.duplicate_window_s,
    )


async def provisioned(lookup, what: str, service: str, every: float = 1.0):
    """``lookup()``'s answer once what it asks for exists: waited for while NATS says it does not
    (provisioning has not run yet), said every 30 s."""
    tries = 0
    while True:
        try:
            return await lookup()
        except NotFoundError:
            if tries % max(1, round(30 / every)) == 0:
                log.warning("waiting for %s: not provisioned yet (`python -m %s provision`, the chart's "
                            "init container)", what, service)
        tries += 1
        await asyncio.sleep(every)


async def wait_for_queue(js: JetStreamContext, every: float = 1.0) -> None:
    """Return once the queue stream and the body store exist (the relay's provisioning makes them)."""

    async def both():
        await js.stream_info(STREAM)
        await js.stream_info(f"OBJ_{BODY_BUCKET}")

    await provisioned(both, "the queue stream and the body store", "submitd_relay", every)


async def wait_for_consumer(js: JetStreamContext, durable: str = RELAY_DURABLE, every: float = 1.0):
    """The queue's durable consumer as the relay's provisioning made it, waited for."""
    return await provisioned(lambda: js.consumer_info(STREAM, durable), f"the queue's {durable} consumer",
                             "submitd_relay", every)


async def ensure_queue(js: JetStreamContext, cfg: QueueConfig, *, update: bool = True) -> None:
    """Provisioning's (submitd_common.provision): create the queue stream and the body store;
    with ``update``, bring an existing stream to this configuration. No service may create or
    change a stream itself (``wait_for_queue``)."""
    want = stream_config(cfg)
    try:
        await js.stream_info(STREAM)
        exists = True
    except NotFoundError:
        exists = False
    if not exists:
        try:
            await js.add_stream(want)
        except BadRequestError as e:
            if e.err_code != STREAM_NAME_IN_USE:
                raise
            exists = True  # another service created it at the same moment
    if exists and update:
        await js.update_stream(want)
    try:
        await js.object_store(BODY_BUCKET)
    except (BucketNotFoundError, NotFoundError):
        from nats.js.api import ObjectStoreConfig

        try:
            await js.create_object_store(
                BODY_BUCKET,
                ObjectStoreConfig(storage=StorageType.FILE, replicas=cfg.replicas),
            )
        except BadRequestError as e:
            if e.err_code != STREAM_NAME_IN_USE:
                raise


async def enqueue(
    js: JetStreamContext,
    qmsg,
    body: bytes,
    *,
    msg_id: str,
    inline_limit: int,
    timeout: float,
    headers: dict[str, str] | None = None,
    subject: str = SUBMIT_SUBJECT,
) -> None:
    """Queue ``qmsg`` with ``body`` and return once JetStream stored it.

    Bodies above ``inline_limit`` go to the Object Store under ``msg_id`` first. On failure the
    stored body is removed again and the error is raised."""
    from .bodies import BodyWriter

    if len(body) <= inline_limit:
        qmsg.inline_body = body
        await publish_entry(js, qmsg, msg_id=msg_id, timeout=timeout, headers=headers, subject=subject)
        return
    writer = BodyWriter(js, BODY_BUCKET, msg_id, timeout=timeout)
    try:
        await writer.write(body)
        await writer.close()
    except BaseException:
        await writer.abort()
        raise
    qmsg.object_name = msg_id
    await publish_entry(js, qmsg, msg_id=msg_id, timeout=timeout, headers=headers, subject=subject)


async def publish_entry(
    js: JetStreamContext,
    qmsg,
    *,
    msg_id: str,
    timeout: float,
    headers: dict[str, str] | None = None,
    subject: str = SUBMIT_SUBJECT,
    remove_body: bool = True,
) -> None:
    """Publish the queue entry (its body, if in the Object Store, is stored already) and
    return once JetStream stored it. The publish is retried once with the same
    ``Nats-Msg-Id``: the server de-duplicates, so a lost acknowledgement cannot queue a message
    twice. On failure a body in the Object Store is removed and the error raised."""
    import nats.errors
    import nats.js.errors

    try:
        payload = qmsg.SerializeToString()
        all_headers = {**(headers or {}), "Nats-Msg-Id": msg_id}
        for attempt in (1, 2):
            try:
                await js.publish(subject, payload, timeout=timeout / 2, headers=all_headers)
                return
            except (nats.errors.TimeoutError, nats.js.errors.NoStreamResponseError):
                if attempt == 2:
                    raise
    except BaseException as e:
        # Without the server's word (a timeout, a connection lost) the entry may have been
        # stored: its body stays, for the entry or else for the relay's orphan sweep (as it
        # does for a writer that may not remove anything, the frontend).
        if qmsg.WhichOneof("body") == "object_name" and isinstance(e, nats.js.errors.APIError) and remove_body:
            from .bodies import delete

            try:
                await asyncio.wait_for(delete(js, BODY_BUCKET, qmsg.object_name), 2.0)
            except Exception:  # an orphaned body only costs space; it is never delivered
                log.info("could not remove body of unqueued message %s", qmsg.object_name)
        raise


async def message_chunks(js: JetStreamContext, qmsg) -> "AsyncIterator[bytes]":
    """The queued message as it is to be sent: its prefix, then its body, a chunk at a time."""
    from .bodies import read_chunks

    if qmsg.prefix:
        yield qmsg.prefix
    if qmsg.WhichOneof("body") == "object_name":
        async for chunk in read_chunks(js, BODY_BUCKET, qmsg.object_name):
            yield chunk
    elif qmsg.inline_body:
        yield qmsg.inline_body


async def message_head(js: JetStreamContext, qmsg, limit: int = 256 << 10) -> bytes:
    """The first ``limit`` octets of the message (at least its header section, for reports
    and the admin API), read no further than needed."""
    out = bytearray()
    chunks = message_chunks(js, qmsg)
    try:
        async for chunk in chunks:
            out += chunk
            if len(out) >= limit or b"\r\n\r\n" in out:
                break
    finally:
        await chunks.aclose()
    return bytes(out[:limit])
