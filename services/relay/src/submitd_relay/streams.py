"""What the relay works with on NATS, from its settings: the queue stream and body store, its
delivery records, the TLS-RPT counts, the MTA-STS policy cache, and the queue's one durable
consumer. Made by provisioning (``python -m submitd_relay provision``, submitd_common.provision),
opened by the relay."""

from __future__ import annotations

from nats.js.api import AckPolicy, ConsumerConfig

from submitd_common import jetstream
from submitd_common.jetstream import KvSpec

from .outbound.mtasts import MAX_AGE_LIMIT


def queue(settings) -> jetstream.QueueConfig:
    return jetstream.QueueConfig(max_bytes=settings.queue_max_bytes, replicas=settings.replicas)


def delivery_records(settings) -> KvSpec:
    """A queue id's record outlives the message by two days (a late redelivery still finds it)."""
    return KvSpec(jetstream.DELIVERY_BUCKET, settings.max_lifetime + 2 * 86400, settings.replicas)


def tls_reports(settings) -> KvSpec:
    """Kept for three periods: a day's counts until its report went, its lock until no replica
    would try that day again."""
    return KvSpec(jetstream.TLSRPT_BUCKET, 3 * max(settings.tlsrpt_interval, settings.tlsrpt_flush_interval),
                  settings.replicas)


def sts_policies(settings) -> KvSpec:
    """A policy lives at most MAX_AGE_LIMIT (RFC 8461 §3.2), so does its entry."""
    return KvSpec(jetstream.MTA_STS_BUCKET, MAX_AGE_LIMIT, settings.replicas)


def consumer(settings) -> ConsumerConfig:
    return ConsumerConfig(
        name=jetstream.RELAY_DURABLE,
        durable_name=jetstream.RELAY_DURABLE,
        filter_subject=f"{jetstream.SUBJECT_PREFIX}.>",
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=settings.ack_wait,
        max_deliver=-1,
        max_ack_pending=max(1000, settings.connections * 4),
    )


def plan(settings) -> dict:
    buckets = [delivery_records(settings)]
    if settings.tlsrpt:
        buckets.append(tls_reports(settings))
    if settings.mta_sts:
        buckets.append(sts_policies(settings))
    return {"queue": queue(settings), "buckets": buckets, "consumers": [consumer(settings)]}
