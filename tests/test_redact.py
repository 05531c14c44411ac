"""The upstream key never reaches the customer: OpenAI's 401 for a wrong key quotes it
masked but for its first 8 and last 4 characters; the gateway redacts key-looking text from every
upstream error it passes on (app/redact.py), over the HTTP relay and the session's HTTP fallback.

The live tests run the simulator with `--api-key` set and the gateway with another key: the
upstream refuses it as OpenAI would, quoting it.
"""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import orjson
import pytest
from conftest import MODEL, UPSTREAM_KEY, Connect, Gateway, Sim, Tenant

from app.redact import REDACTED, redact, redact_bytes
from app.simulator.errors import invalid_api_key, masked_key

OPENAI_401 = (
    "Incorrect API key provided: sk-WRQsP***************************************xQBt. "
    "You can find your API key at https://platform.openai.com/account/api-keys."
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            OPENAI_401,
            f"Incorrect API key provided: {REDACTED}. "
            "You can find your API key at https://platform.openai.com/account/api-keys.",
        ),
        ("Incorrect API key provided: undefined.", f"Incorrect API key provided: {REDACTED}."),
        ("bad key sk-proj-****...abcd.", f"bad key {REDACTED}."),
        ("bad key D57rV0ys****************Pp9p here", f"bad key {REDACTED} here"),
        ("key sk-live-0123456789abcdef, again", f"key {REDACTED}, again"),
        ('{"message":"sk-abc12*****wxyz"}', f'{{"message":"{REDACTED}"}}'),
    ],
)
def test_key_looking_text_is_redacted(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "You can find your API key at https://platform.openai.com/account/api-keys.",
        "task-list disk-full ask-me risk-free",
        "Invalid value for 'temperature': expected a number.",
        "a ** b and 2 * 3",
        "",
    ],
)
def test_ordinary_text_is_left_alone(text: str) -> None:
    assert redact(text) == text


def test_known_secrets_are_redacted_wherever_they_are() -> None:
    assert redact("token=plain-secret-value;", ["plain-secret-value", ""]) == f"token={REDACTED};"


def test_bodies_keep_their_bytes_and_their_json() -> None:
    body = {"error": invalid_api_key(True, UPSTREAM_KEY).error_object()}
    cleaned = orjson.loads(redact_bytes(orjson.dumps(body)))
    assert cleaned["error"]["code"] == "invalid_api_key"
    assert UPSTREAM_KEY[-4:] not in cleaned["error"]["message"]
    odd = b"\xff\xfe not utf-8 \xc3"
    assert redact_bytes(odd) is odd
    assert redact_bytes(b"\xff sk-abcdef \xfe") == b"\xff " + REDACTED.encode() + b" \xfe"


def test_a_long_run_of_letters_costs_linear_time() -> None:
    text = "a" * 1_000_000 + " sk-" + "b" * 1_000_000 + " " + "c-" * 500_000
    start = time.perf_counter()
    redact(text)
    assert time.perf_counter() - start < 1.0


def test_the_simulator_masks_as_openai_does() -> None:
    key = "sk-WRQsPabcdefghijklmnopqrstuvwxyz0123456789ABCxQBt"
    assert masked_key(key) == "sk-WRQsP" + "*" * (len(key) - 12) + "xQBt"
    assert f"Incorrect API key provided: {masked_key(key)}. You can find" in (
        invalid_api_key(True, key).message
    )
    assert masked_key("undefined") == "undefined"


# -- live: the upstream refuses the gateway's key ---------------------------------------------

RIGHT_KEY = "sk-the-one-the-upstream-accepts"
WRONG_UPSTREAM = pytest.mark.parametrize("sim_options", [{"api_key": RIGHT_KEY}], indirect=True)


def leaked(text: str) -> list[str]:
    needles = [UPSTREAM_KEY, masked_key(UPSTREAM_KEY), "*" + UPSTREAM_KEY[-4:], UPSTREAM_KEY[-8:]]
    return [n for n in needles if n in text]


async def post(gateway: Gateway, tenant: Tenant, body: dict[str, Any]) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as http:
        async with http.post(
            gateway.url("/v1/responses"),
            json=body,
            headers={"Authorization": f"Bearer {tenant.key}"},
        ) as resp:
            return resp.status, await resp.read()


@WRONG_UPSTREAM
@pytest.mark.parametrize("stream", [False, True])
async def test_the_relay_answers_an_upstream_401_with_a_502_that_blames_no_customer_key(
    gateway: Gateway, tenant: Tenant, sim: Sim, stream: bool
) -> None:
    """The customer's key was accepted: a 401 passed on would send its client after the wrong
    key. A 502, as for the upstream WebSocket's refused handshake."""
    status, raw = await post(gateway, tenant, {"model": MODEL, "input": "x", "stream": stream})
    assert status == 502
    error = orjson.loads(raw)["error"]
    assert (error["code"], error["type"]) == ("upstream_websocket_handshake_failed", "server_error")
    assert "upstream credential (HTTP 401)" in error["message"]
    assert not leaked(raw.decode())
    # The simulator really did quote it: the gateway is what kept it back.
    requests = await sim.requests()
    assert requests[-1]["headers"]["authorization"] == f"Bearer {UPSTREAM_KEY}"


@WRONG_UPSTREAM
async def test_a_refused_upstream_handshake_names_only_the_status(
    gateway: Gateway, connect: Connect
) -> None:
    async with connect() as ws:
        await ws.send_str(orjson.dumps({"type": "response.create", "model": MODEL}).decode())
        msg = await ws.receive(timeout=10)
        assert not leaked(msg.data)
        event = orjson.loads(msg.data)
        assert event["error"]["code"] == "upstream_websocket_handshake_failed"
        assert event["error"]["message"].endswith("upstream refused the handshake with HTTP 401.")
