"""Trace-replay simulator: drives the real scheduler with agentic and Mooncake traces, no GPU."""

from tokenspeed.sim.simulator import CostModel, SimResult, Simulator
from tokenspeed.sim.traces import load_agentic, load_mooncake

__all__ = ["CostModel", "SimResult", "Simulator", "load_agentic", "load_mooncake"]
