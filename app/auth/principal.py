"""Gateway keys' secrets and who they make a caller: pure functions, no I/O.

A secret is shown once; the store keeps only its SHA-256 (`hash_secret`). `secret_status` says
whether a secret stands now (revoked, expired, a rotated secret past its grace); `standing` says
whether a live socket's key and team still do, and `next_boundary` when that next changes by the
clock alone.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime

from app.errors import Code
from app.models import ApiKey, Team

SECRET_PREFIX = "sk-gw-"


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def new_secret() -> tuple[str, str]:
    """A new secret and its public prefix (shown in listings and logs)."""
    public = secrets.token_hex(4)
    return f"{SECRET_PREFIX}{public}_{secrets.token_urlsafe(32)}", f"{SECRET_PREFIX}{public}"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is on a socket: the key, which of its secrets, and its team at handshake time."""

    key_id: str
    key_prefix: str
    team_id: str
    secret_hash: str


def secret_status(key: ApiKey, secret_hash: str, now: datetime) -> Code | None:
    """None when the secret is usable now, else the refusal code (hashes compared in constant
    time)."""
    if key.revoked_at is not None:
        return Code.API_KEY_REVOKED
    if key.expires_at is not None and key.expires_at <= now:
        return Code.API_KEY_EXPIRED
    if hmac.compare_digest(secret_hash, key.secret_hash):
        return None
    for old in key.old_secrets:
        if hmac.compare_digest(old.hash, secret_hash):
            return None if old.until > now else Code.API_KEY_EXPIRED
    return Code.INVALID_API_KEY


def standing(
    principal: Principal, team: Team | None, key: ApiKey | None, now: datetime
) -> Code | None:
    """Why a live socket must be closed (its team disabled, its key revoked or expired), or
    None. `team` and `key` are the node's latest records; a key it holds no record of is left
    alone."""
    if team is not None and not team.active:
        return Code.TEAM_DISABLED
    if key is None:
        return None
    status = secret_status(key, principal.secret_hash, now)
    if status is Code.INVALID_API_KEY:
        return Code.API_KEY_EXPIRED  # its secret was rotated away and the grace is over
    return status


def next_boundary(key: ApiKey, now: datetime) -> datetime | None:
    """When `key`'s standing next changes by the clock alone: it expires, or a rotated
    secret's grace ends."""
    moments = [old.until for old in key.old_secrets if old.until > now]
    if key.expires_at is not None and key.expires_at > now:
        moments.append(key.expires_at)
    return min(moments, default=None)
