"""Side-by-side benchmark of every backend that supports a shape.

Each row: the op, the backend, the case, median/p10/p90 time, TFLOP/s and GB/s from the op's cost
model, and both as a percentage of the device's measured ceilings, plus a command line that
reproduces the row.
"""

from __future__ import annotations

import csv
import json
import math
import shlex
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass

import torch

from .. import _device
from .._registry import Registry
from .._spec import DTYPES, dtype_name
from ._ceilings import Ceilings
from ._timing import time_calls

ROTATE_BYTES = 256 << 20  # inputs smaller than this are copied and rotated so L2 cannot hold them


@dataclass
class BenchRow:
    op: str
    backend: str
    case: str
    device: str
    median_us: float
    p10_us: float
    p90_us: float
    tflops: float
    gbps: float
    pct_copy: float
    pct_gemm: float
    method: str
    repro: str
    error: str = ""


def format_shape(case: dict) -> str:
    parts = []
    for k, v in case.items():
        if isinstance(v, torch.dtype):
            v = dtype_name(v)
        elif isinstance(v, (list, tuple)):
            v = "/".join(str(x) for x in v)
        parts.append(f"{k}={v}")
    return ",".join(parts)


def parse_shape(text: str) -> dict:
    """``B=4,q_len=1,dtype=bf16,seqlens=1/7/9`` -> a case dict."""
    case: dict = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in item:
            raise ValueError(f"shape item '{item}' is not key=value")
        k, v = (s.strip() for s in item.split("=", 1))
        case[k] = _parse_value(v)
    return case


def _parse_value(v: str):
    if v in DTYPES:
        return DTYPES[v]
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    if "/" in v:
        return [_parse_value(x) for x in v.split("/") if x]
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    return v


def run_bench(op: str, cases: Sequence[dict], *, registry: Registry, device: torch.device,
              ceilings: Ceilings, backends: Iterable[str] | None = None, iters: int = 50,
              cuda_graph: bool = False, seed: int = 0, l2_flush: str = "write",
              progress: Callable[[str], None] | None = None) -> list[BenchRow]:
    """Time every implementation of ``op`` that runs each case. ``l2_flush``: how L2 is flushed
    before each timed call, "write" (as ``triton.testing.do_bench``; the default) or "read"
    (clean lines; see :func:`time_calls`)."""
    spec = registry.spec(op)
    wanted = set(backends) if backends else None
    cap = _device.capability(device)
    rows: list[BenchRow] = []
    for case in cases:
        gen = torch.Generator().manual_seed(seed)
        args = spec.make_inputs(case, gen, device)
        call = spec.bind(args)
        sig = spec.signature(call, cap)
        label = spec.label(case)
        in_bytes = sum(t.numel() * t.element_size() for t in call.tensors.values() if t is not None)
        copies = 1
        if device.type == "cuda" and in_bytes < ROTATE_BYTES:
            copies = min(8, math.ceil(ROTATE_BYTES / max(in_bytes, 1)))
        arg_sets = [args] + [spec.make_inputs(case, torch.Generator().manual_seed(seed + i), device)
                             for i in range(1, copies)]
        calls_by_set = [spec.bind(a) for a in arg_sets]
        cost = spec.cost(call)
        for impl in registry.implementations(op):
            if wanted is not None and impl.backend not in wanted:
                continue
            if wanted is None and impl.reject_reason(sig, spec.primary):
                continue
            if progress:
                progress(f"{op} {impl.backend} {label}")
            repro = (f"tokenspeed bench {op} --shape {shlex.quote(format_shape(case))} "
                     f"--backends {impl.backend}" + (" --graph" if cuda_graph else "")
                     + (f" --l2-flush {l2_flush}" if l2_flush != "write" else ""))
            reason = impl.reject_reason(sig, spec.primary)
            if reason:
                rows.append(_row(op, impl.backend, label, device, None, cost, ceilings, repro,
                                 error=f"unsupported: {reason}"))
                continue
            fns = [_bound(impl.fn, c.kwargs()) for c in calls_by_set]
            try:
                t = time_calls(fns, device, iters=iters, cuda_graph=cuda_graph, flush_l2=l2_flush)
            except Exception as exc:  # a failing backend is a row, not the end of the sweep
                rows.append(_row(op, impl.backend, label, device, None, cost, ceilings, repro,
                                 error=f"{type(exc).__name__}: {exc}"))
                continue
            rows.append(_row(op, impl.backend, label, device, t, cost, ceilings, repro))
    return rows


def _bound(fn, kwargs):
    return lambda: fn(**kwargs)


def _row(op, backend, label, device, t, cost, ceilings: Ceilings, repro, error="") -> BenchRow:
    if t is None:
        return BenchRow(op, backend, label, str(device), math.nan, math.nan, math.nan, math.nan,
                        math.nan, math.nan, math.nan, "-", repro, error)
    sec = t.median_us * 1e-6
    tflops = cost.flops / sec / 1e12 if sec > 0 else math.nan
    gbps = cost.bytes / sec / 1e9 if sec > 0 else math.nan
    return BenchRow(op, backend, label, str(device), round(t.median_us, 2), round(t.p10_us, 2),
                    round(t.p90_us, 2), round(tflops, 3), round(gbps, 1),
                    round(100 * gbps / ceilings.copy_gbps, 1),
                    round(100 * tflops / ceilings.gemm_tflops, 1), t.method, repro, error)


def write_json(path: str, rows: list[BenchRow], ceilings: Ceilings) -> None:
    with open(path, "w") as f:
        json.dump({"ceilings": asdict(ceilings), "rows": [asdict(r) for r in rows]}, f, indent=2)


def write_csv(path: str, rows: list[BenchRow], ceilings: Ceilings) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        fields = list(asdict(rows[0]).keys()) if rows else list(BenchRow.__dataclass_fields__)
        w.writerow(fields + ["ceiling_copy_gbps", "ceiling_gemm_tflops", "ceiling_device"])
        for r in rows:
            w.writerow(list(asdict(r).values()) + [ceilings.copy_gbps, ceilings.gemm_tflops, ceilings.device])
