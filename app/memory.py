"""Conversation memory (CONTRACT.md §3): per socket, the items of the one chain served on it.

OpenAI keeps only the last response of a connection; when that cache is lost (a new upstream
socket, `previous_response_not_found`) the gateway resends the chain it remembers. Bounded per
socket (`GATEWAY_CONTEXT_BYTES`) and per node (`GATEWAY_CONTEXT_TOTAL_BYTES`, least recently
extended memory dropped first).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import orjson


def as_items(value: Any) -> list[Any] | None:
    """A request's `input` as a list of items (a string is one user message); None if neither."""
    if value is None:
        return []
    if isinstance(value, list):
        return value
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    return None


class MemoryBudget:
    """The node-wide bound: evicts whole memories, least recently extended first."""

    def __init__(self, total_bytes: int) -> None:
        self.total_bytes = total_bytes
        self.used = 0
        self._lru: OrderedDict[int, ConversationMemory] = OrderedDict()

    def charge(self, memory: ConversationMemory, delta: int) -> None:
        self.used += delta
        key = id(memory)
        if memory.size:
            self._lru[key] = memory
            self._lru.move_to_end(key)
        else:
            self._lru.pop(key, None)
        while self.used > self.total_bytes and self._lru:
            _, oldest = self._lru.popitem(last=False)
            oldest.clear(bound_exceeded=True)


class ConversationMemory:
    """The chain is held as JSON, one piece per turn that extended it (the items of a JSON array
    without its brackets), and parsed only when it is resent: as parsed objects, the last turn's
    items were about 1 KB of each idle socket (14 objects for a one-message answer) against a
    few hundred bytes as text. `size` counts the JSON's bytes."""

    __slots__ = (
        "_pieces",
        "budget",
        "dropped_response_id",
        "last_response_id",
        "limit_bytes",
        "size",
    )

    def __init__(self, limit_bytes: int, budget: MemoryBudget | None = None) -> None:
        self.limit_bytes = limit_bytes
        self.budget = budget
        self.last_response_id: str | None = None
        self._pieces: list[bytes] = []
        self.size = 0
        # The response whose chain was dropped for size, so the ledger can say why a retry failed.
        self.dropped_response_id: str | None = None

    def remembers(self, previous_response_id: str | None) -> bool:
        """Whether the chain up to and including `previous_response_id` is held."""
        return previous_response_id is not None and previous_response_id == self.last_response_id

    def chain_for(self, previous_response_id: str | None) -> list[Any] | None:
        """The remembered items up to and including `previous_response_id` (a new list, parsed
        from the held JSON), or None."""
        if not self.remembers(previous_response_id):
            return None
        result: list[Any] = orjson.loads(b"[%b]" % b",".join(self._pieces))
        return result

    def was_dropped(self, response_id: str | None) -> bool:
        return response_id is not None and response_id == self.dropped_response_id

    def record(
        self,
        sent_previous_id: str | None,
        sent_input: list[Any],
        response_id: str,
        output: list[Any],
    ) -> None:
        """A response was served: extend the chain it continued, or start a new one."""
        text = orjson.dumps([*sent_input, *output])
        added = len(text)
        if sent_previous_id is not None and sent_previous_id != self.last_response_id:
            self.clear()  # a chain this socket does not remember: hold nothing rather than guess
            return
        base_size = 0 if sent_previous_id is None else self.size
        if base_size + added > self.limit_bytes:
            self.clear(bound_exceeded=True, response_id=response_id)
            return
        old_size = self.size
        if sent_previous_id is None:
            self._pieces = []
        if added > 2:  # not `[]`
            self._pieces.append(text[1:-1])
        self.size = base_size + added
        self.last_response_id = response_id
        self.dropped_response_id = None
        if self.budget is not None:
            self.budget.charge(self, self.size - old_size)

    def forget(self, response_id: str | None) -> None:
        """A continuation of `response_id` failed: OpenAI evicted it, so do we."""
        if response_id is not None and response_id == self.last_response_id:
            self.clear()

    def clear(self, *, bound_exceeded: bool = False, response_id: str | None = None) -> None:
        old_size = self.size
        if bound_exceeded:
            self.dropped_response_id = response_id or self.last_response_id
        self._pieces = []
        self.size = 0
        self.last_response_id = None
        if self.budget is not None and old_size:
            self.budget.charge(self, -old_size)
