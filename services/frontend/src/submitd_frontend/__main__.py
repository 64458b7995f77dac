"""submitd-frontend: the SMTP submission server (587 STARTTLS, 465 implicit TLS)."""

from __future__ import annotations

import asyncio
import logging
import resource
import ssl
import time
from functools import partial

from pydantic import ValidationError
from pydantic_settings import SettingsError

from submitd.v1 import policy_pb2_grpc, rewriter_pb2_grpc
from submitd_common import grpcutil, lifecycle
from submitd_common.health import Health
from submitd_common.http import health_app, serve_http, split_hostport
from submitd_common.logs import setup_logging
from submitd_common.telemetry import setup_telemetry

from . import replies
from .backends import Rewriter
from .policy_client import PolicyStreams
from .settings import Settings
from .smtp import Backends, Balancers, Sessions, SubmissionSMTP

log = logging.getLogger("submitd.frontend")


INTERMEDIATE_CIPHERS = ":".join([
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384", "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
    "DHE-RSA-AES128-GCM-SHA256", "DHE-RSA-AES256-GCM-SHA384", "DHE-RSA-CHACHA20-POLY1305",
])


def server_tls_context(settings: Settings) -> ssl.SSLContext | None:
    if not settings.tls_cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # Mozilla's "intermediate" profile: AEAD suites with forward secrecy for TLS 1.2 (TLS 1.3's
    # are all fine), no CBC. For key exchange, one group: Python 3.11's ssl can set a single
    # curve but no list, and OpenSSL's default list offers X448 and P-521, which the profile
    # rejects. P-256 is the one every TLS client must support (RFC 8446 §9.1); a TLS 1.3 client
    # that leads with an X25519 key share gets a HelloRetryRequest (one more round trip).
    ctx.set_ciphers(INTERMEDIATE_CIPHERS)
    ctx.set_ecdh_curve("prime256v1")
    ctx.load_cert_chain(settings.tls_cert, settings.tls_key)
    if settings.tls_second_cert:
        # OpenSSL keeps one certificate per key type and picks by what the client offers.
        ctx.load_cert_chain(settings.tls_second_cert, settings.tls_second_key)
    # Session resumption: TLS 1.2 and 1.3 tickets, with keys of this process (a client resumes
    # on the frontend replica that issued it). One TLS 1.3 ticket per handshake, not OpenSSL's
    # two: each costs the server an encryption, and a resuming client gets a fresh one each time.
    ctx.options &= ~ssl.OP_NO_TICKET
    ctx.num_tickets = 1
    return ctx


async def drain(sessions: Sessions, seconds: float) -> None:
    """Idle sessions are told 421 and closed; sessions inside DATA (until their reply is
    written) may finish, and are then told 421 and closed in turn."""
    sessions.draining = True
    deadline = time.monotonic() + seconds
    while sessions.active and time.monotonic() < deadline:
        for s in list(sessions.active):
            if s.transport is None or s.in_data:
                continue
            if s.handshaking:
                s.transport.abort()  # no reply can reach a client before its TLS is up
            elif not s.transport.is_closing():
                try:
                    s._writer.write(replies.DRAINING.encode() + b"\r\n")
                except Exception:
                    pass
                s.close_transport()  # (cut CLOSE_GRACE later if the peer never lets go)
        await asyncio.sleep(0.05)
    if sessions.active:
        # Out of time: the rest are cut too, and given a moment to clean up after themselves
        # (a message being streamed cancels its Submit call: the rewriter removes what it stored).
        for s in list(sessions.active):
            if s.transport is not None:
                s.transport.abort()  # close() of a TLS transport waits for the peer's goodbye
        end = time.monotonic() + 2.0
        while sessions.active and time.monotonic() < end:
            await asyncio.sleep(0.05)


# Descriptors a frontend needs besides its sessions: gRPC channels, the HTTP server,
# listeners, files, and the connections still closing.
SPARE_DESCRIPTORS = 256


