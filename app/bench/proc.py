"""CPU time and resident memory of another process on this host, read from /proc (Linux)."""

from __future__ import annotations

import asyncio
import os
import time

_TICKS = os.sysconf("SC_CLK_TCK")


class ProcError(Exception):
    """The process is gone, or /proc cannot be read (not Linux)."""


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds the process has used so far (`/proc/PID/stat` fields 14, 15)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ProcError(f"cannot read /proc/{pid}/stat: {exc.strerror}") from None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = raw[raw.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def children(pid: int) -> list[int]:
    """The process's children (every thread's `children` file); none when it is gone."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                found += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return found


def tree(pid: int) -> list[int]:
    """The process and its descendants (`gateway serve --workers N`: the parent, the workers)."""
    pids, at = [pid], 0
    while at < len(pids):
        pids += children(pids[at])
        at += 1
    return pids


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of the process and its live descendants."""
    total = cpu_seconds(pid)
    for child in tree(pid)[1:]:
        try:
            total += cpu_seconds(child)
        except ProcError:
            pass  # ended between the listing and the read
    return total


def rss_bytes(pid: int) -> int:
    """Resident set size of the process and its descendants (`VmRSS` of `/proc/PID/status`)."""
    total = _rss(pid)
    for child in tree(pid)[1:]:
        try:
            total += _rss(child)
        except ProcError:
            pass
    return total


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError as exc:
        raise ProcError(f"cannot read /proc/{pid}/status: {exc.strerror}") from None
    raise ProcError(f"/proc/{pid}/status has no VmRSS (a zombie?)")


def host_busy_seconds() -> float:
    """CPU seconds all cores of the host have spent busy (`/proc/stat`: all but idle, iowait)."""
    try:
        with open("/proc/stat", "rb") as f:
            fields = f.readline().split()[1:]
    except OSError as exc:
        raise ProcError(f"cannot read /proc/stat: {exc.strerror}") from None
    ticks = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
    return (sum(ticks) - ticks[3] - ticks[4]) / _TICKS


class HostLoad:
    """How busy the rest of the host was (other sessions, Redis, Postgres) while we measured."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = [*pids, os.getpid()]
        self._start = self._sample()

    def _sample(self) -> tuple[float, float, float]:
        ours = 0.0
        for pid in self.pids:
            try:
                ours += tree_cpu_seconds(pid)
            except ProcError:
                pass
        return time.monotonic(), host_busy_seconds(), ours

    def others_cores(self) -> float:
        """Average cores busy outside the watched processes since this object was made."""
        now = self._sample()
        wall = now[0] - self._start[0]
        others = (now[1] - self._start[1]) - (now[2] - self._start[2])
        return max(others, 0.0) / wall if wall > 0 else 0.0


class CpuMeter:
    """CPU seconds used by some processes between `start()` and `stop()`; this one included."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = dict(pids)
        self._before: dict[str, float] = {}
        self.used: dict[str, float] = {}

    def _sample(self) -> dict[str, float]:
        sample = {name: tree_cpu_seconds(pid) for name, pid in self.pids.items()}
        sample["client"] = cpu_seconds(os.getpid())
        return sample

    def start(self) -> None:
        self._before = self._sample()

    def stop(self) -> dict[str, float]:
        after = self._sample()
        self.used = {name: after[name] - self._before[name] for name in after}
        return self.used


async def wait_quiet(
    pids: list[int], *, busy: float = 0.1, window: float = 0.3, limit: float = 10.0
) -> bool:
    """Wait until each process uses under `busy` of a core over `window` seconds (a process
    still closing the sockets of the last phase would otherwise slow the next one down).
    False when `limit` seconds pass first."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        before = [tree_cpu_seconds(pid) for pid in pids]
        await asyncio.sleep(window)
        used = [tree_cpu_seconds(pid) - b for pid, b in zip(pids, before, strict=True)]
        if all(u < busy * window for u in used):
            return True
    return False
