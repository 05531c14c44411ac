"""The expulsion sweep's decision (app/auth/principal.py `standing`, `next_boundary`), without
sockets: which live socket must close, with which code, and when that can next change by the
clock alone. tests/test_admin_live.py checks the same over real sockets and two nodes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from app.auth.principal import Principal, hash_secret, next_boundary, standing
from app.errors import Code
from app.models import ApiKey, OldSecret, Team

NOW = datetime(2026, 1, 1, tzinfo=UTC)
ACTIVE, DISABLED = Team(id="t"), Team(id="t", active=False)


def key(**changes: object) -> ApiKey:
    fields: dict[str, object] = {
        "id": "key_1",
        "team_id": "t",
        "prefix": "sk-gw-1",
        "created_at": NOW - timedelta(days=1),
        "secret_hash": hash_secret("current"),
        "old_secrets": [OldSecret(hash=hash_secret("graced"), until=NOW + timedelta(seconds=5))],
    }
    return ApiKey.model_validate({**fields, **changes})


def on(secret: str) -> Principal:
    return Principal(
        key_id="key_1", key_prefix="sk-gw-1", team_id="t", secret_hash=hash_secret(secret)
    )


@pytest.mark.parametrize(
    ("secret", "team", "record", "expected"),
    [
        ("current", ACTIVE, key(), None),
        ("graced", ACTIVE, key(), None),
        ("current", None, key(), None),  # a team the view does not hold yet is no refusal
        ("current", ACTIVE, None, None),  # nor a key it holds no record of
        ("current", DISABLED, key(), Code.TEAM_DISABLED),
        ("current", DISABLED, key(revoked_at=NOW), Code.TEAM_DISABLED),  # the team first
        ("current", ACTIVE, key(revoked_at=NOW), Code.API_KEY_REVOKED),
        ("current", ACTIVE, key(expires_at=NOW), Code.API_KEY_EXPIRED),
        ("graced", ACTIVE, key(old_secrets=[]), Code.API_KEY_EXPIRED),  # rotated away
        (
            "graced",
            ACTIVE,
            key(old_secrets=[OldSecret(hash=hash_secret("graced"), until=NOW)]),
            Code.API_KEY_EXPIRED,
        ),
    ],
)
def test_standing(secret: str, team: Team | None, record: ApiKey | None, expected: Code) -> None:
    assert standing(on(secret), team, record, NOW) is expected


def test_next_boundary_is_the_nearest_clock_change() -> None:
    assert next_boundary(key(), NOW) == NOW + timedelta(seconds=5)
    assert next_boundary(key(expires_at=NOW + timedelta(seconds=2)), NOW) == NOW + timedelta(
        seconds=2
    )
    assert next_boundary(key(old_secrets=[]), NOW) is None
    assert next_boundary(key(), NOW + timedelta(seconds=5)) is None  # the grace is over
