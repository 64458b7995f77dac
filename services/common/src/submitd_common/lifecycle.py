"""A service's life: run its main on the best loop, wait for SIGTERM, and for the gRPC services
(policy, rewriter) the whole serve-then-drain sequence in one place."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Iterable

import grpc

from .callers import CallerCheck, Callers
from .grpcutil import MutualTLS, start_server
from .health import Health
from .http import health_app, serve_http, split_hostport

log = logging.getLogger(__name__)


async def wait_for_signal(*signals: signal.Signals) -> signal.Signals:
    """Return the first of ``signals`` (default SIGTERM, SIGINT) delivered to the process."""
    signals = signals or (signal.SIGTERM, signal.SIGINT)
    loop = asyncio.get_running_loop()
    got: asyncio.Future[signal.Signals] = loop.create_future()
    for sig in signals:
        loop.add_signal_handler(sig, lambda s=sig: got.done() or got.set_result(s))
    try:
        return await got
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


def run(amain) -> None:
    """Run a service's async main (on uvloop, where installed: it spends fewer cycles per
    socket operation); Ctrl-C before the handlers exist still exits quietly."""
    try:
        import uvloop
    except ImportError:
        uvloop = None
    with contextlib.suppress(KeyboardInterrupt):
        if uvloop is not None:
            uvloop.run(amain())
        else:
            asyncio.run(amain())


async def serve_grpc(
    name: str, settings, health: Health, register: Callable[[grpc.aio.Server], None], methods: Iterable[str],
    routers: Iterable = (), **fields,
) -> None:
    """Serve one gRPC service until SIGTERM or SIGINT: its health (grpc.health.v1 and HTTP
    /healthz, /readyz, /metrics on ``settings.http_listen``) and the service on
    ``settings.listen``. Where the settings name certificates: mutual TLS, and only the callers
    ``settings.grpc_allowed_callers`` names may call ``methods`` (the service's method names).
    Then unready at once, in-flight calls get ``settings.drain_seconds`` to finish, and
    everything stops; what the service set up itself is the caller's to close afterwards."""
    service_log = logging.getLogger(f"submitd.{name}")
    tls = MutualTLS.from_settings(settings)
    interceptors = []
    if tls is None:
        service_log.warning("gRPC without mutual TLS: any caller that reaches the port is believed",
                            extra={"fields": {"listen": settings.listen}})
    else:
        callers = Callers.parse(settings.grpc_allowed_callers, methods)
        interceptors.append(CallerCheck(callers))
        fields["allowed_callers"] = sorted(settings.grpc_allowed_callers)
    stop_health = await health.start()
    _, port, stop_grpc = await start_server(settings.listen, register, health, tls, interceptors)
    app = health_app(health, f"submitd {name}")
    for router in routers:  # an admin API beside /healthz, /readyz and /metrics
        app.include_router(router)
    _, stop_http = await serve_http(app, *split_hostport(settings.http_listen))
    service_log.info(f"{name} listening", extra={"fields": {"port": port, **fields}})
    await wait_for_signal()
    service_log.info(f"{name} draining")
    await health.set_draining()
    await stop_grpc(settings.drain_seconds)
    await stop_http()
    await stop_health()
