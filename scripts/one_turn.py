"""Two chained turns through the gateway with openai-python's own WebSocket client.

.venv/bin/python scripts/one_turn.py --base-url http://127.0.0.1:8080/v1 --key sk-gw-…
"""

from __future__ import annotations

import argparse
import asyncio

from openai import AsyncOpenAI


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    parser.add_argument("--key", required=True)
    parser.add_argument("--model", default="openai/gpt-5-mini")
    args = parser.parse_args()
    client = AsyncOpenAI(base_url=args.base_url, api_key=args.key)
    previous = None
    async with client.responses.connect() as conn:
        for text in ("Hello, gateway!", "And a second, chained turn."):
            await conn.response.create(
                model=args.model,
                input=[{"role": "user", "content": text}],
                previous_response_id=previous,
                store=False,
            )
            async for event in conn:
                if event.type == "response.output_text.delta":
                    print(event.delta, end="", flush=True)
                elif event.type == "response.completed":
                    usage = event.response.usage
                    previous = event.response.id
                    print(f"\n[{event.response.id}: {event.response.status}, usage {usage}]")
                    break
                elif event.type == "error":
                    print(f"\n[error {event.status}: {event.error.code}: {event.error.message}]")
                    return


if __name__ == "__main__":
    asyncio.run(main())
