"""`gateway bench`: that it runs and prints every figure, not how fast anything is.

Speed targets are measured by `gateway bench --compare` (docs/performance.md), not asserted here:
a timed assertion on a shared 2-core machine would fail on a busy neighbour, not on a slow hot path.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import aiohttp
import pytest

from app.bench import phases, report
from app.bench.load import Shape, event_type, sent_at_of
from app.bench.plan import Plan
from app.bench.profile import summarize
from app.bench.relay import create_relay_app
from app.bench.single import bench_one
from app.cli import main
from app.simulator import SimulatorOptions, create_simulator_app

TINY = [
    "--rounds", "1",
    "--concurrency", "8",
    "--handshakes", "20",
    "--idle-sockets", "10",
    "--saturate-sockets", "4",
    "--saturate-turns", "2",
    "--saturate-deltas", "5",
    "--sockets", "6",
    "--turns", "1",
    "--deltas", "3",
    "--gap-ms", "5",
    "--first-turns", "2",
    "--first-turn-pause-ms", "10",
    "--handshake-delay-ms", "20",
    "--pool-warmup-s", "0",
    "--events-per-turn", "1,9",
    "--shape-rounds", "1",
    "--shape-events", "40",
    "--shape-max-turns", "8",
    "--burst", "4",
    "--burst-rounds", "1",
]  # fmt: skip

# The phases beside the rounds (app/bench/phases.py): a line each, found by its start.
PHASE_LINES = [
    "CPU per forwarded event by turn length",
    "1 ",
    "9 ",
    "fixed CPU per accepted turn (1 event a turn)",
    "--workers 2: saturated events per second",
    "--workers 2: one scrape of /metrics counted",
    "POST /v1/responses with stream: true",
    "saturated events per second",
    "CPU-seconds per 1,000 events",
    "first turn of 4 sockets connecting at once",
    "p50",
    "p99",
]

COMPARE_LABELS = [
    report.HANDSHAKES,
    f"saturated {report.EVENTS}",
    report.CPU,
    report.SIM_CPU.strip(),
    report.CLIENT_CPU.strip(),
    report.TTFE_P50,
    report.TTFE_P99,
    report.LATENCY_P50,
    report.LATENCY_P99,
    f"paced {report.EVENTS}",
    f"{report.CPU} (paced)",
    report.RSS,
    report.FIRST_TURN_P50,
    report.FIRST_TURN_P99,
    report.ERRORS,
]


def test_compare_runs_and_prints_every_figure(
    redis_url: str, pg_admin_dsn: str, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("DATABASE_URL", pg_admin_dsn)  # the bench migrates a gwbench_* beside it
    assert main(["bench", "--compare", *TINY]) == 0
    out = capsys.readouterr().out
    for label in COMPARE_LABELS:
        line = next((x for x in out.splitlines() if x.strip().startswith(label)), None)
        assert line is not None, f"no line for {label!r} in:\n{out}"
        assert line.rstrip().endswith(("x", "-")), line  # a gateway/relay column
    lines = out.splitlines()
    for start in PHASE_LINES:
        assert any(x.startswith(start) for x in lines), f"no line starting {start!r} in:\n{out}"
    assert "relay-asyncio" in out or "relay-uvloop" in out, out  # the relay on both loops
    assert "one /metrics for 2 workers: " in out, out
    verdicts = [x for x in lines if x.startswith(("PASS", "FAIL", "N/A"))]
    # 6 of the rounds, the fixed cost per turn (9 events a turn is under 20: no line of its
    # own), 2 of the workers, 2 of SSE, 4 of the burst
    assert len(verdicts) == 15, out
    errors = next(x for x in out.splitlines() if x.startswith(report.ERRORS)).split()
    assert errors[2:5] == ["0", "0", "0"], out  # no target answered a turn with an error


def _plan(**sizes: Any) -> Plan:
    values: dict[str, Any] = {
        "model": "openai/gpt-test",
        "sockets": 4,
        "turns": 2,
        "deltas": 3,
        "gap_ms": 2.0,
        "concurrency": 4,
        "handshakes": 10,
        "idle_sockets": 5,
        "timeout": 10.0,
        "rounds": 1,
        "saturate_sockets": 2,
        "saturate_turns": 1,
        "saturate_deltas": 2,
        "handshake_delay_ms": 0.0,
        "first_turns": 1,
        "first_turn_pause_ms": 0.0,
        "pool_warmup_s": 0.0,
    }
    values.update(sizes)
    return Plan(**values)


async def test_one_target_prints_every_figure(aiohttp_server: Any, capsys: Any) -> None:
    """Against the simulator itself, served by this process (whose pid stands in)."""
    sim = await aiohttp_server(create_simulator_app(SimulatorOptions()))
    url = str(sim.make_url("/v1/responses")).replace("http", "ws", 1)
    await bench_one(_plan(), url, "any-key", os.getpid())
    out = capsys.readouterr().out
    labels = [
        report.RSS,
        report.HANDSHAKES,
        report.TTFE_P50,
        report.TTFE_P99,
        report.LATENCY_P50,
        report.LATENCY_P99,
        report.EVENTS,
        f"gateway {report.CPU}",
        report.ERRORS,
    ]
    for label in labels:
        line = next((x for x in out.splitlines() if x.startswith(label)), None)
        assert line is not None and " - " not in line, f"{label!r} missing or empty in:\n{out}"
    assert "(4 sockets x 2 turns x 3 deltas" in out


async def test_relay_forwards_every_event_in_order(aiohttp_server: Any) -> None:
    sim = await aiohttp_server(create_simulator_app(SimulatorOptions()))
    sim_ws = str(sim.make_url("/v1/responses")).replace("http", "ws", 1)
    relay = await aiohttp_server(create_relay_app(sim_ws))
    frame = Shape("gpt-test", 3, 0).frame()
    received: dict[str, list[str]] = {}
    for name, base in (("direct", sim), ("relay", relay)):
        async with aiohttp.ClientSession() as http:
            url = base.make_url("/v1/responses")
            async with http.ws_connect(url, headers={"Authorization": "Bearer k"}) as ws:
                await ws.send_str(frame)
                texts: list[str] = []
                while not texts or event_type(texts[-1]) != "response.completed":
                    texts.append((await ws.receive(timeout=5)).data)
        received[name] = texts

    def comparable(text: str) -> str:
        # ids, timestamps and stamps differ between two responses; the rest must not
        return text[: text.find('"sim_sent_at"')][:40]

    assert [comparable(t) for t in received["relay"]] == [comparable(t) for t in received["direct"]]
    assert len(received["relay"]) == Shape("gpt-test", 3, 0).events


async def test_relay_refuses_when_upstream_refuses(aiohttp_server: Any) -> None:
    sim = await aiohttp_server(create_simulator_app(SimulatorOptions(handshake_fault="429")))
    sim_ws = str(sim.make_url("/v1/responses")).replace("http", "ws", 1)
    relay = await aiohttp_server(create_relay_app(sim_ws))
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(relay.make_url("/v1/responses"))
    assert refused.value.status == 429


def test_event_type_and_stamp_are_read_without_parsing() -> None:
    text = '{"type":"response.output_text.delta","delta":"a","sim_sent_at":1700000000.25}'
    assert event_type(text) == "response.output_text.delta"
    assert sent_at_of(text) == 1700000000.25
    assert event_type('{"sequence_number":1,"type":"error"}') == "error"  # type not first
    assert sent_at_of('{"type":"error"}') is None
    assert sent_at_of('{"sim_sent_at":1.5e9,"type":"x"}') == 1.5e9
    assert event_type("not json") is None


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert report.percentile(values, 50) == 50
    assert report.percentile(values, 99) == 99
    assert report.percentile([3.0], 99) == 3.0
    assert report.percentile([], 50) is None


def test_targets_pass_and_fail_on_the_issue_thresholds() -> None:
    relay = report.Figures(
        events_per_s=1000, cpu_per_1k=0.010, latency_p99=0.002, handshakes_per_s=1000
    )
    direct = report.Figures(first_turn_p50=0.150)
    good = report.Figures(
        events_per_s=800,
        cpu_per_1k=0.013,
        latency_p99=0.0026,
        rss_per_socket=36 * 1024,
        handshakes_per_s=1000,
        first_turn_p50=0.010,
    )
    verdicts = report.targets({"direct": direct, "relay": relay, "gateway": good}, "200", 150)
    assert [v.passed for v in verdicts] == [True] * 6
    bad = report.Figures(
        events_per_s=799,
        cpu_per_1k=0.0131,
        latency_p99=0.00261,
        rss_per_socket=37 * 1024,
        handshakes_per_s=999,
        first_turn_p50=0.150,
    )
    verdicts = report.targets({"direct": direct, "relay": relay, "gateway": bad}, "200", 150)
    assert [v.passed for v in verdicts] == [False] * 6
    assert all(v.line.startswith("FAIL") for v in verdicts)
    missing = report.targets(
        {"direct": report.Figures(), "relay": report.Figures(), "gateway": report.Figures()},
        "200",
        150,
    )
    assert [v.passed for v in missing] == [None] * 6


def test_profile_summary_keeps_the_event_loop_thread() -> None:
    root = "_run_module_as_main (<frozen runpy>)"
    stacks: Counter[tuple[str, ...]] = Counter(
        {
            (root, "main (app/cli.py)", "Session._read_upstream (app/session.py)", "send"): 3,
            (root, "main (app/cli.py)", "Session._read_upstream (app/session.py)"): 1,
            ("_bootstrap (threading.py)", "_worker (concurrent/futures/thread.py)"): 5,
        }
    )
    lines = summarize(stacks)
    assert lines[0].startswith("4 samples of the event loop thread (5 more")
    assert "   75.0%  send" in lines
    assert "  100.0%  Session._read_upstream (app/session.py)" not in lines  # under every stack
    assert not any("_worker" in line for line in lines)


def test_phase_targets_use_the_issue_thresholds() -> None:
    rows = [
        phases.ShapeRow(1, 10, {}, {"relay": 50e-6, "gateway": 150e-6}),
        phases.ShapeRow(20, 10, {"relay": 10e-6, "gateway": 12e-6}, {}),
        phases.ShapeRow(108, 10, {"relay": 10e-6, "gateway": 10.1e-6}, {}),
    ]
    assert [v.passed for v in phases.shape_verdicts(rows)] == [True, False, True]
    rows[0].per_turn["gateway"] = 151e-6
    assert phases.shape_verdicts(rows)[-1].passed is False
    burst = phases.Burst(200, 150)
    burst.p50 = {"direct": 0.150, "relay": 0.160, "gateway-nopool": 0.240, "gateway-pool": 0.149}
    burst.p99 = {"direct": 0.2, "relay": 0.2, "gateway-nopool": 0.31, "gateway-pool": 0.2}
    assert [v.passed for v in phases.burst_verdicts(burst)] == [True, False, True, False]
    sse = phases.Sse({"http-relay": 1000, "gateway": 900}, {"http-relay": 0.010, "gateway": 0.013})
    assert [v.passed for v in phases.sse_verdicts(sse)] == [True, True]
    workers = phases.Workers(2, {"gateway": 1000, "gateway-w2": 1790}, {}, counted=5, served=6)
    assert [v.passed for v in phases.workers_verdicts(workers, "gateway-w2")] == [False, False]


def test_turn_lengths_are_one_event_or_nine_and_more() -> None:
    assert Shape.of_events("openai/m", 1).events == 1
    assert Shape.of_events("openai/m", 108).events == 108
    assert Shape.of_events("openai/m", 108).deltas == 100
    with pytest.raises(ValueError):
        Shape.of_events("openai/m", 5)
    assert _plan(saturate_sockets=50).shape_turns(1) == 60  # 3,000 turns at most
    assert _plan(saturate_sockets=50).shape_turns(108) == 10  # 54,000 events
