"""The simulator's shared state, reached by handlers through the typed `STATE` app key."""

from __future__ import annotations

import random
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from app.simulator import faults
from app.simulator.generate import Chain
from app.simulator.options import SimulatorOptions


class RequestLog:
    """What arrived, in order: handshakes and requests (`GET /_sim/requests`)."""

    def __init__(self, limit: int) -> None:
        self._entries: deque[dict[str, Any]] = deque(maxlen=limit)

    def record(
        self,
        kind: str,
        conn: str | None,
        request: web.BaseRequest,
        headers: dict[str, str],
        body: Any,
    ) -> None:
        """Note one arrival; `body` is the JSON as received (a string if it was not JSON)."""
        self._entries.append(
            {
                "kind": kind,
                "conn": conn,
                "method": request.method,
                "path": request.path,
                "headers": headers,
                "body": body,
                "at": time.time(),
            }
        )

    def snapshot(self) -> list[dict[str, Any]]:
        return list(self._entries)

    def clear(self) -> None:
        self._entries.clear()


def lowered_headers(request: web.BaseRequest) -> dict[str, str]:
    return {name.lower(): value for name, value in request.headers.items()}


class ArmedFaults:
    """Faults armed through `POST /_sim/faults`, each for the next `count` occasions."""

    def __init__(self) -> None:
        self._armed: deque[list[Any]] = deque()  # [fault, remaining]

    def arm(self, fault: str, count: int) -> None:
        self._armed.append([fault, count])

    def take(self) -> str | None:
        """The fault for this occasion, if one is armed (first armed, first used)."""
        if not self._armed:
            return None
        head = self._armed[0]
        head[1] -= 1
        if head[1] <= 0:
            self._armed.popleft()
        return str(head[0])

    def snapshot(self) -> list[dict[str, Any]]:
        return [{"fault": fault, "count": count} for fault, count in self._armed]

    def clear(self) -> None:
        self._armed.clear()


class ResponseStore:
    """Responses created with `store: true`, chainable from any connection and over HTTP."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._chains: OrderedDict[str, Chain] = OrderedDict()

    def put(self, chain: Chain) -> None:
        self._chains[chain.response_id] = chain
        while len(self._chains) > self._limit:
            self._chains.popitem(last=False)

    def get(self, response_id: str) -> Chain | None:
        return self._chains.get(response_id)


@dataclass
class ConnectionInfo:
    """One open upstream socket and its cache: the most recent response only."""

    id: str
    opened_at: float
    last: Chain | None = None
    turns: int = 0
    # Cuts the TCP connection with no close frame (POST /_sim/connections/{id}/drop).
    drop: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "opened_at": self.opened_at,
            "last_response_id": self.last.response_id if self.last else None,
            "turns": self.turns,
        }


@dataclass
class SimState:
    options: SimulatorOptions
    log: RequestLog = field(init=False)
    store: ResponseStore = field(init=False)
    handshake_faults: ArmedFaults = field(default_factory=ArmedFaults)
    turn_faults: ArmedFaults = field(default_factory=ArmedFaults)
    connections: dict[str, ConnectionInfo] = field(default_factory=dict)
    sockets: weakref.WeakSet[web.WebSocketResponse] = field(default_factory=weakref.WeakSet)
    rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self.log = RequestLog(self.options.request_log_limit)
        self.store = ResponseStore(self.options.store_limit)
        self.rng = random.Random(self.options.seed)

    def default_turn_fault(self) -> str | None:
        """The fault of a WebSocket turn whose metadata names none: armed, run-wide, random."""
        armed = self.turn_faults.take()
        if armed is not None:
            return armed
        if self.options.fault is not None:
            return self.options.fault
        if self.options.fault_rate and self.rng.random() < self.options.fault_rate:
            return self.rng.choice(faults.RANDOM_FAULTS)
        return None

    def reset(self) -> None:
        self.log.clear()
        self.handshake_faults.clear()
        self.turn_faults.clear()


STATE = web.AppKey("sim_state", SimState)
