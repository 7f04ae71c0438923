"""Kernel microbenchmarks: every backend side by side, as ratios to the device's ceilings.

``tokenspeed bench`` is the command-line face of this module; scripts can call ``run_bench``.
"""

from ._ceilings import Ceilings, cache_path, get_ceilings, measure_ceilings
from ._gpu_state import gpu_state
from ._runner import BenchRow, format_shape, parse_shape, run_bench, write_csv, write_json
from ._timing import Timing, time_calls

__all__ = [
    "BenchRow", "Ceilings", "Timing", "cache_path", "format_shape", "get_ceilings", "gpu_state", "measure_ceilings",
    "parse_shape", "run_bench", "time_calls", "write_csv", "write_json",
]
