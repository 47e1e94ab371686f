"""Structured logging: one JSON object per line, one schema for every service.

Schema: ``ts`` (UTC, ISO 8601), ``level``, ``service``, ``event``, ``trace_id``,
``span_id``, ``logger``, then the event's own fields. The trace and span IDs come from the
OpenTelemetry span current when the line is written, so every line logged while a request
runs carries that request's trace ID.

Log an event with its fields::

    log.info("worker.started", extra=fields(pid=1234, model="iris"))
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import sys
import traceback
from typing import Any

from opentelemetry import trace

_service: contextvars.ContextVar[str | None] = contextvars.ContextVar("service", default=None)
_process_service = "unknown"

_RESERVED = ("ts", "level", "service", "event", "trace_id", "span_id", "logger")


def fields(**values: Any) -> dict[str, Any]:
    """``extra=`` argument carrying an event's fields."""
    return {"fields": values}


def bind_service(name: str) -> contextvars.Token[str | None]:
    """Name the service for lines logged in the current context (one request, one task)."""
    return _service.set(name)


def reset_service(token: contextvars.Token[str | None]) -> None:
    _service.reset(token)


def current_trace_ids() -> tuple[str, str]:
    """(trace_id, span_id) of the current span as hex, or empty strings outside a span."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return "", ""
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


def _record_dict(record: logging.LogRecord) -> dict[str, Any]:
    trace_id, span_id = current_trace_ids()
    line: dict[str, Any] = {
        "ts": dt.datetime.fromtimestamp(record.created, tz=dt.UTC).isoformat(timespec="milliseconds"),
        "level": record.levelname.lower(),
        "service": _service.get() or _process_service,
        "event": record.getMessage(),
        "trace_id": trace_id,
        "span_id": span_id,
        "logger": record.name,
    }
    extra = getattr(record, "fields", None)
    if isinstance(extra, dict):
        for key, value in extra.items():
            line[f"field_{key}" if key in _RESERVED else key] = value
    if record.exc_info and record.exc_info[0] is not None:
        line["exc_type"] = record.exc_info[0].__name__
        line["exc"] = "".join(traceback.format_exception(*record.exc_info))
    return line


class JsonFormatter(logging.Formatter):
    """Renders a record as one JSON line (values that JSON lacks are rendered with ``str``)."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(_record_dict(record), default=str, ensure_ascii=False)


class ConsoleFormatter(logging.Formatter):
    """The same data for a human at a terminal: ``time level service event key=value ...``."""

    def format(self, record: logging.LogRecord) -> str:
        line = _record_dict(record)
        head = f"{line.pop('ts')[11:23]} {line.pop('level').upper():<7} {line.pop('service'):<9} {line.pop('event')}"
        line.pop("logger")
        exc = line.pop("exc", None)
        if not line["trace_id"]:
            line.pop("trace_id")
            line.pop("span_id")
        else:
            line.pop("span_id")
        rest = " ".join(f"{key}={json.dumps(value, default=str)}" for key, value in line.items())
        text = f"{head} {rest}".rstrip()
        return f"{text}\n{exc}" if exc else text


def configure_logging(service: str, level: str = "INFO", fmt: str = "json") -> None:
    """Send every logger's records to stderr through the chosen formatter."""
    global _process_service
    _process_service = service
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else ConsoleFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
