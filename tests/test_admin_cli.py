"""`gateway teams|keys|models|sessions` (CONTRACT.md §5.1): run in-process through `app.cli.main`
(and once as a real subprocess) against a fresh Redis prefix and the test Postgres; no node."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from services import run_blocking

from app.admin.cli import cli_actor
from app.auth.principal import hash_secret
from app.cli import main
from app.keystore import KeyStore

Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def env(redis_url: str, redis_prefix: str, database_url: str, tmp_path: Path) -> dict[str, str]:
    return {
        "REDIS_URL": redis_url,
        "GATEWAY_REDIS_PREFIX": redis_prefix,
        "DATABASE_URL": database_url,
        "GATEWAY_SPILL_DIR": str(tmp_path / "spill"),
    }


@pytest.fixture
def gw(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Run:
    """`gw("teams", "list")`: exit code, stdout, stderr."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return run


def ok(run: Run, *argv: str) -> str:
    code, out, err = run(*argv)
    assert code == 0, err
    return out


def js(run: Run, *argv: str) -> Any:
    return orjson.loads(ok(run, *argv, "--json"))


def fail(run: Run, *argv: str) -> str:
    code, out, err = run(*argv)
    assert code == 1, (out, err)
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("gateway: "), err
    assert "Traceback" not in err
    return err


def lines(text: str) -> list[list[str]]:
    return [line.split() for line in text.strip().splitlines()]


def test_first_team_key_price_and_rotation(gw: Run) -> None:
    out = ok(
        gw,
        "teams",
        "create",
        "acme",
        "--models",
        "openai/gpt-5*,openai/o4-mini",
        "--name",
        "Acme",
        "--limit",
        "sockets_per_key=2",
        "--limit",
        "responses_per_minute_per_key=60",
    )
    assert "team acme created" in out
    table = lines(ok(gw, "teams", "list"))
    assert table[0] == ["ID", "NAME", "ACTIVE", "MODELS", "CREDENTIAL", "LIMITS"]
    assert table[1][:5] == ["acme", "Acme", "yes", "openai/gpt-5*,openai/o4-mini", "OPENAI_API_KEY"]
    team = js(gw, "teams", "get", "acme")
    assert team["limits"] == {
        "sockets_per_key": 2,
        "sockets_per_team": 0,
        "responses_per_minute_per_key": 60,
        "tokens_per_minute_per_key": 0,
        "usd_per_day_per_key": 0.0,
        "usd_per_day_per_team": 0.0,
        "usd_per_month_per_team": 0.0,
    }
    assert "team acme replaced" in ok(gw, "teams", "create", "acme", "--models", "openai/*")

    created = js(gw, "keys", "create", "--team", "acme", "--name", "laptop")
    assert set(created) == {"id", "key", "prefix", "team_id", "name", "created_at", "expires_at"}
    text = ok(gw, "keys", "create", "--team", "acme")
    secret = next(parts[1] for parts in lines(text) if parts[0] == "key" and len(parts) == 2)
    assert secret.startswith("sk-gw-") and "shown only now" in text

    keys = lines(ok(gw, "keys", "list", "--team", "acme"))
    assert keys[0][:5] == ["ID", "PREFIX", "TEAM", "NAME", "STATUS"]
    assert len(keys) == 3
    listing = js(gw, "keys", "list")
    assert listing["object"] == "list" and len(listing["data"]) == 2
    assert created["key"] not in orjson.dumps(listing).decode()

    rotated = js(gw, "keys", "rotate", created["id"], "--grace-seconds", "60")
    assert rotated["id"] == created["id"] and rotated["key"] != created["key"]
    info = js(gw, "keys", "get", created["id"])
    assert info["prefix"] == rotated["prefix"] and info["grace_until"] is not None
    revoked = js(gw, "keys", "revoke", created["id"])
    assert revoked["status"] == "revoked"

    out = ok(gw, "models", "set", "openai/gpt-5", "--input", "1.25", "--output", "10")
    assert "price of openai/gpt-5 set" in out
    ok(gw, "models", "set", "openai/o4-mini", "--input", "1.1", "--cached-input", "0.275",
       "--output", "4.4")  # fmt: skip
    table = lines(ok(gw, "models", "list"))
    assert table[1] == ["openai/gpt-5", "1.25", "1.25", "10"]
    assert table[2] == ["openai/o4-mini", "1.1", "0.275", "4.4"]
    catalog = js(gw, "models", "list")
    assert [m["id"] for m in catalog["data"]] == ["openai/gpt-5", "openai/o4-mini"]
    assert "removed" in ok(gw, "models", "delete", "openai/gpt-5")

    assert "team acme disabled" in ok(gw, "teams", "disable", "acme")
    assert js(gw, "teams", "get", "acme")["active"] is False
    assert js(gw, "teams", "enable", "acme")["active"] is True
    assert ok(gw, "sessions").strip() == "(none)"
    assert js(gw, "sessions") == {"object": "list", "data": []}


