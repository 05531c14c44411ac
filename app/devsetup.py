"""`python -m app.devsetup`: the dev team, price and key that `make run` prints.

Idempotent for the team and price; a new key each run (a key is shown only once).
"""

from __future__ import annotations

import asyncio
import sys
from decimal import Decimal

from app.config import RedisSettings, load
from app.keystore import KeyStore
from app.models import Price, Team

DEV_TEAM = "dev"
DEV_MODEL = "openai/gpt-5-mini"


async def bootstrap() -> str:
    settings = load(RedisSettings)
    store = KeyStore.from_settings(settings)
    try:
        await store.put_team(
            Team(id=DEV_TEAM, name="Local development", allowed_models=["openai/*"])
        )
        for model, (inp, out) in {
            DEV_MODEL: ("0.25", "2.00"),
            "openai/gpt-5": ("1.25", "10.00"),
            "openai/gpt-5.1-codex": ("1.25", "10.00"),
        }.items():
            await store.set_price(
                model, Price(input_per_mtok=Decimal(inp), output_per_mtok=Decimal(out))
            )
        _key, secret = await store.create_key(DEV_TEAM, name="make run")
        return secret
    finally:
        await store.close()


def main() -> int:
    print(asyncio.run(bootstrap()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
