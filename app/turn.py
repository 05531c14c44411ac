"""One accepted `response.create`, from its acceptance to its terminal event."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

from app import metrics
from app.protocol import ClientFrame
from app.turnpolicy import Facts
from app.upstream import UpstreamConn


class Turn:
    __slots__ = (
        "conn",
        "frame",
        "http_fallback",
        "memory_bound_exceeded",
        "received_at",
        "response_id",
        "retried",
        "sent_input",
        "sent_previous_id",
        "started",
        "tally",
        "task",
    )

    def __init__(self, frame: ClientFrame) -> None:
        self.frame = frame
        self.received_at = datetime.now(UTC)
        self.started = time.perf_counter()
        self.tally = metrics.EventTally(self.started)  # its events: count, TTFE, overhead
        self.retried = False
        self.http_fallback = False
        self.memory_bound_exceeded = False
        self.response_id: str | None = None
        # The upstream socket the request went out on (None: not yet, or the HTTP fallback), and
        # what it said: the chain it continued and its input items, for the memory.
        self.conn: UpstreamConn | None = None
        self.sent_previous_id: str | None = None
        self.sent_input: list[Any] = []
        self.task: asyncio.Task[None] | None = None

    def facts(self) -> Facts:
        """What the upstream rules (app/turnpolicy.py) need to know of this turn."""
        frame = self.frame
        return Facts(
            chained=frame.previous_response_id is not None,
            input_is_list=isinstance(frame.input, list),
            events=self.tally.events,
            retried=self.retried,
            http_fallback=self.http_fallback,
            decimal_sampling=frame.has_decimal_sampling,
        )
