"""A real Prometheus (Debian's `prometheus`) on loopback scrapes a real gateway on a real port,
with ops/prometheus.yml's job and ops/alerts.yml's rules: after a few turns every dashboard panel
query returns data, and every alert expression parses and evaluates, through the HTTP API.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from conftest import Connect, Gateway, Tenant, eventually, recv, send, turn
from test_ops_files import OPS, alert_rules, concrete, dashboard_queries

from app.models import Limits

pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="the prometheus server is not installed (make deps installs Debian's `prometheus`)",
)

SCRAPE_SECONDS = 1
RATE_INTERVAL = "30s"  # Grafana's $__rate_interval: many 1 s scrapes, and slow machines


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def prometheus_config(target: str, rules: Path) -> dict[str, Any]:
    """ops/prometheus.yml with fast intervals, its gateway job pointed at `target`."""
    config: dict[str, Any] = yaml.safe_load((OPS / "prometheus.yml").read_text())
    config["global"].update(
        scrape_interval=f"{SCRAPE_SECONDS}s",
        scrape_timeout=f"{SCRAPE_SECONDS}s",
        evaluation_interval=f"{SCRAPE_SECONDS}s",
    )
    config["rule_files"] = [str(rules)]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "gateway"]
    job["static_configs"] = [{"targets": [target]}]
    config["scrape_configs"] = [job]  # the DNS job would look up cluster names
    return config


class Prometheus:
    def __init__(self, url: str, http: aiohttp.ClientSession) -> None:
        self.url = url
        self.http = http

    async def get(self, path: str, **params: str) -> Any:
        async with self.http.get(self.url + path, params=params) as resp:
            body = await resp.json()
            assert resp.status == 200 and body["status"] == "success", (params, body)
            return body["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        data = await self.get("/api/v1/query", query=expr)
        result: list[dict[str, Any]] = data["result"]
        return result


@contextlib.asynccontextmanager
async def running_prometheus(tmp_path: Path, target: str) -> AsyncIterator[Prometheus]:
    rules = tmp_path / "alerts.yml"
    shutil.copy(OPS / "alerts.yml", rules)
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(prometheus_config(target, rules)))
    port = free_port()
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            shutil.which("prometheus") or "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=1h",
            "--log.level=warn",
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL,
        )
    try:
        async with aiohttp.ClientSession() as http:
            prom = Prometheus(f"http://127.0.0.1:{port}", http)
            await _until_ready(prom, proc, log)
            yield prom
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def _until_ready(prom: Prometheus, proc: asyncio.subprocess.Process, log: Path) -> None:
    for _ in range(300):
        if proc.returncode is not None:
            output = await asyncio.to_thread(log.read_text)
            raise AssertionError(f"prometheus exited: {output[-2000:]}")
        with contextlib.suppress(aiohttp.ClientError):
            async with prom.http.get(prom.url + "/-/ready") as resp:
                if resp.status == 200:
                    return
        await asyncio.sleep(0.1)
    raise AssertionError("prometheus did not get ready")


async def until(predicate: Any, timeout: float, what: str) -> Any:
    """Poll an async predicate until it returns something truthy."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.25)


async def traffic(gateway: Gateway, tenant: Tenant, connect: Connect) -> None:
    """Turns of every kind the dashboard shows: completed, refused, an upstream close, HTTP; on
    a team with a day budget (the spend panels)."""
    budget = Limits(usd_per_day_per_team=100.0)
    await tenant.store.put_team(tenant.team.model_copy(update={"limits": budget}))

    def budget_seen() -> bool:
        team = gateway.node.view.view.teams.get(tenant.team.id)
        return team is not None and team.limits == budget

    await eventually(budget_seen)
    async with connect() as ws:
        for _ in range(3):
            assert (await turn(ws))[-1]["type"] == "response.completed"
        await send(ws, "not json")
        assert (await recv(ws))["error"]["code"] == "invalid_response_create"
        events = await turn(ws, metadata={"sim_fault": "close_1011", "sim_fault_after": "1"})
        assert events[-1]["error"]["code"] == "upstream_websocket_closed"
        assert (await turn(ws))[-1]["type"] == "response.completed"
    async with aiohttp.ClientSession() as http:
        async with http.get(gateway.url("/v1/responses"), headers={"Upgrade": "x"}) as resp:
            assert resp.status == 426
        body = {"model": "openai/gpt-test", "input": "hi"}
        headers = {"Authorization": f"Bearer {tenant.key}"}
        async with http.post(gateway.url("/v1/responses"), json=body, headers=headers) as resp:
            assert resp.status == 200