def open_file_limit(settings: Settings) -> int:
    """Raise the soft limit on open files to the hard one (the default 1,024 is below the
    default MAX_SESSIONS), and lower MAX_SESSIONS where the hard limit cannot hold it: past it
    a client is told 421 4.3.2, rather than its connection being dropped for want of a
    descriptor. Returns the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    if soft != resource.RLIM_INFINITY and settings.max_sessions > soft - SPARE_DESCRIPTORS:
        lowered = max(1, soft - SPARE_DESCRIPTORS)
        log.warning("MAX_SESSIONS lowered to fit the open-file limit", extra={"fields": {
            "max_sessions": settings.max_sessions, "lowered_to": lowered, "open_file_limit": soft}})
        settings.max_sessions = lowered
    return soft


def load_settings() -> Settings:
    """The settings, or the process ends here saying what is wrong with them (no traceback)."""
    try:
        return Settings()
    except (ValidationError, SettingsError) as e:
        raise SystemExit(f"submitd-frontend: refusing to start: {e}") from None


async def amain() -> None:
    settings = load_settings()
    setup_logging("frontend", settings.log_level)
    provider = setup_telemetry("frontend")
    open_file_limit(settings)

    # No NATS here: the rewriter queues each message (the internet-facing process holds no
    # credentials to the queue at all).
    grpc_tls = grpcutil.MutualTLS.from_settings(settings)
    policy_ch = grpcutil.channel(settings.policy_target, grpc_tls)
    rewriter_ch = grpcutil.channel(settings.rewriter_target, grpc_tls)
    backends = Backends(
        settings=settings,
        policy=PolicyStreams(
            policy_pb2_grpc.PolicyStub(policy_ch), policy_ch, streams=settings.backend_streams,
            timeout=settings.policy_timeout, connect_timeout=settings.backend_connect_timeout,
            max_age=settings.backend_stream_seconds,
        ),
        rewriter=Rewriter(
            rewriter_pb2_grpc.RewriterStub(rewriter_ch), rewriter_ch, streams=settings.backend_streams,
            timeout=settings.rewriter_timeout, connect_timeout=settings.backend_connect_timeout,
            max_age=settings.backend_stream_seconds,
        ),
    )

    servers: list[asyncio.Server] = []
    health = Health()
    # Ready only once the SMTP listeners are bound: /readyz must never send clients to a
    # port that refuses them.
    health.add_check("listening", lambda: bool(servers) and all(s.is_serving() for s in servers))
    health.add_check("policy", lambda: grpcutil.remote_serving(policy_ch))
    health.add_check("policy_capabilities", backends.policy.refresh_capabilities)
    # The rewriter serves only while it has the queue (its NATS connection): this check is
    # also what lets DATA be taken again after the queue was away (Rewriter.queue_available).
    health.add_check("rewriter", backends.rewriter.serving)
    stop_health = await health.start()
    http_host, http_port = split_hostport(settings.http_listen)
    bound_http, stop_http = await serve_http(health_app(health, "submitd frontend"), http_host, http_port)

    tls = server_tls_context(settings)
    if tls is None:
        log.warning("no TLS certificate configured: STARTTLS, port 465 and AUTH are unavailable")
    sessions = Sessions()
    loop = asyncio.get_running_loop()
    # 587 and 465 take a PROXY header where PROXY_PROTOCOL is on, from the listed balancers
    # alone; the internal listener never does (its clients reach the pod directly).
    balancers = Balancers(settings.proxy_trusted_networks) if settings.proxy_protocol else None
    listeners = [("submission", settings.submission_listen, False, balancers)]
    if tls is not None:
        listeners.append(("submissions", settings.submissions_listen, True, balancers))
    listeners.append(("internal submission", settings.internal_submission_listen, False, None))
    for name, listen, implicit, proxied_by in listeners:
        if not listen:
            continue
        host, port = split_hostport(listen)
        factory = partial(SubmissionSMTP, backends, sessions, implicit_tls=implicit, tls_context=tls,
                          balancers=proxied_by)
        # Port 465 is accepted in the clear and the session starts TLS itself: counted from
        # the accept (MAX_SESSIONS), after a PROXY header where there is one.
        server = await loop.create_server(factory, host, port, reuse_address=True)
        servers.append(server)
        log.info("frontend listening", extra={"fields": {
            "listener": name, "port": server.sockets[0].getsockname()[1], "implicit_tls": implicit,
            "proxy_protocol": proxied_by is not None}})
    await health.check_now()
    log.info("frontend ready", extra={"fields": {"http_port": bound_http}})

    await lifecycle.wait_for_signal()
    log.info("frontend draining", extra={"fields": {"sessions": len(sessions.active)}})
    await health.set_draining()
    if settings.drain_delay:
        # Unready but serving: new clients still arrive until the balancer has seen it (the
        # scale test counted 5-13 clients a scale-down told 421 or refused without this).
        await asyncio.sleep(settings.drain_delay)
    # Listeners stay open while draining: a new client is told 421 rather than refused.
    await drain(sessions, settings.drain_seconds)
    for server in servers:
        server.close()
    await stop_http()
    await stop_health()
    await backends.policy.close()
    await backends.rewriter.close()
    await policy_ch.close()
    await rewriter_ch.close()
    provider.shutdown()


def main() -> None:
    lifecycle.run(amain)


if __name__ == "__main__":
    main()
