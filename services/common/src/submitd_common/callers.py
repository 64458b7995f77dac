"""Who may call a gRPC service: the services named by their client certificates.

Under mutual TLS every caller presents a certificate from the services' CA whose commonName
names the service it belongs to. A CA alone only says "one of ours"; ``Callers`` says which of
ours: policy takes calls from the frontend only, the rewriter from the frontend and, for its
``Rewrite`` method alone, from the relay (the reports it signs). Anyone else is answered
PERMISSION_DENIED before the service sees a request. The health service stays open to every
certificate of the CA (peers and probes ask it).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import grpc
from prometheus_client import Counter

log = logging.getLogger(__name__)
REFUSED = Counter(
    "submitd_grpc_callers_refused_total", "gRPC calls refused because the caller's certificate may not make them",
    ["caller", "method"],
)
OPEN_TO_ANY_PEER = ("/grpc.health.v1.Health/",)


@dataclass(frozen=True)
class Callers:
    """Certificate names that may call, each with the methods it may call (None: all)."""

    allowed: dict[str, frozenset[str] | None]

    @classmethod
    def parse(cls, entries: Iterable[str], methods: Iterable[str]) -> "Callers":
        """``["frontend", "relay:Rewrite"]``: the frontend may call every method, the relay only
        Rewrite. A method this service does not have is a mistake, refused here."""
        known = set(methods)
        allowed: dict[str, frozenset[str] | None] = {}
        for entry in entries:
            name, _, method = entry.strip().partition(":")
            if not name:
                raise ValueError(f"an allowed caller without a name: {entry!r}")
            if not method:
                allowed[name] = None
                continue
            if method not in known:
                raise ValueError(f"allowed caller {entry!r}: no method {method!r} (this service has {sorted(known)})")
            if name not in allowed or allowed[name] is not None:
                allowed[name] = (allowed.get(name) or frozenset()) | {method}
        return cls(allowed)

    def permits(self, caller: str | None, method: str) -> bool:
        """``method`` is the call's full name, ``/package.Service/Method``."""
        if method.startswith(OPEN_TO_ANY_PEER):
            return True
        if caller is None or caller not in self.allowed:
            return False
        methods = self.allowed[caller]
        return methods is None or method.rsplit("/", 1)[-1] in methods


def certificate_name(context: grpc.aio.ServicerContext) -> str | None:
    """The commonName of the caller's verified client certificate (None without one)."""
    names = context.auth_context().get("x509_common_name")
    return names[0].decode("utf-8", "replace") if names else None


class CallerCheck(grpc.aio.ServerInterceptor):
    """Answers PERMISSION_DENIED to a call whose certificate ``callers`` does not permit, before
    the handler runs. (An interceptor sees the method but not the peer's certificate, so the
    check goes inside the handler it hands back.)"""

    def __init__(self, callers: Callers) -> None:
        self.callers = callers

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_TO_ANY_PEER):
            return handler
        method = details.method

        async def check(context: grpc.aio.ServicerContext) -> None:
            caller = certificate_name(context)
            if self.callers.permits(caller, method):
                return
            REFUSED.labels(caller or "", method).inc()
            log.warning("gRPC caller refused", extra={"fields": {"caller": caller, "method": method, "peer": context.peer()}})
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{caller or 'a caller without a name'} may not call {method}")

        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary_unary(request, context):
                await check(context)
                return await inner(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, handler.request_deserializer, handler.response_serializer)
        if handler.stream_unary:
            inner = handler.stream_unary

            async def stream_unary(requests, context):
                await check(context)
                return await inner(requests, context)

            return grpc.stream_unary_rpc_method_handler(
                stream_unary, handler.request_deserializer, handler.response_serializer)
        # Streaming handlers are async generators here (every submitd service's are).
        inner = handler.unary_stream or handler.stream_stream

        async def streaming(request, context):
            await check(context)
            async for response in inner(request, context):
                yield response

        factory = grpc.unary_stream_rpc_method_handler if handler.unary_stream else grpc.stream_stream_rpc_method_handler
        return factory(streaming, handler.request_deserializer, handler.response_serializer)
