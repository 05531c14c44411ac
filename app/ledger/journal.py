"""Spill files: where ledger rows wait on local disk while Postgres is away.

Layout of `GATEWAY_SPILL_DIR`:

    <spill dir>/
      20260101T120000123456-4242-ab12cd/   one directory per Ledger instance (time-pid-random)
        lock                               flock'ed by its live owner
        000001000000.jsonl                 sealed segments, oldest name first
        000001000001.jsonl
      rejected.jsonl                       rows Postgres refused for good, kept for an operator

Every segment is written whole (to a `.tmp` name, fsynced, renamed, directory fsynced) and never
appended to afterwards, so a reader never sees half a segment and a crash leaves either the whole
segment or none. Segments after the first are numbered up from 10⁹; a batch that must go before
them all (the one the writer had in flight at close) is numbered down, so name order is always
row order.

An instance directory whose lock is free belongs to a stopped process: the next Ledger to start
adopts it and writes its segments before anything of its own, then deletes it. Several processes
may share one spill dir (each owns its own directory); only dead ones are adopted.

All methods here do blocking I/O: the Ledger calls them through `asyncio.to_thread`.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from app.ledger.errors import LedgerError
from app.ledger.rows import Row, decode_line, encode_line

log = logging.getLogger(__name__)

_LOCK = "lock"
_SUFFIX = ".jsonl"
_FIRST = 1_000_000_000
REJECTED = "rejected.jsonl"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _try_lock(directory: Path) -> int | None:
    """An fd holding the directory's lock, or None while a live process holds it."""
    fd = os.open(directory / _LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def count_lines(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


class Journal:
    """The spill files of one Ledger instance, and the orphans it adopted."""

    def __init__(self, root: Path) -> None:
        self.root = root
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
        self.directory = root / f"{stamp}-{os.getpid()}-{secrets.token_hex(3)}"
        self._lock_fd: int | None = None
        self._adopted: dict[Path, int] = {}  # orphan directory -> fd holding its lock
        self._tail = _FIRST
        self._head = _FIRST

    def open(self) -> list[tuple[Path, int]]:
        """Take this instance's directory and adopt orphans: their segments and line counts."""
        # The race: another process adopting orphans could lock a new directory between its
        # mkdir and our lock (and remove it as empty). So the directory is made and locked
        # under a name orphan hunts pass over (a leading dot), and only then given its name.
        staging = self.root / f".{self.directory.name}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            staging.mkdir()
            fd = _try_lock(staging)
            if fd is not None:
                staging.rename(self.directory)
        except OSError as exc:
            raise LedgerError(f"cannot use GATEWAY_SPILL_DIR {self.root}: {exc}") from exc
        if fd is None:  # pragma: no cover - a fresh random name nobody else looks at
            raise LedgerError(f"spill directory {staging} is locked by another process")
        self._lock_fd = fd
        return self.adopt_orphans()

    def adopt_orphans(self) -> list[tuple[Path, int]]:
        """Take the directories of stopped processes: their segments and line counts, in order.

        Called at start, and again from time to time: a short-lived process (an admin command
        from a shell) may have left rows behind while this one was running.
        """
        segments: list[tuple[Path, int]] = []
        found = (p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        for directory in sorted(found):
            if directory != self.directory and directory not in self._adopted:
                segments.extend(self._adopt(directory))
        return segments

    def _adopt(self, directory: Path) -> list[tuple[Path, int]]:
        try:
            fd = _try_lock(directory)
        except OSError:
            return []  # being removed by the process that emptied it
        if fd is None:
            return []  # a live Ledger owns it
        self._adopted[directory] = fd
        for tmp in directory.glob("*.tmp"):
            tmp.unlink(missing_ok=True)  # a segment its writer never finished: never counted
        found = [(path, count_lines(path)) for path in sorted(directory.glob("*" + _SUFFIX))]
        if found:
            log.info("ledger: replaying %d spill file(s) left in %s", len(found), directory)
        else:
            self._release(directory)
        return found

    def write_segment(self, rows: Sequence[Row], *, head: bool = False) -> tuple[Path | None, int]:
        """Seal `rows` into a new segment (after all others, or before with `head`).

        Returns its path and how many rows it holds (None and 0 if none could be encoded: such
        rows go to `rejected.jsonl`). Raises OSError if the disk refuses.
        """
        lines: list[bytes] = []
        unencodable: list[tuple[Any, str]] = []
        for row in rows:
            try:
                lines.append(encode_line(row))
            except (TypeError, KeyError, orjson.JSONEncodeError) as exc:
                unencodable.append((repr(row), f"cannot encode: {exc}"))
        if unencodable:
            self.reject(unencodable)
        if not lines:
            return None, 0
        if head:
            self._head -= 1
            number = self._head
        else:
            self._tail += 1
            number = self._tail
        self.directory.mkdir(parents=True, exist_ok=True)  # gone if written after close()
        path = self.directory / f"{number:012d}{_SUFFIX}"
        tmp = path.with_suffix(".tmp")
        with tmp.open("wb") as f:
            f.write(b"".join(lines))
            f.flush()
            os.fsync(f.fileno())
        tmp.rename(path)
        _fsync_dir(self.directory)
        return path, len(lines)

    def read_segment(self, path: Path) -> tuple[list[Row], list[bytes]]:
        """The rows of a segment, and any lines that no longer decode."""
        rows: list[Row] = []
        bad: list[bytes] = []
        with path.open("rb") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    rows.append(decode_line(line))
                except (ValueError, KeyError, TypeError):
                    bad.append(line)
        if bad:
            self.reject((line.decode("utf-8", "replace").rstrip("\n"), "bad line") for line in bad)
        return rows, bad

    def remove_segment(self, path: Path) -> None:
        """Forget a segment whose rows are all in Postgres; release an adopted dir left empty."""
        path.unlink(missing_ok=True)
        directory = path.parent
        if directory in self._adopted and not any(directory.glob("*" + _SUFFIX)):
            self._release(directory)

    def reject(self, entries: Iterable[tuple[Any, str]]) -> None:
        """Keep rows Postgres will never take, for an operator: one JSON object a line.

        Each entry is (row, error); the row is a journal line's object (`decode_line` reads it
        back) or, for what cannot be encoded, its text.
        """
        now = datetime.now(UTC).isoformat()
        data = b"".join(
            orjson.dumps(
                {"at": now, "error": error, "row": row},
                default=str,
                option=orjson.OPT_APPEND_NEWLINE,
            )
            for row, error in entries
        )
        if not data:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / REJECTED).open("ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def close(self) -> None:
        """Release every lock; delete this instance's directory if nothing waits in it."""
        for directory in list(self._adopted):
            fd = self._adopted.pop(directory)
            os.close(fd)  # its segments stay, for the next start to adopt
        if self._lock_fd is not None:
            if not any(self.directory.glob("*" + _SUFFIX)):
                self._remove_dir(self.directory)
            os.close(self._lock_fd)
            self._lock_fd = None

    def _release(self, directory: Path) -> None:
        fd = self._adopted.pop(directory)
        self._remove_dir(directory)
        os.close(fd)

    @staticmethod
    def _remove_dir(directory: Path) -> None:
        # The lock file goes last but one and the directory last, while we still hold the lock:
        # another process that opens the lock file now finds no segments and lets it be.
        with contextlib.suppress(OSError):
            (directory / _LOCK).unlink()
            directory.rmdir()
