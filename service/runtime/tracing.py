"""Optional OpenTelemetry tracing. The runtime and the web layer take their tracer from here: a no-op unless a
TracerProvider was installed (service.tracing does it when PREFIXSERVE_OTEL_ENDPOINT is set; tests install one with
an in-memory exporter), so an untraced server pays one attribute lookup per span site."""

from __future__ import annotations

from typing import Any

from opentelemetry import trace

_provider: Any = None


def install(provider: Any) -> None:
    """Use `provider` (an opentelemetry.sdk.trace.TracerProvider) for every span from now on; None turns it off."""
    global _provider
    _provider = provider


def tracer(name: str) -> trace.Tracer:
    return (_provider or trace.NoOpTracerProvider()).get_tracer(name)


def enabled() -> bool:
    return _provider is not None
