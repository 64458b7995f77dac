"""submitd-relay: delivers queued messages to the next hop."""

from __future__ import annotations

import asyncio
import logging

from submitd_common import grpcutil, jetstream, lifecycle
from submitd_common.grpcutil import MutualTLS
from submitd_common.health import Health
from submitd_common.http import health_app, serve_http, split_hostport
from submitd_common.logs import setup_logging
from submitd_common.telemetry import setup_telemetry

from . import admin, streams
from .consumer import Relay
from .delivery import NextHopPool
from .queue import remove_abandoned_bodies
from .outbound.mtasts import StsPolicies, open_bucket
from .outbound.tlsrpt import TlsReporting
from .reports import Reports, Signer
from .routes import MxResolver
from .settings import Settings

log = logging.getLogger("submitd.relay")


async def amain() -> None:
    settings = Settings()
    setup_logging("relay", settings.log_level)
    provider = setup_telemetry("relay")
    relay: Relay | None = None

    async def reconnected() -> None:
        log.info("nats reconnected")
        if relay is not None:
            relay.stranded.wake.set()  # a restarted server is where stranded entries come from

    nc = await jetstream.connect("submitd-relay", settings.nats_options(), reconnected_cb=reconnected)
    # The queue stream and the body store, as provisioning made them (the relay may not create
    # or change a stream: submitd_common.provision).
    await jetstream.wait_for_queue(nc.jetstream())
    channel = grpcutil.channel(settings.rewriter_target, MutualTLS.from_settings(settings)) if settings.rewriter_target else None
    signer = Signer(channel, settings.rewriter_timeout) if channel else None
    # TLS reports (RFC 8460) are queued like DSNs: signed by the rewriter, delivered by a relay.
    reporting = TlsReporting(nc.jetstream(), settings, Reports(nc.jetstream(), settings, signer))
    pool = NextHopPool(settings, reporting=reporting)
    sts = None
    if pool.planner is not None and settings.mta_sts:
        # MTA-STS policies (RFC 8461), cached for every replica in NATS KV.
        sts = StsPolicies(settings, await open_bucket(nc.jetstream(), streams.sts_policies(settings)), pool.resolver.r,
                          reachable=pool.resolver.reachable)
        pool.planner.sts = sts
    relay = Relay(nc, pool, settings, signer)
    await relay.start()
    await reporting.start(pool.resolver or MxResolver(settings))

    health = Health()
    health.add_check("nats", lambda: nc.is_connected)
    stop_health = await health.start()
    app = health_app(health, "submitd relay")
    app.include_router(admin.router(relay))
    bound, stop_http = await serve_http(app, *split_hostport(settings.http_listen))
    abandoned = await remove_abandoned_bodies(nc, nc.jetstream())
    runner = asyncio.create_task(relay.run(), name="relay")
    watcher = asyncio.create_task(relay.watch_queue(), name="queue metrics")
    sweeper = asyncio.create_task(relay.sweep(), name="orphan sweep")
    stranded = asyncio.create_task(relay.check_stranded(), name="stranded entries")
    log.info("relay ready", extra={"fields": {"http_port": bound, "next_hop": pool.name}})

    await lifecycle.wait_for_signal()
    log.info("relay draining", extra={"fields": {"inflight": len(relay.inflight)}})
    await health.set_draining()
    await relay.stop(settings.drain_seconds)
    await runner
    await watcher
    await sweeper
    await stranded
    await abandoned.unsubscribe()
    await reporting.close()
    if sts is not None:
        await sts.close()
    await relay.close()
    await pool.close()
    if channel is not None:
        await channel.close()
    await stop_http()
    await stop_health()
    await jetstream.close(nc)
    provider.shutdown()


def main() -> None:
    import sys

    if sys.argv[1:2] == ["provision"]:  # the chart's init container, with the provisioning user
        from submitd_common import provision

        provision.command("relay", streams.plan, Settings)
        return
    lifecycle.run(amain)


if __name__ == "__main__":
    main()
