"""`gateway teams|keys|models|sessions` (CONTRACT.md §5.1): the admin API's operations from a shell.

They talk to Redis (`REDIS_URL`, `GATEWAY_REDIS_PREFIX`) directly and need no running node; a
write is recorded in the audit ledger (`DATABASE_URL`; while Postgres is away the row waits in
`GATEWAY_SPILL_DIR`, like a node's) with the actor `cli:<unix user>`. Output is a readable table
(or one `field value` block for a single object), or with `--json` the API's own JSON. An error
is one line on stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel, Field

from app.admin.ops import Actor, AdminOps
from app.admin.schemas import (
    DEFAULT_GRACE_SECONDS,
    KeyCreated,
    KeyCreateRequest,
    KeyInfo,
    KeyRotateRequest,
    ModelPrice,
    PriceRequest,
    TeamRequest,
    model_name,
    parse_obj,
)
from app.config import DatabaseSettings, RedisSettings, load
from app.errors import Code, GatewayError
from app.keystore import KeyStore
from app.ledger import AdminAction, Ledger, LedgerError
from app.ledger.sums import SpendSums
from app.models import ApiKey, Limits, Price, Team
from app.spend import SpendBook

ADMIN_COMMANDS = frozenset({"teams", "keys", "models", "sessions"})
# How long a write waits for Postgres before its audit row is left in the spill dir.
LEDGER_DEADLINE = 5.0


class AdminCliSettings(RedisSettings, DatabaseSettings):
    """What the admin commands read: Redis, Postgres and the spill dir, nothing else."""

    spill_dir: Path = Field(default=Path("./var/spill"), alias="GATEWAY_SPILL_DIR")


@dataclass(frozen=True)
class Output:
    """What a command prints: `data` as JSON with `--json`, else `text`."""

    data: Any
    text: str


Command = Callable[[AdminOps, argparse.Namespace], Awaitable[Output]]


# -- rendering ----------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    if not rows:
        return "(none)"
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = [headers, *rows]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def fields(pairs: Sequence[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in pairs)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in pairs)


def _time(value: datetime | None) -> str:
    """Tables show seconds; `--json` keeps full precision."""
    if value is None:
        return "-"
    return value.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _limits(limits: Limits) -> str:
    set_ = [f"{k}={v}" for k, v in limits.model_dump().items() if v]
    return " ".join(set_) or "unlimited"


def _dump(value: BaseModel) -> Any:
    return value.model_dump(mode="json")


def _listing(data: Sequence[Any]) -> dict[str, Any]:
    return {"object": "list", "data": list(data)}


TEAM_HEADERS = ("ID", "NAME", "ACTIVE", "MODELS", "CREDENTIAL", "LIMITS")


def _team_row(team: Team) -> list[str]:
    return [
        team.id,
        team.name,
        "yes" if team.active else "no",
        ",".join(team.allowed_models) or "-",
        team.upstream_credential,
        _limits(team.limits),
    ]


def team_output(team: Team, note: str = "") -> Output:
    row = _team_row(team)
    pairs = list(zip(("id", "name", "active", "models", "credential", "limits"), row, strict=True))
    return Output(_dump(team), (note + "\n" if note else "") + fields(pairs))


KEY_HEADERS = ("ID", "PREFIX", "TEAM", "NAME", "STATUS", "CREATED", "EXPIRES", "GRACE UNTIL")


def _key_row(info: KeyInfo) -> list[str]:
    return [
        info.id,
        info.prefix,
        info.team_id,
        info.name or "-",
        info.status,
        _time(info.created_at),
        _time(info.expires_at),
        _time(info.grace_until),
    ]


def key_output(key: ApiKey) -> Output:
    info = KeyInfo.of(key)
    pairs = list(zip([h.lower() for h in KEY_HEADERS], _key_row(info), strict=True))
    return Output(_dump(info), fields(pairs))


def secret_output(key: ApiKey, secret: str, note: str) -> Output:
    created = KeyCreated.of(key, secret)
    pairs = [
        ("id", key.id),
        ("team", key.team_id),
        ("name", key.name or "-"),
        ("prefix", key.prefix),
        ("expires", _time(key.expires_at)),
        ("key", secret),
    ]
    text = f"{note}\n{fields(pairs)}\nThe key is shown only now: store it safely."
    return Output(_dump(created), text)


def _money(value: Decimal) -> str:
    return format(value.normalize(), "f")


PRICE_HEADERS = ("MODEL", "INPUT $/MTOK", "CACHED INPUT $/MTOK", "OUTPUT $/MTOK")


def _price_row(name: str, price: Price) -> list[str]:
    return [
        name,
        _money(price.input_per_mtok),
        _money(price.cached),
        _money(price.output_per_mtok),
    ]


SESSION_HEADERS = ("ID", "NODE", "KEY PREFIX", "TEAM", "MODEL", "OPENED", "TURNS")


def _session_row(s: dict[str, Any]) -> list[str]:
    return [
        str(s.get("id", "")),
        str(s.get("node", "")),
        str(s.get("key_prefix", "")),
        str(s.get("team_id", "")),
        str(s.get("model") or "-"),
        _opened(s.get("opened_at")),
        str(s.get("turns", 0)),
    ]


def _opened(value: Any) -> str:
    try:
        return _time(datetime.fromisoformat(str(value)))
    except ValueError:
        return str(value or "-")


# -- argument helpers ---------------------------------------------------------------------------


def _split_models(values: Sequence[str]) -> list[str]:
    return [p.strip() for v in values for p in v.split(",") if p.strip()]


def parse_limits(values: Sequence[str]) -> dict[str, int | float]:
    """`NAME=N` pairs: whole numbers, and USD amounts (`usd_…`) with decimals."""
    limits: dict[str, int | float] = {}
    for item in values:
        name, sep, number = item.partition("=")
        name = name.strip()
        try:
            if not sep or not name:
                raise ValueError
            limits[name] = float(number) if name.startswith("usd_") else int(number)
        except ValueError:
            raise GatewayError(
                Code.INVALID_REQUEST,
                f"--limit: expected NAME=N, got {item!r}.",
                param=f"limits.{name}" if name else "limits",
            ) from None
    return limits


def catalog_name(value: str) -> str:
    provider, sep, model = value.partition("/")
    if not sep:
        raise GatewayError(
            Code.INVALID_REQUEST, f"Expected openai/<model>, got {value!r}.", param="model"
        )
    return model_name(provider, model)


# -- commands -----------------------------------------------------------------------------------


async def teams_create(ops: AdminOps, args: argparse.Namespace) -> Output:
    body: dict[str, Any] = {"id": args.id, "allowed_models": _split_models(args.models)}
    if args.name is not None:
        body["name"] = args.name
    if args.credential is not None:
        body["upstream_credential"] = args.credential
    if args.limit:
        body["limits"] = parse_limits(args.limit)
    team, created = await ops.put_team(parse_obj(TeamRequest, body))
    return team_output(team, f"team {team.id} {'created' if created else 'replaced'}")


async def teams_list(ops: AdminOps, args: argparse.Namespace) -> Output:
    teams = await ops.list_teams()
    return Output(
        _listing([_dump(t) for t in teams]), table(TEAM_HEADERS, [_team_row(t) for t in teams])
    )


async def teams_get(ops: AdminOps, args: argparse.Namespace) -> Output:
    return team_output(await ops.get_team(args.id))


SPEND_HEADERS = ("WHO", "PERIOD", "USD", "LIMIT", "ENDS")


async def teams_spend(ops: AdminOps, args: argparse.Namespace) -> Output:
    book = SpendBook(ops.store, SpendSums(args.database_url, timeout=LEDGER_DEADLINE))
    try:
        data = await ops.team_spend(args.id, book)
    finally:
        await book.close()

    def row(who: str, name: str, period: dict[str, Any]) -> list[str]:
        limit = period["limit"]
        return [
            who,
            f"{name} from {period['start']}",
            f"{period['usd']:.6f}",
            "-" if limit is None else f"{limit:.6f}",
            period["end"],
        ]

    rows = [row(f"team {args.id}", "day", data["day"]), row("", "month", data["month"])]
    rows += [row(f"key {k['prefix']} ({k['id']})", "day", k["day"]) for k in data["keys"]]
    return Output(data, table(SPEND_HEADERS, rows))


async def teams_disable(ops: AdminOps, args: argparse.Namespace) -> Output:
    return team_output(await ops.set_team_active(args.id, False), f"team {args.id} disabled")


async def teams_enable(ops: AdminOps, args: argparse.Namespace) -> Output:
    return team_output(await ops.set_team_active(args.id, True), f"team {args.id} enabled")


async def keys_create(ops: AdminOps, args: argparse.Namespace) -> Output:
    body: dict[str, Any] = {"team_id": args.team, "name": args.name}
    if args.expires_at is not None:
        body["expires_at"] = args.expires_at
    key, secret = await ops.create_key(parse_obj(KeyCreateRequest, body))
    return secret_output(key, secret, f"key {key.id} created")


async def keys_list(ops: AdminOps, args: argparse.Namespace) -> Output:
    infos = [KeyInfo.of(k) for k in await ops.list_keys(args.team)]
    return Output(
        _listing([_dump(i) for i in infos]), table(KEY_HEADERS, [_key_row(i) for i in infos])
    )


async def keys_get(ops: AdminOps, args: argparse.Namespace) -> Output:
    return key_output(await ops.get_key(args.id))


async def keys_rotate(ops: AdminOps, args: argparse.Namespace) -> Output:
    grace = parse_obj(KeyRotateRequest, {"grace_seconds": args.grace_seconds}).grace_seconds
    key, secret = await ops.rotate_key(args.id, grace)
    return secret_output(
        key, secret, f"key {key.id} rotated: the old secret works for {grace} more seconds"
    )


async def keys_revoke(ops: AdminOps, args: argparse.Namespace) -> Output:
    key = await ops.revoke_key(args.id)
    out = key_output(key)
    return Output(out.data, f"key {key.id} revoked\n{out.text}")


async def models_set(ops: AdminOps, args: argparse.Namespace) -> Output:
    name = catalog_name(args.model)
    body: dict[str, Any] = {"input_per_mtok": args.input, "output_per_mtok": args.output}
    if args.cached_input is not None:
        body["cached_input_per_mtok"] = args.cached_input
    price = await ops.set_price(name, parse_obj(PriceRequest, body))
    text = f"price of {name} set\n" + table(PRICE_HEADERS, [_price_row(name, price)])
    return Output(_dump(ModelPrice.of(name, price)), text)


async def models_delete(ops: AdminOps, args: argparse.Namespace) -> Output:
    name = catalog_name(args.model)
    await ops.delete_price(name)
    return Output({"id": name, "object": "model", "deleted": True}, f"price of {name} removed")


async def models_list(ops: AdminOps, args: argparse.Namespace) -> Output:
    catalog = await ops.catalog()
    data = _listing([_dump(ModelPrice.of(n, p)) for n, p in catalog.items()])
    return Output(data, table(PRICE_HEADERS, [_price_row(n, p) for n, p in catalog.items()]))


async def sessions_list(ops: AdminOps, args: argparse.Namespace) -> Output:
    found = await ops.sessions()
    return Output(_listing(found), table(SESSION_HEADERS, [_session_row(s) for s in found]))


# -- the parser ---------------------------------------------------------------------------------


def _leaf(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    help_: str,
    command: Command,
) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help_, description=help_)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(admin=command)
    return parser


def add_admin_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `teams`, `keys`, `models` and `sessions` to the `gateway` parser's subcommands."""
    teams = sub.add_parser("teams", help="create, list, read, disable and enable teams")
    t = teams.add_subparsers(dest="admin_command", required=True, metavar="ACTION")
    p = _leaf(t, "create", "create or replace a team", teams_create)
    p.add_argument("id")
    p.add_argument(
        "--models",
        action="append",
        required=True,
        metavar="P[,P…]",
        help="allowed model patterns, e.g. 'openai/gpt-5*' (repeatable)",
    )
    p.add_argument("--name")
    p.add_argument("--credential", metavar="VAR", help="env var holding the upstream key")
    p.add_argument(
        "--limit",
        action="append",
        default=[],
        metavar="NAME=N",
        help="a limit, e.g. sockets_per_key=5 or usd_per_day_per_team=20.5 (repeatable)",
    )
    _leaf(t, "list", "list teams", teams_list)
    _leaf(t, "get", "show a team", teams_get).add_argument("id")
    _leaf(t, "spend", "a team's spend today and this month (UTC)", teams_spend).add_argument("id")
    p = _leaf(t, "disable", "disable a team (closes its sockets)", teams_disable)
    p.add_argument("id")
    _leaf(t, "enable", "enable a team", teams_enable).add_argument("id")

    keys = sub.add_parser("keys", help="create, list, rotate and revoke keys")
    k = keys.add_subparsers(dest="admin_command", required=True, metavar="ACTION")
    p = _leaf(k, "create", "create a key (its secret is printed once)", keys_create)
    p.add_argument("--team", required=True, metavar="ID")
    p.add_argument("--name", default="")
    p.add_argument("--expires-at", metavar="RFC3339", help="e.g. 2027-01-01T00:00:00Z")
    _leaf(k, "list", "list keys", keys_list).add_argument("--team", metavar="ID")
    _leaf(k, "get", "show a key", keys_get).add_argument("id")
    p = _leaf(k, "rotate", "new secret, same id; the old one lasts N s", keys_rotate)
    p.add_argument("id")
    p.add_argument("--grace-seconds", type=int, default=DEFAULT_GRACE_SECONDS, metavar="N")
    p = _leaf(k, "revoke", "revoke a key (closes its sockets)", keys_revoke)
    p.add_argument("id")

    models = sub.add_parser("models", help="set, list and remove model prices")
    m = models.add_subparsers(dest="admin_command", required=True, metavar="ACTION")
    p = _leaf(m, "set", "set a price in USD per million tokens", models_set)
    p.add_argument("model", metavar="openai/MODEL")
    p.add_argument("--input", required=True, metavar="X")
    p.add_argument("--cached-input", metavar="Y", help="defaults to --input")
    p.add_argument("--output", required=True, metavar="Z")
    _leaf(m, "list", "the model catalog", models_list)
    p = _leaf(m, "delete", "remove a price", models_delete)
    p.add_argument("model", metavar="openai/MODEL")

    _leaf(sub, "sessions", "live sockets across every node", sessions_list)


