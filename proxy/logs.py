"""Structured logs: one line per request and per decision, JSON or text, with secrets kept out."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

from aiohttp.http_exceptions import HttpProcessingError
from multidict import MultiDictProxy

EVENT_FIELD = "event_fields"
SECRET_QUERY_KEYS = frozenset({"_state", "token", "access_token", "password", "signature", "sig"})
REDACTED = "REDACTED"
ACCESS_LOGGER = "foreign_layer_proxy.access"
# Lines logged in one turn of the event loop are written together at the start of its next turn (or
# once this many characters wait); warnings and errors at once.
BUFFER_CHARACTERS = 64 * 1024
_ENCODER = json.JSONEncoder(default=str)  # json.dumps(default=...) would build one per line


class _SecondPrefix:
    """The formatted second of the last timestamp: a line per request mostly falls in the same second."""

    second = -1
    text = ""


def rfc3339_utc(created: float) -> str:
    """Like distribution's logs: RFC 3339 in UTC with milliseconds, e.g. 2026-12-01T22:16:24.123Z."""
    seconds = int(created)
    if seconds != _SecondPrefix.second:
        _SecondPrefix.text, _SecondPrefix.second = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)), seconds
    return f"{_SecondPrefix.text}.{int((created - seconds) * 1000):03d}Z"


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
        return _ENCODER.encode(line)


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


class BatchedStreamHandler(logging.StreamHandler[TextIO]):
    """A stream handler that writes the lines logged in one turn of an event loop together, when the loop
    next turns: under load one write(2) for many requests' lines instead of one each. Warnings and errors,
    lines logged outside an event loop (a worker thread, the CLI) and a full buffer are written at once;
    what waits is written at exit (logging's shutdown flushes every handler)."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._lines: list[str] = []
        self._waiting = 0
        self._scheduled = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except (TypeError, ValueError, RecursionError):
            self.handleError(record)
            return
        self._lines.append(line)
        self._waiting += len(line)
        if record.levelno >= logging.WARNING or self._waiting >= BUFFER_CHARACTERS or not self._flush_later():
            self.flush()

    def _flush_later(self) -> bool:
        if self._scheduled:
            return True
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        loop.call_soon(self.flush)
        self._scheduled = True
        return True

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._scheduled = False
            if self._lines:
                lines, self._lines, self._waiting = self._lines, [], 0
                try:
                    self.stream.write("\n".join(lines) + "\n")
                except (OSError, ValueError):
                    self.handleError(logging.makeLogRecord({"msg": "lost log lines", "levelno": logging.ERROR}))
            super().flush()


def configure_logging(level: str, log_format: str, access: bool = True, worker: int | None = None) -> None:
    """Logs to stderr; `access` off silences the per-request lines, not the decisions or errors."""
    # No caller, thread or process looked up for each line: no formatter of ours shows them.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = BatchedStreamHandler(sys.stderr)
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
