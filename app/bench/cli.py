"""Placeholder wiring for `gateway bench`; the benchmark itself lives in this package."""

from __future__ import annotations

import argparse


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="ws://127.0.0.1:8080/v1/responses")


def run_bench(args: argparse.Namespace) -> int:
    print("gateway bench: not implemented yet")
    return 1
