"""gRPC servers and channels configured the same way in every service."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

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
    # No flow-control window growth (BDP probing): a receiver that falls behind holds at most
    # the default window of a stream in memory, never megabytes of a large message.
    ("grpc.http2.bdp_probe", 0),
]


@dataclass(frozen=True)
class MutualTLS:
    """Service-to-service gRPC over TLS with client certificates, all signed by one CA; each
    service's certificate names it (commonName), which is how a server knows its caller
    (``callers.CallerCheck``)."""

    cert: bytes
    key: bytes
    ca: bytes

    @classmethod
    def from_settings(cls, settings) -> "MutualTLS | None":
        paths = (settings.grpc_tls_cert, settings.grpc_tls_key, settings.grpc_tls_ca)
        if not any(paths):
            return None
        if not all(paths):
            raise ValueError("GRPC_TLS_CERT, GRPC_TLS_KEY and GRPC_TLS_CA go together")
        cert, key, ca = (Path(p).read_bytes() for p in paths)
        return cls(cert, key, ca)

    def server(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca, require_client_auth=True)

    def channel(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert)


async def start_server(
    bind: str, register: Callable[[grpc.aio.Server], None], health: Health, tls: MutualTLS | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> tuple[grpc.aio.Server, int, Callable[[float], Awaitable[None]]]:
    """Start a gRPC server on ``bind`` ("host:port"; port 0 picks one), with mutual TLS when
    ``tls`` is given.

    Returns the server, the bound port and a finalizer taking the grace period.
    """
    server = grpc.aio.server(options=CHANNEL_OPTIONS, interceptors=list(interceptors) or None)
    register(server)
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    port = server.add_secure_port(bind, tls.server()) if tls else server.add_insecure_port(bind)
    if port == 0:
        raise RuntimeError(f"cannot bind gRPC server to {bind}")
    await server.start()

    async def stop(grace: float) -> None:
        await server.stop(grace)

    return server, port, stop


def channel(target: str, tls: MutualTLS | None = None) -> grpc.aio.Channel:
    if tls:
        return grpc.aio.secure_channel(target, tls.channel(), options=CHANNEL_OPTIONS)
    return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)


async def remote_serving(ch: grpc.aio.Channel, service: str = "", timeout: float = 1.0) -> bool:
    """True when the peer's grpc.health.v1 says SERVING."""
    stub = health_pb2_grpc.HealthStub(ch)
    resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return resp.status == health_pb2.HealthCheckResponse.SERVING
