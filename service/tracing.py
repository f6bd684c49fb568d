"""OpenTelemetry tracing of the HTTP routes (one server span per request, named by its route, with the status and
the request id); engine steps are traced by the runtime (service/runtime/tracing.py). Off unless
PREFIXSERVE_OTEL_ENDPOINT is set."""

from __future__ import annotations

from typing import Any

from opentelemetry.trace import SpanKind
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import request_ids
from .runtime import tracing
from .settings import ServiceSettings


def setup(settings: ServiceSettings) -> None:
    """Installs an OTLP/HTTP exporter when the settings name an endpoint."""
    if not settings.otel_endpoint:
        return
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": settings.otel_service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.otel_endpoint)))
    tracing.install(provider)


class Tracing:
    """ASGI layer inside RequestIds (so spans carry the request id) and outside the guard (refusals are traced)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not tracing.enabled():
            await self.app(scope, receive, send)
            return
        status = [0]

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        method = scope["method"]
        with tracing.tracer("prefix_serve.http").start_as_current_span(
            f"{method} {scope['path']}", kind=SpanKind.SERVER
        ) as span:
            try:
                await self.app(scope, receive, send_status)
            finally:
                route: Any = scope.get("route")
                template = getattr(route, "path", None)
                if template:
                    span.update_name(f"{method} {template}")
                span.set_attributes(
                    {
                        "http.request.method": method,
                        "url.path": scope["path"],
                        "http.route": template or "",
                        "http.response.status_code": status[0],
                        "prefixserve.request_id": request_ids.current.get() or "",
                    }
                )
