"""gRPC servers and channels configured the same way in every service."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .health import Health

# Client-side round robin over every address a (headless) Service name resolves to, so
# each frontend spreads its calls over all policy and rewriter pods.
CHANNEL_OPTIONS = [
    ("grpc.lb_policy_name", "round_robin"),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.max_receive_message_length", 8 << 20),
    ("grpc.max_send_message_length", 8 << 20),
    # A restarted peer is found again within seconds, not after gRPC's default backoff (120 s).
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


async def start_server(
    bind: str, register: Callable[[grpc.aio.Server], None], health: Health
) -> tuple[grpc.aio.Server, int, Callable[[float], Awaitable[None]]]:
    """Start a gRPC server on ``bind`` ("host:port"; port 0 picks one).

    Returns the server, the bound port and a finalizer taking the grace period.
    """
    server = grpc.aio.server(options=CHANNEL_OPTIONS)
    register(server)
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    port = server.add_insecure_port(bind)
    if port == 0:
        raise RuntimeError(f"cannot bind gRPC server to {bind}")
    await server.start()

    async def stop(grace: float) -> None:
        await server.stop(grace)

    return server, port, stop


def channel(target: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)


async def remote_serving(ch: grpc.aio.Channel, service: str = "", timeout: float = 1.0) -> bool:
    """True when the peer's grpc.health.v1 says SERVING."""
    stub = health_pb2_grpc.HealthStub(ch)
    resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return resp.status == health_pb2.HealthCheckResponse.SERVING