# -- running ------------------------------------------------------------------------------------


def cli_actor() -> Actor:
    try:
        user = getpass.getuser()
    except (OSError, KeyError):
        user = str(os.getuid())
    return Actor(name=f"cli:{user}", remote_addr=None)


async def record_rows(rows: list[AdminAction], settings: AdminCliSettings) -> None:
    """Write a command's audit rows; while Postgres is away they wait in the spill dir."""
    ledger = Ledger(settings.database_url, settings.spill_dir, retention=None, partitions=False)
    quiet = logging.getLogger("app.ledger")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its "rows wait in memory" would mislead: this process ends
    try:
        await ledger.start()
        for row in rows:
            ledger.record(row)
        await ledger.close(deadline=LEDGER_DEADLINE)
    finally:
        quiet.setLevel(level)
    if ledger.pending_rows:
        print(
            "gateway: warning: Postgres did not answer; the audit rows wait in "
            f"{settings.spill_dir} for the next gateway process that starts with it",
            file=sys.stderr,
        )


async def execute(args: argparse.Namespace, settings: AdminCliSettings) -> Output:
    """Run one parsed admin command against Redis, then record what it wrote.

    Rows are collected first and written after the command, so a read or a refused write never
    waits on Postgres.
    """
    rows: list[AdminAction] = []
    store = KeyStore.from_settings(settings, pool_size=2)
    try:
        command: Command = args.admin
        args.database_url = settings.database_url  # `teams spend` rebuilds from the ledger
        out = await command(AdminOps(store, rows.append, cli_actor()), args)
    finally:
        await store.close()
        if rows:
            await record_rows(rows, settings)
    return out


def run_admin_command(args: argparse.Namespace) -> int | None:
    """None when `args.command` is not an admin command; else run it and return the exit code."""
    if args.command not in ADMIN_COMMANDS:
        return None
    settings = load(AdminCliSettings)
    try:
        out = asyncio.run(execute(args, settings))
    except GatewayError as err:
        where = f" ({err.param})" if err.param and err.param not in err.message else ""
        print(f"gateway: {err.code}: {err.message}{where}", file=sys.stderr)
        return 1
    except LedgerError as err:
        print(f"gateway: done, but the audit row could not be kept: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"gateway: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    if args.json:
        sys.stdout.write(orjson.dumps(out.data, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(out.text)
    sys.stdout.flush()
    return 0