def test_cli_writes_reach_redis_and_the_ledger(
    gw: Run, env: dict[str, str], database_url: str
) -> None:
    ok(gw, "teams", "create", "audited", "--models", "openai/*")
    created = js(gw, "keys", "create", "--team", "audited")
    ok(gw, "keys", "revoke", created["id"])

    async def check() -> list[asyncpg.Record]:
        store = KeyStore(env["REDIS_URL"], env["GATEWAY_REDIS_PREFIX"])
        try:
            key = await store.get_key(created["id"])
            assert key is not None and key.secret_hash == hash_secret(created["key"])
            assert key.revoked_at is not None
        finally:
            await store.close()
        conn = await asyncpg.connect(database_url)
        try:
            return list(
                await conn.fetch(
                    "SELECT actor, remote_addr, action, target FROM admin_actions"
                    " WHERE target IN ($1, $2) ORDER BY at",
                    "audited",
                    created["id"],
                )
            )
        finally:
            await conn.close()

    rows = asyncio.run(check())
    assert [(r["action"], r["target"]) for r in rows] == [
        ("team.create", "audited"),
        ("key.create", created["id"]),
        ("key.revoke", created["id"]),
    ]
    assert {r["actor"] for r in rows} == {cli_actor().name}
    assert cli_actor().name.startswith("cli:")
    assert {r["remote_addr"] for r in rows} == {None}


def test_cli_errors_are_one_line(gw: Run) -> None:
    assert "not_found" in fail(gw, "keys", "create", "--team", "ghost")
    assert "not_found" in fail(gw, "teams", "get", "ghost")
    assert "not_found" in fail(gw, "keys", "rotate", "key_ghost")
    assert "not_found" in fail(gw, "keys", "list", "--team", "ghost")
    assert "not_found" in fail(gw, "models", "delete", "openai/ghost")
    err = fail(gw, "teams", "create", "a", "--models", "x", "--limit", "sockets=1")
    assert "limits.sockets" in err
    assert "--limit" in fail(gw, "teams", "create", "a", "--models", "x", "--limit", "nope")
    assert "provider" in fail(gw, "models", "set", "anthropic/c", "--input", "1", "--output", "1")
    assert "input_per_mtok" in fail(
        gw, "models", "set", "openai/m", "--input", "x", "--output", "1"
    )
    assert "grace_seconds" in fail(gw, "keys", "rotate", "key_x", "--grace-seconds", "-1")
    past = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    ok(gw, "teams", "create", "a", "--models", "x")
    assert "expires_at" in fail(gw, "keys", "create", "--team", "a", "--expires-at", past)


