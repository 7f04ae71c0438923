"""The device's measured ceilings: copy bandwidth and dense GEMM rate.

Measured once per device (and torch version), cached in ``~/.cache/tokenspeed/ceilings.json``
(``TOKENSPEED_CACHE_DIR`` overrides the folder). Every benchmark number is reported as a ratio to
these, so results from different cards can be read side by side.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import _device
from ._timing import time_calls


@dataclass(frozen=True)
class Ceilings:
    device: str
    copy_gbps: float  # bytes read + bytes written per second, 1e9
    gemm_tflops: float  # dense matmul at gemm_dtype, 1e12 FLOP/s
    gemm_dtype: str
    measured_at: str
    torch: str


def cache_path() -> Path:
    base = os.environ.get("TOKENSPEED_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "tokenspeed")
    return Path(base) / "ceilings.json"


def _key(device: torch.device) -> str:
    return f"{_device.device_name(device)}|torch {torch.__version__}"


def measure_ceilings(device: torch.device | str, *, quick: bool = False) -> Ceilings:
    device = torch.device(device)
    if device.type == "cuda":
        copy_bytes, n, dtype = (1 << 30), 8192, torch.bfloat16
        if quick:
            copy_bytes, n = 256 << 20, 4096
    else:
        copy_bytes, n, dtype = (64 << 20), 1024, torch.float32
        if quick:
            copy_bytes, n = 16 << 20, 512
    src = torch.randn(copy_bytes // 4, device=device)
    dst = torch.empty_like(src)
    t = time_calls([lambda: dst.copy_(src)], device, warmup=3, iters=20, flush_l2=False)
    copy_gbps = 2 * copy_bytes / (t.median_us * 1e-6) / 1e9
    a = torch.randn(n, n, device=device).to(dtype)  # random data: zeros run faster than real
    b = torch.randn(n, n, device=device).to(dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    t = time_calls([lambda: torch.matmul(a, b, out=c)], device, warmup=3, iters=20, flush_l2=False)
    gemm = 2 * n**3 / (t.median_us * 1e-6) / 1e12
    return Ceilings(_device.device_name(device), round(copy_gbps, 1), round(gemm, 2),
                    str(dtype).replace("torch.", ""), time.strftime("%Y-%m-%d %H:%M:%S"), torch.__version__)


def get_ceilings(device: torch.device | str, *, remeasure: bool = False) -> Ceilings:
    """Cached ceilings of ``device``; measured (and cached) when missing or when asked."""
    device = torch.device(device)
    path = cache_path()
    data: dict = {}
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            data = {}
    key = _key(device)
    if key in data and not remeasure:
        return Ceilings(**data[key])
    ceil = measure_ceilings(device)
    data[key] = asdict(ceil)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2))
    except OSError:
        pass  # a read-only home must not stop a benchmark
    return ceil
