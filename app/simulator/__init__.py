"""The bundled upstream simulator: OpenAI's Responses API in WebSocket mode, faults included.

See docs/simulator.md for what it answers and every switch.
"""

from app.simulator.cli import add_simulate_arguments, options_from_args
from app.simulator.options import SimulatorOptions
from app.simulator.server import create_simulator_app, run_simulator

__all__ = [
    "SimulatorOptions",
    "add_simulate_arguments",
    "create_simulator_app",
    "options_from_args",
    "run_simulator",
]
