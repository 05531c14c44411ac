"""Which event loop a process runs on: uvloop when installed (the default), else asyncio's.

uvloop's transports write to sockets in C: under load about a quarter of the gateway's time was
asyncio's `_SelectorSocketTransport.write` (docs/performance.md). `GATEWAY_EVENT_LOOP=asyncio`
keeps the standard loop, for debugging or a platform uvloop does not build on.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

T = TypeVar("T")

LoopChoice = Literal["auto", "uvloop", "asyncio"]


def loop_factory(choice: LoopChoice = "auto") -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory, or None for asyncio's default; `uvloop` insists on it."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def loop_name(choice: LoopChoice = "auto") -> str:
    return "asyncio" if loop_factory(choice) is None else "uvloop"


def run(main: Coroutine[Any, Any, T], choice: LoopChoice = "auto") -> T:
    """`asyncio.run` on the chosen loop."""
    with asyncio.Runner(loop_factory=loop_factory(choice)) as runner:
        return runner.run(main)


def freeze_startup() -> None:
    """Once a server is up: what start-up made (modules, the app, its settings) lives as long as
    the process, so it leaves the cyclic collector's sight (`gc.freeze`), and a full collection
    under load walks what the load made alone: 45 ms -> 10-15 ms in the gateway with 200 paced
    sockets. The gateway, the simulator and the bench's relay all do it: the bench compares
    them on the same terms, and a 50-70 ms pause in the simulator landed on whichever target
    the bench was measuring."""
    gc.collect()
    gc.freeze()
