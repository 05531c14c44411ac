"""The admin operations, shared by the HTTP API and the shell.

Each takes validated input (`schemas.py`), reads or writes through the key store (which turns an
unreachable Redis into `service_unavailable`), answers `not_found` for an unknown id, and records
every successful write as one `AdminAction` row: who (the actor, and the remote address for the
API), what (`team.create`, `key.rotate`, …), on which id, and details that never hold a secret.

Writes that read a record first (team replace, disable, enable; key rotate, revoke) hand the
key store a change to apply to the record as stored: it runs inside the store's transaction, and
again when another write got in between, so no write is lost (`KeyStore.update_team`).

Live effects need nothing here: every write bumps the store's version, and each node's view
polls it (CONTRACT.md §4: within a second, live sockets included).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from app.admin.schemas import (
    KeyCreateRequest,
    PriceRequest,
    TeamRequest,
    to_price,
)
from app.errors import Code, GatewayError, not_found
from app.keystore import KeyStore
from app.ledger.rows import AdminAction
from app.models import ApiKey, Price, Team, utcnow
from app.spend import SpendBook

Record = Callable[[AdminAction], None]


@dataclass(frozen=True, slots=True)
class Actor:
    """Who performs an admin write: `X-Admin-Actor` (else `admin-token`), or `cli:<user>`."""

    name: str
    remote_addr: str | None = None


class AdminOps:
    def __init__(self, store: KeyStore, record: Record, actor: Actor) -> None:
        self.store = store
        self._record = record
        self.actor = actor

    def _audit(self, action: str, target: str, **details: Any) -> None:
        self._record(
            AdminAction(
                actor=self.actor.name,
                remote_addr=self.actor.remote_addr,
                action=action,
                target=target,
                at=utcnow(),
                details=details,
            )
        )

    # -- teams ------------------------------------------------------------------------------------

    async def put_team(self, body: TeamRequest) -> tuple[Team, bool]:
        """Create or replace; True when created. A replace without `active` keeps the state."""
        team, before = await self.store.update_team(body.id, body.to_team)
        created = before is None
        self._audit(
            "team.create" if created else "team.replace",
            team.id,
            **team.model_dump(mode="json", exclude={"id"}),
        )
        return team, created

    async def get_team(self, team_id: str, param: str | None = None) -> Team:
        team = await self.store.get_team(team_id)
        if team is None:
            raise not_found("team", team_id, param)
        return team

    async def team_spend(self, team_id: str, book: SpendBook) -> dict[str, Any]:
        """Where a team stands (CONTRACT.md §5): the counters check 8 reads."""
        team = await self.get_team(team_id)
        keys = await self.store.list_keys(team_id)
        try:
            return await book.report(team, keys)
        except GatewayError:
            raise
        except Exception as exc:  # a counter to rebuild, and the ledger does not answer
            raise GatewayError(
                Code.SERVICE_UNAVAILABLE,
                "The team's spend counters are not in Redis and the ledger (Postgres) did not "
                f"answer to rebuild them ({type(exc).__name__}); retry.",
            ) from exc

    async def list_teams(self) -> list[Team]:
        return await self.store.list_teams()

    async def set_team_active(self, team_id: str, active: bool) -> Team:
        def change(team: Team | None) -> Team:
            if team is None:
                raise not_found("team", team_id)
            return team.model_copy(update={"active": active})

        updated, _before = await self.store.update_team(team_id, change)
        self._audit("team.enable" if active else "team.disable", team_id)
        return updated

    # -- keys -------------------------------------------------------------------------------------

    async def create_key(self, body: KeyCreateRequest) -> tuple[ApiKey, str]:
        body.check_expiry()
        key, secret = await self.store.create_key(body.team_id, body.name, body.expires_at)
        self._audit(
            "key.create",
            key.id,
            team_id=key.team_id,
            name=key.name,
            prefix=key.prefix,
            expires_at=key.expires_at.isoformat() if key.expires_at else None,
        )
        return key, secret

    async def get_key(self, key_id: str) -> ApiKey:
        key = await self.store.get_key(key_id)
        if key is None:
            raise not_found("key", key_id)
        return key

    async def list_keys(self, team_id: str | None = None) -> list[ApiKey]:
        if team_id is not None:
            await self.get_team(team_id, param="team_id")
        keys = await self.store.list_keys(team_id)
        return sorted(keys, key=lambda k: (k.created_at, k.id))

    async def rotate_key(self, key_id: str, grace_seconds: int) -> tuple[ApiKey, str]:
        rotated, before, secret = await self.store.rotate_key(key_id, grace_seconds)
        self._audit(
            "key.rotate",
            key_id,
            team_id=rotated.team_id,
            grace_seconds=grace_seconds,
            old_prefix=before.prefix,
            prefix=rotated.prefix,
        )
        return rotated, secret

    async def revoke_key(self, key_id: str) -> ApiKey:
        revoked = await self.store.revoke_key(key_id)
        self._audit("key.revoke", key_id, team_id=revoked.team_id, prefix=revoked.prefix)
        return revoked

    # -- the model catalog ------------------------------------------------------------------------

    async def catalog(self) -> dict[str, Price]:
        return dict(sorted((await self.store.catalog()).items()))

    async def get_price(self, name: str) -> Price:
        price = (await self.store.catalog()).get(name)
        if price is None:
            raise not_found("model", name)
        return price

    async def set_price(self, name: str, body: PriceRequest) -> Price:
        price = to_price(body)
        await self.store.set_price(name, price)
        self._audit(
            "model.set",
            name,
            input_per_mtok=str(price.input_per_mtok),
            cached_input_per_mtok=str(price.cached),
            output_per_mtok=str(price.output_per_mtok),
        )
        return price

    async def delete_price(self, name: str) -> None:
        if not await self.store.delete_price(name):
            raise not_found("model", name)
        self._audit("model.delete", name)

    # -- sessions ---------------------------------------------------------------------------------

    async def sessions(self) -> list[dict[str, Any]]:
        found = await self.store.list_sessions()
        return sorted(found, key=lambda s: (str(s.get("opened_at", "")), str(s.get("id", ""))))
