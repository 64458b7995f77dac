"""OpenTelemetry setup from the standard OTEL_* variables, and trace-context carriers."""

from __future__ import annotations

import os
from collections.abc import Mapping

from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, Decision, ParentBased, Sampler, SamplingResult


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

    Sampling follows OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG (read by the SDK).
    Health checks are filtered out of the gRPC server spans.
    """
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)})
    provider = TracerProvider(resource=resource, sampler=ParentBased(NoHealthChecks(_configured_sampler())))
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() != "true" and (
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    ):
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)

    from opentelemetry.instrumentation.grpc import (
        GrpcAioInstrumentorClient,
        GrpcAioInstrumentorServer,
        filters,
    )

    no_health = filters.negate(filters.health_check())
    GrpcAioInstrumentorServer().instrument(filter_=no_health)
    GrpcAioInstrumentorClient().instrument(filter_=no_health)
    return provider


def inject_context() -> dict[str, str]:
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def extract_context(carrier: Mapping[str, str] | None):
    return propagate.extract(dict(carrier or {}))
