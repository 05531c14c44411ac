"""Structured JSON logs: one object per line; `extra=` fields become keys. Never log a secret.

Sockets and responses are logged with their socket id and the key's public prefix, never the key.

Lines are written by a thread of their own (the logging docs' "Dealing with handlers that block"):
a write to stderr can wait, on a full pipe or on a file system's journal, and the event loop
waited with it. Under the bench's paced load, single writes of a turn's line held the loop for
40-100 ms while Postgres flushed to the same disk, every socket's events waiting behind them.
"""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import os
import queue
import sys
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


class _Enqueue(logging.handlers.QueueHandler):
    """Hands a record to the writer thread. What could change once the caller goes on is fixed
    here (the message with its arguments, an exception's text); the JSON line is built there."""

    def __init__(self, records: queue.SimpleQueue[logging.LogRecord], formatter: JsonFormatter):
        super().__init__(records)
        self._formatter = formatter

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record.msg, record.args = record.getMessage(), None
        if record.exc_info:
            record.exc_text = self._formatter.formatException(record.exc_info)
            record.exc_info = None
        return record


_listener: logging.handlers.QueueListener | None = None


def stop() -> None:
    """Write what is queued and end the writer thread (at exit, or before a new `setup`)."""
    global _listener
    if _listener is not None:
        _listener.stop()
        _listener = None


def setup(level: str) -> None:
    # What the JSON line does not show need not be gathered for every record (the logging
    # docs' "Optimization" section): the caller's file and line, thread and process names.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    global _listener
    stop()
    formatter = JsonFormatter()
    writer = logging.StreamHandler(sys.stderr)
    writer.setFormatter(formatter)
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    _listener = logging.handlers.QueueListener(records, writer)
    _listener.start()
    atexit.unregister(stop)
    atexit.register(stop)
    root = logging.getLogger()
    root.handlers[:] = [_Enqueue(records, formatter)]
    root.setLevel(level)
    # aiohttp logs a traceback for every malformed request: a hostile client could flood the log.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
