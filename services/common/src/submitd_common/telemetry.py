"""OpenTelemetry setup from the standard OTEL_* variables, and trace-context carriers."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping

from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, Decision, ParentBased, Sampler, SamplingResult


_UNTRACED = ("/grpc.health.v1.Health/",)
_UNTRACED_PATHS = {"/healthz", "/readyz", "/metrics"}


class NoHealthChecks(Sampler):
    """Drops health-check and metrics spans (their children follow, being parent-based);
    everything else is decided by the sampler the OTEL_TRACES_SAMPLER variables configure."""

    def __init__(self, delegate: Sampler) -> None:
        self.delegate = delegate

    def should_sample(self, parent_context, trace_id, name, kind=None, attributes=None, links=None, trace_state=None):
        if name.startswith(_UNTRACED) or (attributes or {}).get("url.path") in _UNTRACED_PATHS:
            return SamplingResult(Decision.DROP)
        return self.delegate.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

    def get_description(self) -> str:
        return f"NoHealthChecks({self.delegate.get_description()})"


def _configured_sampler() -> Sampler:
    try:
        from opentelemetry.sdk.trace.sampling import _get_from_env_or_default

        return _get_from_env_or_default()
    except ImportError:
        return ParentBased(ALWAYS_ON)


def setup_telemetry(service_name: str) -> TracerProvider:
    """Install a tracer provider; export over OTLP when an endpoint is configured.

    Sampling follows OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG (read by the SDK). With no
    exporter and no sampler configured, nothing is recorded (spans would be built only to be
    dropped), though trace ids are still made, so that log lines of one message still join.

    gRPC calls are traced by ``client_call`` and ``server_call`` rather than by the gRPC
    instrumentation's interceptors, which cost more than the calls they measured (and would
    turn a long-lived stream that carries many sessions into one span of one session's trace).
    """
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)})
    exporting = os.environ.get("OTEL_SDK_DISABLED", "").lower() != "true" and bool(
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )
    base = _configured_sampler() if exporting or os.environ.get("OTEL_TRACES_SAMPLER") else ALWAYS_OFF
    provider = TracerProvider(resource=resource, sampler=ParentBased(NoHealthChecks(base)))
    if exporting:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return provider


def _rpc_attributes(full_method: str) -> dict[str, str]:
    service, _, method = full_method.strip("/").partition("/")
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}


@contextlib.contextmanager
def client_call(tracer: trace.Tracer, full_method: str) -> Iterator[tuple[trace.Span, tuple[tuple[str, str], ...]]]:
    """A CLIENT span for a gRPC call, and the call's metadata carrying its context:
    ``with client_call(tracer, "/submitd.v1.Rewriter/RewriteWhole") as (span, metadata)``."""
    with tracer.start_as_current_span(full_method.strip("/"), kind=trace.SpanKind.CLIENT,
                                      attributes=_rpc_attributes(full_method)) as span:
        yield span, tuple(inject_context().items())


@contextlib.contextmanager
def server_call(tracer: trace.Tracer, full_method: str, context) -> Iterator[trace.Span]:
    """The SERVER span of a gRPC call, a child of the caller's span (from the call's metadata)."""
    parent = extract_context({k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)})
    with tracer.start_as_current_span(full_method.strip("/"), context=parent, kind=trace.SpanKind.SERVER,
                                      attributes=_rpc_attributes(full_method)) as span:
        yield span


def inject_context() -> dict[str, str]:
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def extract_context(carrier: Mapping[str, str] | None):
    return propagate.extract(dict(carrier or {}))
