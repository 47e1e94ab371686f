"""OpenTelemetry tracing: one TracerProvider per service, configured by the standard variables.

The exporter follows ``OTEL_TRACES_EXPORTER`` (``otlp``, ``console`` or ``none``); when it is
unset, spans go to OTLP if ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or its traces variant) is set and
nowhere otherwise. ``OTEL_SERVICE_NAME`` overrides the service name. Spans are created either
way, so trace IDs exist for correlation (logs, error messages) even with no exporter.
W3C ``traceparent`` is the propagation format (the OpenTelemetry default).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

from services.common.logs import fields

log = logging.getLogger(__name__)


def _exporter(env: Mapping[str, str]) -> SpanExporter | None:
    choice = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if not choice:
        endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        choice = "otlp" if endpoint else "none"
    if choice == "none":
        return None
    if choice == "console":
        return ConsoleSpanExporter()
    if choice == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    raise ValueError(f"OTEL_TRACES_EXPORTER: unsupported exporter {choice!r} (otlp, console or none)")


def create_tracer_provider(service: str, env: Mapping[str, str] | None = None) -> TracerProvider:
    """A TracerProvider for ``service`` with the exporter the environment asks for."""
    env = os.environ if env is None else env
    attributes = {} if env.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service}
    provider = TracerProvider(resource=Resource.create(attributes))
    exporter = _exporter(env)
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    log.debug("telemetry.configured", extra=fields(exporter=type(exporter).__name__ if exporter else "none"))
    return provider
