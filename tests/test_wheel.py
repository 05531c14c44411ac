"""The wheel, installed alone, is a working gateway.

A fresh virtualenv gets the runtime lock (`--require-hashes`, as ops/Dockerfile installs it); the
lock's setuptools there builds the wheel of a copy of the source tree without build isolation,
and the venv gets it with `--no-deps`, as the image's build does; from a
directory outside the source tree, that venv's `gateway migrate` creates and migrates a database
that did not exist (the migrations come from the wheel's package data), and its `gateway serve`
carries one turn from a real WebSocket client to the simulator and back.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from conftest import UPSTREAM_KEY, Sim, make_tenant, turn
from services import fresh_database

from app.keystore import KeyStore

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
START_SECONDS = 30.0
# What is built: the wheel's inputs, nothing of a developer's checkout (venv, caches, var/).
SOURCES = ("pyproject.toml", "app", "migrations")


@dataclass(frozen=True)
class Installed:
    venv: Path
    wheel: Path
    elsewhere: Path  # the working directory: outside the source tree

    @property
    def gateway(self) -> Path:
        return self.venv / "bin" / "gateway"

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"


def _run(argv: list[str | Path], cwd: Path, timeout: float = 300) -> str:
    result = subprocess.run(
        argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, f"{argv} failed:\n{result.stdout}\n{result.stderr[-4000:]}"
    return result.stdout


def _clean_env(**values: str) -> dict[str, str]:
    """The environment without anything that would point Python or the gateway at the tree."""
    inherited = ("GATEWAY_", "PROMETHEUS_MULTIPROC_DIR", "PYTHON", "VIRTUAL_ENV")
    env = {k: v for k, v in os.environ.items() if not k.startswith(inherited)}
    env.update(values)
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """Built from a copy: a build writes build/ and *.egg-info beside its sources."""
    base = tmp_path_factory.mktemp("wheel")
    source, dist, venv, elsewhere = (base / name for name in ("src", "dist", "venv", "run"))
    source.mkdir()
    elsewhere.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(
                ROOT / name,
                source / name,
                symlinks=True,  # app/migrations stays a link to migrations/, as in git
                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
            )
        else:
            shutil.copy2(ROOT / name, source / name)
    started = time.monotonic()
    # The suite's pip works on the new venv (--python): it needs no pip of its own.
    _run([sys.executable, "-m", "venv", "--without-pip", venv], base)
    pip: list[str | Path] = [sys.executable, "-m", "pip", "--python", venv / "bin" / "python"]
    _run([*pip, "install", "-q", "--require-hashes", "-r", LOCK], base)
    # As ops/Dockerfile: without build isolation, so the lock's setuptools (just installed, with
    # its hash) builds it, and no index is asked.
    _run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", dist, source], base)
    (wheel,) = dist.glob("*.whl")
    _run([*pip, "install", "-q", "--no-deps", wheel], base)
    print(f"\nwheel built and installed with the lock in {time.monotonic() - started:.1f} s")
    return Installed(venv, wheel, elsewhere)


def test_the_wheel_carries_the_migrations(installed: Installed) -> None:
    names = zipfile.ZipFile(installed.wheel).namelist()
    expected = sorted(f"app/migrations/{p.name}" for p in (ROOT / "migrations").glob("*.sql"))
    assert expected
    assert sorted(n for n in names if n.startswith("app/migrations/")) == expected
    # The venv's `app` is the wheel's, not the tree's, and so are the migrations it reads.
    probe = "import app; from app.ledger.migrate import MIGRATIONS_DIR as m; print(app.__file__, m)"
    lines = _run([installed.python, "-c", probe], installed.elsewhere).split()
    print(f"installed: {lines}")
    for line in lines:
        assert Path(line).is_relative_to(installed.venv), line
        assert not Path(line).resolve().is_relative_to(ROOT), line


@pytest.fixture
async def database(pg_admin_dsn: str) -> AsyncIterator[str]:
    dsn, drop = await asyncio.to_thread(fresh_database, pg_admin_dsn, create=False)
    yield dsn
    await asyncio.to_thread(drop)


async def test_the_installed_wheel_migrates_and_serves_a_turn(
    installed: Installed, sim: Sim, redis_url: str, redis_prefix: str, database: str
) -> None:
    env = _clean_env(
        REDIS_URL=redis_url,
        GATEWAY_REDIS_PREFIX=redis_prefix,
        DATABASE_URL=database,
        OPENAI_BASE_URL=sim.base_url,
        OPENAI_API_KEY=UPSTREAM_KEY,
        GATEWAY_ENV="dev",
        ADMIN_TOKEN="admin-wheel-token",
        GATEWAY_HOST="127.0.0.1",
        GATEWAY_PORT="0",
        GATEWAY_SPILL_DIR=str(installed.elsewhere / "spill"),
        GATEWAY_DRAIN_SECONDS="1",
    )
    migrated = await _gateway(installed, env, "migrate")
    print(f"gateway migrate: {migrated.strip()!r}")
    names = sorted(p.name for p in (ROOT / "migrations").glob("*.sql"))
    assert migrated.split() == ["migrations", "applied:", str(len(names)), *names]

    store = KeyStore(redis_url, redis_prefix)
    try:
        tenant = await make_tenant(store)
    finally:
        await store.close()
    out = installed.elsewhere / "serve.out"
    err = installed.elsewhere / "serve.err"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            installed.gateway,
            "serve",
            cwd=installed.elsewhere,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
        )
    try:
        base = await _listening(proc, out, err)
        headers = {"Authorization": f"Bearer {tenant.key}"}
        async with aiohttp.ClientSession() as http:
            ws_url = base.replace("http://", "ws://") + "/v1/responses"
            async with http.ws_connect(ws_url, headers=headers) as ws:
                events = await turn(ws)
        print(f"turn through the wheel's gateway: {[e['type'] for e in events][-3:]}")
        assert events[-1]["type"] == "response.completed", events[-1]
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 15)
        assert code == 0, (await asyncio.to_thread(err.read_text))[-3000:]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    conn = await asyncpg.connect(database)
    try:
        applied = [r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")]
    finally:
        await conn.close()
    assert sorted(applied) == names


async def _gateway(installed: Installed, env: dict[str, str], *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        installed.gateway,
        *args,
        cwd=installed.elsewhere,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, f"gateway {' '.join(args)}: {stderr.decode()[-3000:]}"
    return stdout.decode()


async def _listening(proc: asyncio.subprocess.Process, out: Path, err: Path) -> str:
    """The base URL from the line `gateway listening on http://HOST:PORT`."""
    deadline = asyncio.get_running_loop().time() + START_SECONDS
    while asyncio.get_running_loop().time() < deadline:
        for line in (await asyncio.to_thread(out.read_text)).splitlines():
            if line.startswith("gateway listening on "):
                return line.split()[3]
        if proc.returncode is not None:
            break
        await asyncio.sleep(0.1)
    output = await asyncio.to_thread(err.read_text)
    raise AssertionError(f"gateway did not start: {output[-3000:]}")
