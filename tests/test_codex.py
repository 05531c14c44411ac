"""Codex CLI (`codex exec`, pinned) through the gateway, over WebSocket and over HTTP (SSE).

Codex is installed from npm into `var/codex` once; the test is skipped, with the reason, only when
npm or the registry cannot be reached.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import Gateway, Sim, Tenant

CODEX_VERSION = "0.169.0"
ROOT = Path(__file__).resolve().parents[1]
PREFIX = ROOT / "var" / "codex"
BINARY = PREFIX / "node_modules" / ".bin" / "codex"


@pytest.fixture(scope="module")
def codex() -> Path:
    if BINARY.exists():
        return BINARY
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not installed: cannot fetch @openai/codex")
    PREFIX.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [
            npm,
            "install",
            "--no-audit",
            "--no-fund",
            "--prefix",
            str(PREFIX),
            f"@openai/codex@{CODEX_VERSION}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if result.returncode != 0 or not BINARY.exists():
        pytest.skip(f"npm could not install @openai/codex: {result.stderr.strip()[-300:]}")
    return BINARY


def write_config(home: Path, base_url: str, websockets: bool, retries: bool = False) -> None:
    """`retries`: Codex's own retry settings (its defaults) instead of none."""
    home.mkdir(parents=True, exist_ok=True)
    no_retries = "" if retries else "request_max_retries = 0\nstream_max_retries = 0\n"
    (home / "config.toml").write_text(
        f"""model = "openai/gpt-test"
model_provider = "gateway"

[model_providers.gateway]
name = "gateway"
base_url = "{base_url}"
wire_api = "responses"
env_key = "GATEWAY_TEST_KEY"
supports_websockets = {str(websockets).lower()}
{no_retries}"""
    )


async def run_codex(codex: Path, home: Path, key: str, workdir: Path, prompt: str) -> str:
    code, out, err = await codex_exec(codex, home, key, workdir, prompt)
    assert code == 0, err[-2000:]
    return out


async def codex_exec(
    codex: Path, home: Path, key: str, workdir: Path, prompt: str
) -> tuple[int | None, str, str]:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(home),
        "CODEX_HOME": str(home),
        "GATEWAY_TEST_KEY": key,
        "NO_COLOR": "1",
    }
    proc = await asyncio.create_subprocess_exec(
        str(codex),
        "exec",
        "--skip-git-repo-check",
        "--sandbox",
        "read-only",
        prompt,
        cwd=workdir,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=90)
    except TimeoutError:
        proc.kill()
        raise
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.parametrize("websockets", [True, False], ids=["websocket", "http-sse"])
async def test_codex_exec_through_the_gateway(
    codex: Path, gateway: Gateway, tenant: Tenant, sim: Sim, tmp_path: Path, websockets: bool
) -> None:
    home = tmp_path / "codex-home"
    write_config(home, gateway.url("/v1"), websockets)
    out = await run_codex(codex, home, tenant.key, tmp_path, "ping from codex")
    assert "echo: ping from codex" in out
    requests = await sim.requests()
    over_ws = [r for r in requests if r["conn"] is not None]
    over_http = [r for r in requests if r["conn"] is None]
    if websockets:
        assert over_ws and not over_http
        assert any(r["body"].get("generate") is False for r in over_ws)  # Codex's prewarm
    else:
        assert over_http and not over_ws
    for request in requests:
        assert request["body"]["store"] is False
        assert request["body"]["model"] == "gpt-test"


async def test_codex_falls_back_to_http_when_websockets_are_refused(
    codex: Path, gateway: Gateway, tenant: Tenant, sim: Sim, tmp_path: Path, aiohttp_server: Any
) -> None:
    """A proxy in front of the gateway refuses the upgrade (426, as a WebSocket-less proxy or
    the gateway's own 426 does) and passes POSTs through: Codex switches to HTTP for the session."""
    upgrades = 0

    async def front(request: web.Request) -> web.StreamResponse:
        nonlocal upgrades
        if request.headers.get("Upgrade", "").lower() == "websocket":
            upgrades += 1
            return web.Response(status=426, headers={"Upgrade": "websocket"})
        async with aiohttp.ClientSession() as http:
            async with http.request(
                request.method,
                gateway.url(request.path),
                data=await request.read(),
                headers={k: v for k, v in request.headers.items() if k.lower() != "host"},
            ) as upstream:
                resp = web.StreamResponse(status=upstream.status)
                resp.content_type = upstream.content_type
                await resp.prepare(request)
                async for chunk in upstream.content.iter_any():
                    await resp.write(chunk)
                await resp.write_eof()
                return resp

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", front)
    proxy = await aiohttp_server(app)
    home = tmp_path / "codex-home"
    write_config(home, str(proxy.make_url("/v1")), websockets=True)
    out = await run_codex(codex, home, tenant.key, tmp_path, "fallback please")
    assert "echo: fallback please" in out
    assert upgrades >= 1
    requests = await sim.requests()
    assert requests and all(r["conn"] is None for r in requests)  # all served over HTTP


@pytest.mark.parametrize("websockets", [True, False], ids=["websocket", "http-sse"])
async def test_codex_stops_on_an_exhausted_budget(
    codex: Path, gateway: Gateway, tenant: Tenant, sim: Sim, tmp_path: Path, websockets: bool
) -> None:
    """A team over its day budget: Codex, with its default retry settings, shows the quota error
    and exits instead of retrying in a loop."""
    from test_spend import exhausted, refusals

    await exhausted(gateway, tenant)
    home = tmp_path / "codex-home"
    write_config(home, gateway.url("/v1"), websockets, retries=True)
    before = refusals()
    started = asyncio.get_running_loop().time()
    code, out, err = await codex_exec(codex, home, tenant.key, tmp_path, "spend more")
    took = asyncio.get_running_loop().time() - started
    tried = refusals() - before
    shown = [line for line in (out + err).splitlines() if "quota" in line.lower()]
    print(
        f"codex ({'websocket' if websockets else 'http'}): exit {code} after {took:.1f} s, "
        f"{tried:.0f} refused requests; it showed: {shown[-1:]}"
    )
    assert code != 0
    assert shown, (out + err)[-2000:]
    assert 1 <= tried <= 2, tried  # one request (and at most its prewarm): no retry loop
