"""Provisioning: the streams, buckets and consumers a service works with, made or brought to its
settings by a run of ``python -m submitd_<service> provision`` with a NATS user of its own
(``provision`` in natsauth), before the service starts: the chart's init container, ``make run``
and the tests' stacks (submitd_devkit.stack) all do.

Why not the service itself: a stream's configuration can copy what is written to it elsewhere in
the account (RePublish) and copy another stream into it (sources), and a consumer's can aim its
deliveries at any subject. A policy allowed to change its own bucket could republish its writes
into the queue (mail that no gate checked) or source the queue into the bucket (every message,
to read); a relay allowed to create its consumer could deliver queue entries onto the app
passwords' subjects. So the services get no STREAM.CREATE, STREAM.UPDATE or CONSUMER.CREATE at
all, and the provisioning user, which holds those, may neither publish nor read a message. Its
password is given only to the init container, never to the service's own."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable, Sequence

from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig

from . import jetstream

log = logging.getLogger(__name__)


async def provision(js: JetStreamContext, *, queue: jetstream.QueueConfig | None = None,
                    buckets: Sequence[jetstream.KvSpec] = (),
                    consumers: Sequence[ConsumerConfig] = ()) -> None:
    """Each made, or brought to the configuration given (idempotent: every start runs it)."""
    if queue is not None:
        await jetstream.ensure_queue(js, queue)
    for spec in buckets:
        await jetstream.ensure_kv(js, spec.bucket, spec.ttl, spec.replicas, mirror_keys=spec.mirror_keys)
    for config in consumers:  # created, or (same name) updated to this configuration
        await js.add_consumer(jetstream.STREAM, config=config)


def command(service: str, plan: Callable[[object], dict], settings_class) -> None:
    """``python -m submitd_<service> provision``: read the service's settings as it would, connect
    with the NATS user they name (the provisioning user's, in the init container), provision what
    ``plan(settings)`` says, and exit 0; on failure exit 1 with the reason (the pod then does
    not start, and says why)."""
    from .logs import setup_logging

    settings = settings_class()
    setup_logging(f"{service}-provision", settings.log_level)

    async def run() -> None:
        async def closing() -> None:  # (a provisioning run's disconnection is its end: nothing to say)
            pass

        nc = await jetstream.connect(f"submitd-{service}-provision", settings.nats_options(), disconnected_cb=closing)
        try:
            what = plan(settings)
            await asyncio.wait_for(provision(nc.jetstream(timeout=10), **what), 120)
            log.info("provisioned", extra={"fields": {
                "queue": what.get("queue") is not None,
                "buckets": [b.bucket for b in what.get("buckets", ())],
                "consumers": [c.durable_name for c in what.get("consumers", ())]}})
        finally:
            await jetstream.close(nc)

    try:
        asyncio.run(run())
    except Exception as e:
        log.error("provisioning failed: %s", f"{type(e).__name__}: {e}")
        sys.exit(1)