def test_cli_with_redis_away_is_one_line(gw: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    assert "service_unavailable" in fail(gw, "teams", "list")


def test_cli_as_a_subprocess(env: dict[str, str]) -> None:
    full = {**os.environ, **env}
    argv = [sys.executable, "-m", "app", "teams", "create", "sub", "--models", "openai/*", "--json"]
    done = subprocess.run(argv, env=full, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout)["id"] == "sub"
    argv = [sys.executable, "-m", "app", "teams", "get", "nope"]
    done = subprocess.run(argv, env=full, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert done.stderr.startswith("gateway: not_found") and "Traceback" not in done.stderr


def test_cli_write_with_postgres_away_is_recorded_later(
    gw: Run, monkeypatch: pytest.MonkeyPatch, database_url: str
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://postgres@127.0.0.1:1/gateway")
    code, out, err = gw("teams", "create", "offline", "--models", "openai/*")
    assert code == 0 and "team offline created" in out
    assert "audit rows wait in" in err and err.count("\n") == 1
    # The next gateway process with the same spill dir and a reachable Postgres writes it.
    monkeypatch.setenv("DATABASE_URL", database_url)
    ok(gw, "teams", "disable", "offline")

    async def actions() -> list[str]:
        conn = await asyncpg.connect(database_url)
        try:
            rows = await conn.fetch(
                "SELECT action FROM admin_actions WHERE target = 'offline' ORDER BY at"
            )
        finally:
            await conn.close()
        return [r["action"] for r in rows]

    assert asyncio.run(actions()) == ["team.create", "team.disable"]


def test_teams_spend_rebuilds_from_the_ledger_and_prints_it(gw: Run, database_url: str) -> None:
    """`gateway teams spend`: no counter in Redis yet, so the figures come from the ledger (two
    turns today, one earlier this month unless today is the 1st, one of another team)."""
    import secrets
    from datetime import UTC, datetime, timedelta

    import asyncpg

    team = f"spend-{secrets.token_hex(3)}"
    ok(gw, "teams", "create", team, "--models", "openai/*", "--limit", "usd_per_day_per_team=2.5")
    key = js(gw, "keys", "create", "--team", team)
    now = datetime.now(UTC)
    earlier = now.replace(day=1, hour=0, minute=0, second=1) if now.day > 1 else now
    rows = [
        (key["id"], team, now - timedelta(seconds=5), "0.0012345"),
        (key["id"], team, now - timedelta(seconds=3), "1.0000004"),
        (key["id"], team, earlier, "0.25"),
        ("key_other", "someone-else", now, "9"),
    ]

    async def insert() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            await conn.executemany(
                "INSERT INTO turns (row_id, node, key_id, key_prefix, team_id, transport, model,"
                " received_at, accepted, status, cost_usd)"
                " VALUES (gen_random_uuid(), 'cli-test', $1, 'sk-gw-x', $2, 'ws',"
                " 'openai/gpt-5', $3, true, 'completed', $4::numeric)",
                rows,
            )
        finally:
            await conn.close()

    run_blocking(insert())
    today = 0.0012345 + 1.0000004 + (0.25 if now.day == 1 else 0)
    month = 0.0012345 + 1.0000004 + 0.25
    data = js(gw, "teams", "spend", team)
    assert data["object"] == "team.spend" and data["team_id"] == team
    assert data["day"]["usd"] == round(today, 6)
    assert data["month"]["usd"] == round(month, 6)
    assert (data["day"]["limit"], data["month"]["limit"]) == (2.5, None)
    assert [(k["id"], k["day"]["usd"]) for k in data["keys"]] == [(key["id"], round(today, 6))]
    table = lines(ok(gw, "teams", "spend", team))
    assert table[0] == ["WHO", "PERIOD", "USD", "LIMIT", "ENDS"]
    assert table[1][:2] == ["team", team] and table[1][-3:-1] == [
        f"{round(today, 6):.6f}",
        "2.500000",
    ]
    assert table[2][-3:-1] == [f"{round(month, 6):.6f}", "-"]
    assert "not_found" in fail(gw, "teams", "spend", "nobody")