_COMPARISON = re.compile(r"\s*(==|!=|>=|<=|>|<)\s*[0-9.e+-]+\s*$")


def signal_of(expr: str) -> str | None:
    """An alert's expression without its final threshold, when that is its only comparison."""
    stripped = _COMPARISON.sub("", expr.strip())
    outside_selectors = re.sub(r"\{[^}]*\}", "", stripped)
    if stripped == expr.strip() or re.search(r"==|!=|>|<| and | or ", outside_selectors):
        return None
    return stripped


async def test_prometheus_scrapes_the_gateway_and_every_query_works(
    gateway: Gateway, tenant: Tenant, connect: Connect, tmp_path: Path
) -> None:
    target = f"{gateway.server.host}:{gateway.server.port}"
    async with running_prometheus(tmp_path, target) as prom:

        async def scraped() -> bool:
            targets = (await prom.get("/api/v1/targets"))["activeTargets"]
            return any(t["health"] == "up" for t in targets)

        await until(scraped, 15, "the first scrape of the gateway")
        await traffic(gateway, tenant, connect)

        # Every panel query of the Grafana dashboard returns data.
        queries = [(title, concrete(expr, RATE_INTERVAL)) for title, expr in dashboard_queries()]
        missing = dict(queries)

        async def all_have_data() -> bool:
            for title, expr in list(missing.items()):
                if await prom.query(expr):
                    del missing[title]
            return not missing

        try:
            await until(all_have_data, 20, "every dashboard query to return data")
        except AssertionError:
            raise AssertionError(f"panels without data: {missing}") from None

        # Every alert expression parses and evaluates; where it has a single threshold, what it
        # compares returns data.
        for rule in alert_rules():
            await prom.query(rule["expr"])
            signal = signal_of(rule["expr"])
            if signal is not None:
                assert await prom.query(signal), f"{rule['alert']}: no data for {signal}"

        # Prometheus loaded ops/alerts.yml and evaluates every rule without an error.
        async def rules_evaluated() -> list[dict[str, Any]] | None:
            groups = (await prom.get("/api/v1/rules"))["groups"]
            rules = [r for g in groups for r in g["rules"]]
            if all(r["lastEvaluation"] > "2000" for r in rules):
                return rules
            return None

        rules = await until(rules_evaluated, 10, "every rule to be evaluated")
        assert {r["name"] for r in rules} == {r["alert"] for r in alert_rules()}
        for rule in rules:
            assert rule["health"] == "ok" and not rule.get("lastError"), rule

        # The one upstream close among six responses is over GatewayUpstreamClosesMidResponse's 2%:
        # pending (its `for:` is 5 minutes). Nothing else is wrong with this gateway, though on a
        # loaded machine its overhead per event can pass 5 ms (the test shares its CPU).
        async def pending() -> set[str] | None:
            alerts = (await prom.get("/api/v1/alerts"))["alerts"]
            names = {a["labels"]["alertname"] for a in alerts if a["state"] != "inactive"}
            # Others may be pending first (`leaked` below): wait for this one.
            return names if "GatewayUpstreamClosesMidResponse" in names else None

        active = await until(pending, 10, "the upstream-close alert to be pending")
        assert "GatewayUpstreamClosesMidResponse" in active
        expected = {"GatewayUpstreamClosesMidResponse", "GatewayErrorRateHigh"}
        # Metrics are the process's: a test run earlier in it may have counted failed spend
        # rebuilds (Postgres away on purpose) or left teams at their budgets, which this
        # gateway's /metrics then shows.
        leaked = {"GatewaySpendRebuildsFailing", "GatewayTeamNearSpendLimit"}
        assert active <= expected | {"GatewayOverheadP99High"} | leaked
