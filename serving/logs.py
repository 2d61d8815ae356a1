"""Log formats: human-readable text (the default) or one JSON object per line for log collectors.

A JSON line has `time` (UTC, ISO 8601 with milliseconds), `level`, `logger` and `message`, then
every extra field the call passed (`log.info("...", extra={"model": m, "generation": g})`), and
`exception` (the formatted traceback) when there is one. Values JSON cannot hold are written as
their `str()`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import weakref
from datetime import datetime, timezone

FORMATS = ("text", "json")
FLOOD_LOG_SECONDS = 10.0  # a FloodLog writes one line at most this often
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines inside values are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_") and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure(log_format: str, level: str | int | None = None) -> None:
    """Use `log_format` ("text" or "json") for every handler of the root logger (installing one on
    stderr if there is none); in json mode Python warnings are logged too, so they become JSON lines."""
    if log_format not in FORMATS:
        raise ValueError(f"unknown log format '{log_format}' (known: {', '.join(FORMATS)})")
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig()
    if level is not None:
        root.setLevel(level)
    formatter = JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    for handler in root.handlers:
        handler.setFormatter(formatter)
    logging.captureWarnings(log_format == "json")


GRPC_AIO_LOGGER = "grpc._cython.cygrpc"
_ANSWER_NOT_SENT = "ExecuteBatchError raised in core by servicer method"


class AnswerNotSentFilter(logging.Filter):
    """gRPC's aio server logs an answer it could not send, because the call ended as it went out (the
    client's deadline passed, or it cancelled), at ERROR with a traceback: the client's doing, not a
    server error, and an alert on ERROR fired on it (4 lines in an 18-minute soak, 21 a minute with 1-8 ms
    deadlines). Such records become DEBUG, shown only when maskbank's level is DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith(_ANSWER_NOT_SENT):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger("maskbank").isEnabledFor(logging.DEBUG)


def quiet_answers_not_sent() -> None:
    """Install AnswerNotSentFilter on gRPC's aio logger (once)."""
    logger = logging.getLogger(GRPC_AIO_LOGGER)
    if not any(isinstance(f, AnswerNotSentFilter) for f in logger.filters):
        logger.addFilter(AnswerNotSentFilter())


_FLOOD_LOGS: "weakref.WeakSet[FloodLog]" = weakref.WeakSet()


def flush_flood_logs() -> None:
    """Write what every FloodLog holds back (at a server's stop)."""
    for flood in list(_FLOOD_LOGS):
        flood.flush()


class FloodLog:
    """For events that come in floods when they come (requests refused or dropped under overload): a
    warning at the first, then at most one line every FLOOD_LOG_SECONDS with the count since the
    last line; the events after a line are written by a timer once that period ends, so the tail of
    a burst is not held back until the next one. A line per event would cost the most when the
    server has least to spare."""

    def __init__(self, logger: logging.Logger, level: int = logging.WARNING):
        self._logger = logger
        self._level = level
        _FLOOD_LOGS.add(self)
        self._lock = threading.Lock()
        self._count = 0  # events so far
        self._logged = (float("-inf"), 0)  # when the last line was written, and `_count` then
        self._latest: tuple[str, tuple] | None = None  # the template and args of the last event held back
        self._timer: threading.Timer | None = None  # writes what was held back when the period ends

    @property
    def count(self) -> int:
        """Events recorded so far."""
        return self._count

    def record(self, template: str, *args, extra: dict | None = None) -> None:
        """Count one event; when a line is due, log `template` (%-style) with the count of events since
        the last line ("so far" or "since the last such line" in {since}) and `args` (and the
        structured fields `extra`, of the latest event)."""
        with self._lock:
            self._count += 1
            now, (when, count) = time.monotonic(), self._logged
            if now - when < FLOOD_LOG_SECONDS:
                self._latest = (template, args, extra)
                if self._timer is None:
                    self._timer = threading.Timer(when + FLOOD_LOG_SECONDS - now, self._write_held_back)
                    self._timer.daemon = True
                    self._timer.start()
                return
            self._logged = (now, self._count)
            events = self._count - count
        since = "since the last such line" if count else "so far"
        self._logger.log(self._level, template.replace("{since}", since), events, *args, extra=extra)

    def flush(self) -> None:
        """Write the events held back now (a server stopping: its daemon timer would not run)."""
        with self._lock:
            timer = self._timer
        if timer is not None:
            timer.cancel()
            self._write_held_back()

    def _write_held_back(self) -> None:
        """The timer's line: the events since the last line, if any came after it."""
        with self._lock:
            self._timer = None
            (_, count), latest = self._logged, self._latest
            if latest is None or self._count == count:
                return
            self._logged = (time.monotonic(), self._count)
            events = self._count - count
        template, args, extra = latest
        self._logger.log(self._level, template.replace("{since}", "since the last such line"), events, *args,
                         extra=extra)
