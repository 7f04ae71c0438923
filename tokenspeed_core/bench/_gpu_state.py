"""The GPU's clock, power and temperature at a moment: what a timing ran at.

A long compute-bound call (milliseconds, repeated for a second) can run the card into its power
or thermal limit, and the SM clock then drops (docs/perf/cute.md, run 43: 1573-1760 MHz read by
the timing probe on an H200 whose maximum is 1980). Two timings taken at different clocks are
not comparable, so the benchmark scripts record this beside each time, and can let the card
cool between rows. Read through NVML (``pynvml``) when it is installed, else ``nvidia-smi``;
an empty dict where neither answers (CPU machines, containers without the tool).
"""

from __future__ import annotations

import shutil
import subprocess

_FIELDS = ("clocks.sm", "power.draw", "temperature.gpu")
_KEYS = ("sm_mhz", "power_w", "temp_c")


def gpu_state(index: int = 0) -> dict[str, float]:
    """{"sm_mhz", "power_w", "temp_c"} of GPU ``index`` now, or {} if nothing can tell."""
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        return {"sm_mhz": float(pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM)),
                "power_w": pynvml.nvmlDeviceGetPowerUsage(h) / 1000.0,
                "temp_c": float(pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU))}
    except Exception:  # no NVML binding or no device: try the command-line tool
        pass
    return parse_smi(_smi(index))


def _smi(index: int) -> str:
    if shutil.which("nvidia-smi") is None:
        return ""
    try:
        return subprocess.run(
            ["nvidia-smi", "-i", str(index), f"--query-gpu={','.join(_FIELDS)}", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def parse_smi(text: str) -> dict[str, float]:
    """One ``nvidia-smi --query-gpu=clocks.sm,power.draw,temperature.gpu --format=csv,noheader,
    nounits`` line -> the dict; fields it cannot read ("[N/A]") are left out."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    out = {}
    for key, cell in zip(_KEYS, line.split(","), strict=False):  # a short line: what is there
        try:
            out[key] = float(cell.strip())
        except ValueError:
            pass
    return out
