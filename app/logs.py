"""Structured JSON logs: one object per line; `extra=` fields become keys. Never log a secret.

Sockets and responses are logged with their socket id and the key's public prefix, never the key.

Lines are written by a thread of their own (the logging docs' "Dealing with handlers that block"),
gathered for up to GATHER_SECONDS and written together: a write to stderr can wait, on a full
pipe or on a file system's journal, and the event loop waited with it. Under the bench's paced
load, single writes of a turn's line held the loop for 40-100 ms while Postgres flushed to the
same disk, every socket's events waiting behind them.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import logging.handlers
import os
import queue
import sys
import threading
import time
from typing import Any

import orjson

_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
}


class JsonFormatter(logging.Formatter):
    """A line costs about half what it did with `datetime.isoformat` per line and a walk of
    every record attribute: a line per response was 3% of the gateway's time under load."""

    def __init__(self) -> None:
        super().__init__()
        self._pid = os.getpid()  # which worker, with `gateway serve --workers N`
        self._second = -1
        self._stamp = ""

    def _time(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp}.{int((created - second) * 1000):03d}+00:00"

    def format_line(self, line: Line) -> str:
        entry: dict[str, Any] = {
            "time": self._time(line.created),
            "level": "info",
            "logger": line.logger,
            "message": line.message,
            "pid": self._pid,
            **line.fields,
        }
        return orjson.dumps(entry, default=str).decode()

    def format(self, record: logging.LogRecord) -> str:
        fields = record.__dict__
        entry: dict[str, Any] = {
            "time": self._time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": self._pid,
        }
        for key in fields.keys() - _STANDARD:
            if not key.startswith("_"):
                entry[key] = fields[key]
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc"] = record.exc_text
        return orjson.dumps(entry, default=str).decode()


class Line:
    """A log line queued without a LogRecord (`info`): what the hot path logs per turn."""

    __slots__ = ("created", "fields", "logger", "message")

    def __init__(self, logger: str, message: str, fields: dict[str, Any]) -> None:
        self.created = time.time()
        self.logger = logger
        self.message = message
        self.fields = fields


def info(logger: logging.Logger, message: str, fields: dict[str, Any]) -> None:
    """`logger.info(message, extra=fields)`, without building a LogRecord (about 3 us, a turn's
    line) when the JSON writer thread is set up; through `logging` otherwise (tests, the shell)."""
    records = _records
    if records is None:
        logger.info(message, extra=fields)
    elif logger.isEnabledFor(logging.INFO):
        records.put_nowait(Line(logger.name, message, fields))


class _Enqueue(logging.handlers.QueueHandler):
    """Hands a record to the writer thread. What could change once the caller goes on is fixed
    here (the message with its arguments, an exception's text); the JSON line is built there."""

    def __init__(
        self, records: queue.SimpleQueue[logging.LogRecord | Line | None], formatter: JsonFormatter
    ) -> None:
        super().__init__(records)
        self._formatter = formatter

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record.msg, record.args = record.getMessage(), None
        if record.exc_info:
            record.exc_text = self._formatter.formatException(record.exc_info)
            record.exc_info = None
        return record

    def handle(self, record: logging.LogRecord) -> bool:
        """`Handler.handle` without its lock (the queue is thread-safe) and, when the handler has
        no filter (the norm), without asking them: a line per turn went through both."""
        if self.filters and not self.filter(record):
            return False
        try:
            self.queue.put_nowait(self.prepare(record))
        except Exception:
            self.handleError(record)
        return True


# How long the writer lets lines gather after the first before it writes them, in one write:
# under load a line per turn and two per socket woke a thread and made a write(2) each.
GATHER_SECONDS = 0.02


class _Writer(threading.Thread):
    """Writes queued records as JSON lines to `stream`, a batch per write; None ends it."""

    def __init__(
        self, records: queue.SimpleQueue[logging.LogRecord | Line | None], formatter: JsonFormatter
    ) -> None:
        super().__init__(name="log-writer", daemon=True)
        self._records = records
        self._formatter = formatter
        self.stream = sys.stderr

    def run(self) -> None:
        records = self._records
        while True:
            batch = [records.get()]
            if batch[0] is not None:
                time.sleep(GATHER_SECONDS)
            with contextlib.suppress(queue.Empty):
                while batch[-1] is not None:
                    batch.append(records.get_nowait())
            lines = [self._line(r) for r in batch if r is not None]
            if lines:
                try:
                    self.stream.write("\n".join(lines) + "\n")
                    self.stream.flush()
                except (OSError, ValueError):  # stderr closed or gone: nothing else to tell
                    pass
            if batch[-1] is None:
                return

    def _line(self, record: logging.LogRecord | Line) -> str:
        try:
            if isinstance(record, Line):
                return self._formatter.format_line(record)
            return self._formatter.format(record)
        except Exception:  # a field orjson cannot take (default=str covers most)
            return orjson.dumps({"level": "error", "message": "unformattable log record"}).decode()


_records: queue.SimpleQueue[logging.LogRecord | Line | None] | None = None
_writer: _Writer | None = None


def stop() -> None:
    """Write what is queued and end the writer thread (at exit, or before a new `setup`)."""
    global _records, _writer
    if _writer is not None and _records is not None:
        _records.put(None)
        _writer.join()
    _records = _writer = None


def setup(level: str) -> None:
    # What the JSON line does not show need not be gathered for every record (the logging
    # docs' "Optimization" section): the caller's file and line, thread and process names.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    global _records, _writer
    stop()
    formatter = JsonFormatter()
    _records = queue.SimpleQueue()
    _writer = _Writer(_records, formatter)
    _writer.start()
    atexit.unregister(stop)
    atexit.register(stop)
    root = logging.getLogger()
    root.handlers[:] = [_Enqueue(_records, formatter)]
    root.setLevel(level)
    # aiohttp logs a traceback for every malformed request: a hostile client could flood the log.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
