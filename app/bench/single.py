"""`gateway bench --url … --key …`: the figures of one target (a local or a deployed gateway).

Per-event latency needs the bundled simulator upstream (its `sim_sent_at` stamps) on this host;
CPU and RSS need the gateway's process id on this host (`--gateway-pid`).
"""

from __future__ import annotations

from app.bench import report
from app.bench.load import Target, handshake_rate, idle_rss, run_load
from app.bench.plan import Plan
from app.bench.proc import CpuMeter
from app.bench.report import ms, percentile


def _line(label: str, value: str, detail: str = "") -> None:
    print(f"{label:<40}{value:>14}  {detail}".rstrip(), flush=True)


async def bench_one(plan: Plan, url: str, key: str, pid: int | None) -> None:
    target = Target("gateway", url, key, pid)
    no_pid = "n/a: give --gateway-pid (a process on this host)"
    print(f"gateway bench: {url}", flush=True)
    if pid is not None and plan.idle_sockets:
        rss = await idle_rss(
            target,
            plan.small,
            sockets=plan.idle_sockets,
            concurrency=plan.concurrency,
            timeout=plan.timeout,
        )
        kib = rss.per_socket / report.KIB
        _line(report.RSS, f"{kib:.1f} KiB", f"({rss.sockets} sockets)")
    else:
        _line(report.RSS, "-", no_pid if pid is None else "(--idle-sockets 0)")
    if plan.handshakes:
        hs = await handshake_rate(target, plan.handshakes, plan.concurrency, timeout=plan.timeout)
        detail = f"({hs.count} handshakes, {plan.concurrency} in flight, {hs.failed} failed)"
        if hs.first_failure:
            detail += f"; first failure: {hs.first_failure}"
        _line(report.HANDSHAKES, f"{hs.per_second:,.0f}", detail)
    meter = CpuMeter({"target": pid} if pid is not None else {})
    result = await run_load(
        target,
        plan.paced,
        sockets=plan.sockets,
        turns=plan.turns,
        concurrency=plan.concurrency,
        timeout=plan.timeout,
        meter=meter,
    )
    rec = result.rec
    no_stamp = "" if rec.latency else "(no sim_sent_at: is the simulator upstream?)"
    _line(report.TTFE_P50, ms(percentile(rec.ttfe, 50)))
    _line(report.TTFE_P99, ms(percentile(rec.ttfe, 99)))
    _line(report.LATENCY_P50, ms(percentile(rec.latency, 50)), no_stamp)
    _line(report.LATENCY_P99, ms(percentile(rec.latency, 99)), no_stamp)
    spread = f", starts spread over {plan.paced.seconds:g} s" if plan.paced.seconds else ""
    _line(
        report.EVENTS,
        f"{result.events_per_second:,.0f}",
        f"({plan.sockets} sockets x {plan.turns} turns x {plan.deltas} deltas "
        f"{plan.gap_ms:g} ms apart: {rec.events} events in {result.seconds:.2f} s{spread})",
    )
    cpu = result.cpu_per_1k("target")
    label = f"gateway {report.CPU}"
    if cpu is None:
        _line(label, "-", no_pid)
    else:
        _line(label, f"{cpu:.4f} s")
    _line(report.ERRORS, str(rec.errors), f"(first: {rec.first_error})" if rec.first_error else "")
