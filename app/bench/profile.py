"""A py-spy profile of the gateway under load, summarised as its top costs."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*)\)$")
_MAIN_ROOT = "_run_module_as_main "
_SHORTEN = re.compile(r"^.*?/(site-packages|lib/python3\.\d+)/")


def find_py_spy() -> str | None:
    """py-spy on PATH or next to this interpreter (pip install py-spy into the venv)."""
    beside = Path(sys.executable).parent / "py-spy"
    if os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("py-spy")


async def start_recording(
    py_spy: str, pid: int, seconds: float, raw: Path, rate: int = 250
) -> asyncio.subprocess.Process:
    """`py-spy record` of `pid` into collapsed stacks (`--format raw`), by function."""
    return await asyncio.create_subprocess_exec(
        py_spy,
        "record",
        "--pid",
        str(pid),
        "--duration",
        f"{max(1, round(seconds))}",
        "--rate",
        str(rate),
        "--format",
        "raw",
        "--function",
        # py-spy pauses the process for each sample: --nonblocking would cost less but leaves
        # about a fifth of the stacks torn. The figures are measured before, without py-spy.
        "--output",
        str(raw),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def has_samples(raw: Path) -> bool:
    return raw.exists() and raw.stat().st_size > 0


def _short(frame: str) -> str:
    found = _FRAME.match(frame)
    if not found:
        return frame
    path = _SHORTEN.sub("", found["file"])
    cwd = os.getcwd() + "/"
    path = path.removeprefix(cwd)
    if "/app/" in path:
        path = "app/" + path.split("/app/", 1)[1]
    return f"{found['func']} ({path})"


def load_stacks(raw: Path) -> Counter[tuple[str, ...]]:
    """Collapsed stacks (`frame;frame;… count`, root first) and their sample counts."""
    stacks: Counter[tuple[str, ...]] = Counter()
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks[tuple(_short(f) for f in stack.split(";"))] += int(count)
    return stacks


def _main_thread(stack: tuple[str, ...]) -> bool:
    return bool(stack) and stack[0].startswith(_MAIN_ROOT)


def summarize(stacks: Counter[tuple[str, ...]], top: int = 15) -> list[str]:
    """The event loop thread's top frames by self time, then the app's own functions by
    inclusive time (frames under every stack, such as `main`, left out).

    Other threads are only counted: py-spy reports an idle pool thread waiting in C code (the
    ledger's journal runs in one) as busy in `_worker`.
    """
    everything = sum(stacks.values())
    main = Counter({s: n for s, n in stacks.items() if _main_thread(s)})
    total = sum(main.values())
    if not total:
        return ["(no samples: was the process busy?)"]
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for stack, count in main.items():
        own[stack[-1]] += count
        for frame in set(stack):
            inclusive[frame] += count
    lines = [
        f"{total} samples of the event loop thread ({everything - total} more in other "
        "threads, left out); self time (the frame itself was running):"
    ]
    lines += [f"  {100 * n / total:5.1f}%  {frame}" for frame, n in own.most_common(top)]
    lines.append("self time by file:")
    files: Counter[str] = Counter()
    for frame, n in own.items():
        found = _FRAME.match(frame)
        files[found["file"].rpartition(":")[0] if found else frame] += n
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in files.most_common(10)]
    lines.append("inclusive time (the frame or what it called) of the app's own functions:")
    app = [(f, n) for f, n in inclusive.most_common() if "(app/" in f and n < 0.9 * total]
    lines += [f"  {100 * n / total:5.1f}%  {frame}" for frame, n in app[:top]]
    return lines
