"""A request's gateway key, and whether live sockets' keys and teams still stand.

`Authenticator.authenticate` answers a request with who it is (`Principal`, with its key and
team) or the refusal it gets (401/403/429/503), the failed-authentication limit included
(app/auth/guard.py). `Authenticator.sweep` runs on every tick of the node's view (4 a second)
and decides which live sockets must be closed after a revocation, an expiry, the end of a
rotation's grace or a team disable; the node closes them.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import UTC, datetime

from aiohttp import hdrs, web

from app.auth.guard import AUTH_GUARD
from app.auth.principal import Principal, next_boundary, secret_status, standing
from app.errors import Code, GatewayError
from app.live import LiveSocket
from app.models import ApiKey, Team
from app.view import NodeView


def bearer(request: web.Request) -> str | None:
    header = request.headers.get(hdrs.AUTHORIZATION, "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class Authenticator:
    def __init__(self, view: NodeView) -> None:
        self.view = view
        # Key records of live sockets, refreshed when the store's version moves (revocation).
        self.key_cache: dict[str, ApiKey] = {}
        # The next moment a live socket's key changes by the clock alone (it expires, or a
        # rotated secret's grace ends); between it and a change of the store's version, no
        # live socket's standing can change, so the 4-a-second check skips the sockets.
        self._next_boundary: datetime | None = None
        self._keys_unread = False  # a changed version whose keys could not be read yet

    async def authenticate(
        self, request: web.Request, *, fresh: bool = False
    ) -> tuple[Principal, ApiKey, Team]:
        """The gateway key of a request, or the refusal (401/403/429/503) it gets.

        From an address out of failed authentications (app/auth/guard.py) a key the store never
        issued gets 429 without a lookup; any other key is looked up and served as usual, so a
        valid key is never refused for other people's failures. A 401 counts against the
        address. `fresh`: ask Redis even for a secret this node has seen
        (NodeView.lookup_secret).
        """
        guard = request.app[AUTH_GUARD]
        address = guard.address_of(request)
        refused = guard.refusal(address)
        if refused is not None and not await self.view.may_be_issued(bearer(request)):
            raise refused
        try:
            return await self._lookup_key(request, fresh)
        except GatewayError as err:
            guard.charge(address, err)
            raise

    async def _lookup_key(
        self, request: web.Request, fresh: bool
    ) -> tuple[Principal, ApiKey, Team]:
        secret = bearer(request)
        if secret is None:
            raise GatewayError(Code.INVALID_API_KEY, "Missing API key: send Authorization: Bearer.")
        found, version = await self.view.lookup_secret(secret, fresh=fresh)
        if found is None:
            raise GatewayError(Code.INVALID_API_KEY)
        key, digest = found
        status = secret_status(key, digest, datetime.now(UTC))
        if version != self.view.view.version:
            await self.view.load()  # at least as fresh as this handshake
        team = self.view.view.teams.get(key.team_id)
        if status is None and (team is None or not team.active):
            status = Code.TEAM_DISABLED
        if status is not None:
            if not fresh:  # a refusal is never made on a cached reading alone
                return await self._lookup_key(request, True)
            raise GatewayError(status)
        assert team is not None
        self.watch(key)
        principal = Principal(
            key_id=key.id, key_prefix=key.prefix, team_id=team.id, secret_hash=digest
        )
        return principal, key, team

    def watch(self, key: ApiKey) -> None:
        """A socket was accepted with `key`: keep its record, and its next clock boundary."""
        self.key_cache[key.id] = key
        boundary = next_boundary(key, datetime.now(UTC))
        if boundary is not None and (self._next_boundary is None or boundary < self._next_boundary):
            self._next_boundary = boundary

    async def sweep(
        self, changed: bool, sockets: Collection[LiveSocket]
    ) -> list[tuple[LiveSocket, Code]]:
        """The live sockets to expel, each with its code. `changed`: the store's version moved
        since the last tick (the keys are read again); otherwise the sockets are looked at only
        once a key's clock boundary has passed."""
        now = datetime.now(UTC)
        changed = changed or self._keys_unread
        if not changed and (self._next_boundary is None or now < self._next_boundary):
            return []  # nothing moved: with 10,000 sockets, 40,000 needless checks a second
        live = {s.principal.key_id for s in sockets}
        if changed and live:
            try:
                self.key_cache = await self.view.store.get_keys(live)
                self._keys_unread = False
            except GatewayError:
                # Redis away (a failover): live sockets keep serving on what they last saw, and
                # the keys are read again next tick; the version that moved is already seen, so
                # without this a revocation made then would never reach them.
                self._keys_unread = True
        teams, keys, checked_at = self.view.view.teams, self.key_cache, datetime.now(UTC)
        due: list[tuple[LiveSocket, Code]] = []
        for socket in list(sockets):
            principal = socket.principal
            team, key = teams.get(principal.team_id), keys.get(principal.key_id)
            code = standing(principal, team, key, checked_at)
            if code is not None:
                due.append((socket, code))
        boundaries = (next_boundary(self.key_cache[k], now) for k in live if k in self.key_cache)
        self._next_boundary = min((b for b in boundaries if b is not None), default=None)
        return due
