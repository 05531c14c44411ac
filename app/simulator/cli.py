"""Command-line flags of `gateway simulate` (the lead adds `--host` and `--port`)."""

from __future__ import annotations

import argparse

from app.simulator import faults
from app.simulator.options import SimulatorOptions


def add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field of `SimulatorOptions`; defaults come from the dataclass."""
    d = SimulatorOptions()
    g = parser.add_argument_group("simulator behaviour")
    g.add_argument(
        "--api-key",
        dest="sim_api_key",
        metavar="KEY",
        default=d.api_key,
        help="accept only this bearer token (default: any non-empty one)",
    )
    g.add_argument(
        "--no-decimal-close",
        dest="sim_decimal_close",
        action="store_false",
        default=d.decimal_close,
        help="answer a decimal temperature/top_p normally instead of closing (1000, no events)",
    )
    g.add_argument(
        "--fault",
        dest="sim_fault",
        choices=faults.TURN_FAULTS,
        default=d.fault,
        help="apply this fault to every WebSocket turn",
    )
    g.add_argument(
        "--fault-rate",
        dest="sim_fault_rate",
        type=_probability,
        metavar="P",
        default=d.fault_rate,
        help=f"chance per WebSocket turn of a random fault ({', '.join(faults.RANDOM_FAULTS)})",
    )
    g.add_argument(
        "--seed",
        dest="sim_seed",
        type=int,
        metavar="N",
        default=d.seed,
        help="seed of --fault-rate",
    )
    g.add_argument(
        "--fault-after",
        dest="sim_fault_after",
        type=_non_negative_int,
        metavar="N",
        default=d.fault_after,
        help=f"events sent before a mid-response fault strikes (default {d.fault_after})",
    )
    g.add_argument(
        "--handshake-fault",
        dest="sim_handshake_fault",
        choices=faults.HANDSHAKE_FAULTS,
        default=d.handshake_fault,
        help="refuse (or never answer) every WebSocket handshake",
    )
    g.add_argument(
        "--handshake-delay-ms",
        dest="sim_handshake_delay_ms",
        type=_non_negative_float,
        metavar="MS",
        default=d.handshake_delay_ms,
        help="pause before answering every WebSocket handshake",
    )
    g.add_argument(
        "--delay-ms",
        dest="sim_delay_ms",
        type=_non_negative_float,
        metavar="MS",
        default=d.delay_ms,
        help="pause before each delta event (default 0)",
    )
    g.add_argument(
        "--deltas",
        dest="sim_deltas",
        type=_positive_int,
        metavar="N",
        default=d.deltas,
        help="force N text deltas per response (default: one per word)",
    )
    g.add_argument(
        "--large-bytes",
        dest="sim_large_bytes",
        type=_non_negative_int,
        metavar="BYTES",
        default=d.large_bytes,
        help=f"size of the 'large' fault's response.completed frame (default {d.large_bytes})",
    )
    g.add_argument(
        "--max-connection-seconds",
        dest="sim_max_connection_seconds",
        type=_positive_float,
        metavar="S",
        default=d.max_connection_seconds,
        help="connection age limit; then websocket_connection_limit_reached and close (3600)",
    )
    g.add_argument(
        "--max-message-bytes",
        dest="sim_max_message_bytes",
        type=_positive_int,
        metavar="BYTES",
        default=d.max_message_bytes,
        help=f"largest WebSocket message or HTTP body accepted (default {d.max_message_bytes})",
    )
    g.add_argument(
        "--no-sent-at",
        dest="sim_sent_at",
        action="store_false",
        default=d.sent_at,
        help="do not stamp events with sim_sent_at",
    )
    g.add_argument(
        "--request-log-limit",
        dest="sim_request_log_limit",
        type=_positive_int,
        metavar="N",
        default=d.request_log_limit,
        help=f"entries kept by GET /_sim/requests (default {d.request_log_limit})",
    )
    g.add_argument(
        "--store-limit",
        dest="sim_store_limit",
        type=_positive_int,
        metavar="N",
        default=d.store_limit,
        help=f"store:true responses kept for chaining (default {d.store_limit})",
    )


def options_from_args(ns: argparse.Namespace) -> SimulatorOptions:
    return SimulatorOptions(
        api_key=ns.sim_api_key,
        decimal_close=ns.sim_decimal_close,
        fault=ns.sim_fault,
        fault_rate=ns.sim_fault_rate,
        seed=ns.sim_seed,
        fault_after=ns.sim_fault_after,
        handshake_fault=ns.sim_handshake_fault,
        handshake_delay_ms=ns.sim_handshake_delay_ms,
        delay_ms=ns.sim_delay_ms,
        deltas=ns.sim_deltas,
        large_bytes=ns.sim_large_bytes,
        max_connection_seconds=ns.sim_max_connection_seconds,
        max_message_bytes=ns.sim_max_message_bytes,
        sent_at=ns.sim_sent_at,
        request_log_limit=ns.sim_request_log_limit,
        store_limit=ns.sim_store_limit,
    )


def _number(text: str, convert: type[int] | type[float], low: float, inclusive: bool) -> float:
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value < low or (value == low and not inclusive):
        relation = ">=" if inclusive else ">"
        raise argparse.ArgumentTypeError(f"expected a number {relation} {low}, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    return int(_number(text, int, 0, True))


def _positive_int(text: str) -> int:
    return int(_number(text, int, 1, True))


def _non_negative_float(text: str) -> float:
    return _number(text, float, 0, True)


def _positive_float(text: str) -> float:
    return _number(text, float, 0, False)


def _probability(text: str) -> float:
    value = _number(text, float, 0, True)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a number in 0..1, got {text}")
    return value
