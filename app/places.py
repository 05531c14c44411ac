"""`GATEWAY_MAX_SOCKETS`: the node's places for sockets (CONTRACT.md §1, §3).

A handshake takes a place when it passes the check, before its first `await`, and gives it back
when it is refused later or when its socket ends. Counting the sockets already open instead lets
a burst of handshakes (a balancer's restart reconnecting thousands of clients) all pass the check
while each one waits for Redis.

One process counts in an int (`Places`). With `gateway serve --workers N` the node is N
processes: each keeps its count in its own 8-byte slot of a file the parent made
(`SharedPlaces`), and a take adds up every slot and writes its own under `flock`, so two workers
never both take the last place. The kernel lets go of a dead worker's lock; the parent zeroes
a dead worker's slot (`clear_slot`) before it starts another in its place.
"""

from __future__ import annotations

import fcntl
import mmap
import os
from collections.abc import Iterator
from contextlib import contextmanager

SLOT_BYTES = 8


class Places:
    """This process' sockets, open or in their handshake, against the node's cap."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.held = 0

    def take(self) -> bool:
        if self.held >= self.cap:
            return False
        self.held += 1
        return True

    def give(self) -> None:
        self.held -= 1


@contextmanager
def _locked(fd: int) -> Iterator[None]:
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


class SharedPlaces(Places):
    """The places of one worker of a node: slot `index` of the file at `path`, the node's count
    the sum of every slot."""

    def __init__(self, cap: int, path: str, index: int) -> None:
        super().__init__(cap)
        self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            size = os.fstat(self._fd).st_size
            if size < (index + 1) * SLOT_BYTES or size % SLOT_BYTES:
                raise ValueError(f"{path}: {size} bytes hold no slot {index}")
            self._map = mmap.mmap(self._fd, size)
        except BaseException:
            os.close(self._fd)
            raise
        self._slots = memoryview(self._map).cast("q")
        self._index = index

    def take(self) -> bool:
        with _locked(self._fd):
            if sum(self._slots) >= self.cap:
                return False
            self.held += 1
            self._slots[self._index] = self.held
            return True

    def give(self) -> None:
        with _locked(self._fd):
            self.held -= 1
            self._slots[self._index] = self.held

    def node_total(self) -> int:
        with _locked(self._fd):
            return sum(self._slots)

    def close(self) -> None:
        self._slots.release()
        self._map.close()
        os.close(self._fd)


def create_slots(path: str, workers: int) -> None:
    """The parent's file of `workers` zeroed slots."""
    with open(path, "wb") as f:
        f.write(bytes(SLOT_BYTES * workers))


def clear_slot(path: str, index: int) -> None:
    """Zero a dead worker's slot: its sockets died with it."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        with _locked(fd):
            os.pwrite(fd, bytes(SLOT_BYTES), index * SLOT_BYTES)
    finally:
        os.close(fd)
