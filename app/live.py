"""What the node, its drain and the expulsion sweep see of a customer socket: `LiveSocket`.

app/session.py's `Session` is the one implementation. Declaring the few members they use here,
low in the tree, lets app/node.py hold its sockets without importing the session, which imports
the node.
"""

from __future__ import annotations

import enum
from typing import Any, Protocol

from app.auth.principal import Principal
from app.errors import Code


class LiveSocket(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def principal(self) -> Principal: ...

    @property
    def state(self) -> enum.Enum:
        """The session's state (app/session.py `State`), compared by identity."""
        ...

    def info(self) -> dict[str, Any]:
        """What the session listing shows of it (renewed with its slot leases)."""
        ...

    async def expel(self, code: Code) -> None:
        """Its key or team no longer stands: error frame `code`, then close 1008."""
        ...

    async def drain(self) -> None:
        """SIGTERM: close when idle, or right after the response in flight."""
        ...

    async def drain_deadline(self) -> None:
        """The drain's deadline passed: end the response in flight."""
        ...
