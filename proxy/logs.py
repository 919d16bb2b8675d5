"""Structured logs: one line per request and per decision, JSON or text, with secrets kept out."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError
from multidict import MultiDictProxy

EVENT_FIELD = "event_fields"
SECRET_QUERY_KEYS = frozenset({"_state", "token", "access_token", "password", "signature", "sig"})
REDACTED = "REDACTED"
ACCESS_LOGGER = "foreign_layer_proxy.access"


def rfc3339_utc(created: float) -> str:
    """Like distribution's logs: RFC 3339 in UTC with milliseconds, e.g. 2026-12-01T22:16:24.123Z."""
    seconds = int(created)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int((created - seconds) * 1000):03d}Z"


def log_event(logger: logging.Logger, level: int, event: str, **fields: Any) -> None:
    if logger.isEnabledFor(level):
        logger.log(level, event, extra={EVENT_FIELD: fields})


def redacted_query(query: MultiDictProxy[str]) -> str:
    """A query string for logs: values of secret-bearing keys (upload `_state`, tokens, signed URLs) replaced."""
    return "&".join(
        f"{key}={REDACTED if key.lower() in SECRET_QUERY_KEYS or key.lower().startswith('x-amz-') else value}"
        for key, value in query.items()
    )


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": rfc3339_utc(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        fields: Mapping[str, Any] = getattr(record, EVENT_FIELD, {})
        line.update(fields)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields: Mapping[str, Any] = getattr(record, EVENT_FIELD, {})
        rendered = " ".join(f"{key}={value}" for key, value in fields.items() if value is not None)
        text = f"{rfc3339_utc(record.created)} {record.levelname:<7} {record.getMessage()} {rendered}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class DependencyDetailFilter(logging.Filter):
    """aiohttp's own errors carry the raw bytes of a malformed request (an `Authorization` line among
    them) in their messages and tracebacks: keep only what failed, never the request's content.

    A request aiohttp could not parse is the client's fault, not the gateway's: a warning, not an error."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("aiohttp") and record.exc_info:
            error = record.exc_info[1]
            record.msg, record.args = "%s (%s)", (record.getMessage(), type(error).__name__)
            record.exc_info = record.exc_text = None
            if isinstance(error, HttpProcessingError) and record.levelno > logging.WARNING:
                record.levelno, record.levelname = logging.WARNING, "WARNING"
                return self.level <= logging.WARNING
        return True


class WorkerFields(logging.Filter):
    """Every line of a worker of `server.workers` says which worker wrote it."""

    def __init__(self, worker: int) -> None:
        super().__init__()
        self.fields = {"worker": worker, "pid": os.getpid()}

    def filter(self, record: logging.LogRecord) -> bool:
        setattr(record, EVENT_FIELD, self.fields | getattr(record, EVENT_FIELD, {}))
        return True


def configure_logging(level: str, log_format: str, access: bool = True, worker: int | None = None) -> None:
    """Logs to stderr; `access` off silences the per-request lines, not the decisions or errors."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(DependencyDetailFilter(logging.getLevelName(level)))
    if worker is not None:
        handler.addFilter(WorkerFields(worker))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger(ACCESS_LOGGER).disabled = not access
    # aiohttp's own access log would repeat our request line without the redaction.
    logging.getLogger("aiohttp.access").disabled = True
