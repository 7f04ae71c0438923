"""Timing of one kernel call: CUDA events (or graph replay) on GPU, wall clock on CPU.

GPU: warm-up first (compilation, caches), then each timed call is preceded by an L2 flush outside
the timed region, and inputs rotate over several copies when they would fit in L2; the median and
the 10th/90th percentiles are reported.

The flush is, by default, a write over a buffer larger than L2, as ``triton.testing.do_bench``
does (and so the anchors of ../shared/anchors). It leaves L2 full of dirty lines, and a kernel
that streams more than L2 holds writes them back as it evicts them, sharing DRAM with the call's
reads: 5.7-7.9 µs a call on an H200 (~24-34 MB of write-back; docs/perf/cute.md, run 43).
``flush_l2="read"`` reads the buffer instead, leaving clean lines, to show how much that is.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timing:
    median_us: float
    p10_us: float
    p90_us: float
    iters: int
    method: str  # "cuda-events", "cuda-graph", "wall-clock"


def _summary(samples_us: list[float], method: str) -> Timing:
    s = sorted(samples_us)
    n = len(s)
    return Timing(statistics.median(s), s[int(0.1 * (n - 1))], s[int(0.9 * (n - 1))], n, method)


FLUSH_MODES = ("write", "read")


def time_calls(calls: Sequence[Callable[[], None]], device: torch.device, *, warmup: int = 5,
               iters: int = 50, flush_l2: bool | str = True, cuda_graph: bool = False,
               max_seconds: float = 10.0) -> Timing:
    """Time ``calls`` (one per rotated input set), cycling through them. ``flush_l2``: True or
    "write" (the default: a write over a buffer larger than L2 before each call), "read" (a read
    of it: clean lines), False (none)."""
    if flush_l2 is True:
        flush_l2 = "write"
    if flush_l2 not in (False, None) and flush_l2 not in FLUSH_MODES:
        raise ValueError(f"flush_l2 must be True, False or one of {FLUSH_MODES}, got {flush_l2!r}")
    if device.type != "cuda":
        return _time_cpu(calls, warmup=min(warmup, 2), iters=iters, max_seconds=max_seconds)
    return _time_cuda(calls, device, warmup=warmup, iters=iters, flush_l2=flush_l2,
                      cuda_graph=cuda_graph, max_seconds=max_seconds)


def _time_cpu(calls, *, warmup: int, iters: int, max_seconds: float) -> Timing:
    for i in range(warmup):
        calls[i % len(calls)]()
    samples = []
    deadline = time.perf_counter() + max_seconds
    for i in range(iters):
        t0 = time.perf_counter()
        calls[i % len(calls)]()
        samples.append((time.perf_counter() - t0) * 1e6)
        if time.perf_counter() > deadline and len(samples) >= 3:
            break
    return _summary(samples, "wall-clock")


_flush_buffers: dict[torch.device, torch.Tensor] = {}


def _l2_flush_buffer(device: torch.device) -> torch.Tensor:
    if device not in _flush_buffers:
        props = torch.cuda.get_device_properties(device)
        size = max(2 * getattr(props, "L2_cache_size", 64 << 20), 256 << 20)
        _flush_buffers[device] = torch.empty(size // 4, dtype=torch.int32, device=device)
    return _flush_buffers[device]


def make_l2_flush(buffer: torch.Tensor | None, mode, scratch: torch.Tensor | None) -> Callable[[], None]:
    """The flush before one timed call over ``buffer`` (larger than L2): "write" zeroes it,
    "read" reduces it into the int64 scalar ``scratch`` (no allocation per call), falsy does
    nothing. A function of its own so that CPU tests run the same code (a first read flush used
    an overload of ``torch.sum`` that does not exist and failed only on the device, run 43)."""
    if mode == "write":
        return buffer.zero_
    if mode == "read":
        flat = buffer.view(torch.int64)
        # a reduction reads every line; sum's out= form needs a dim
        return lambda: torch.sum(flat, dim=0, out=scratch)
    return lambda: None


def _time_cuda(calls, device, *, warmup, iters, flush_l2, cuda_graph, max_seconds) -> Timing:
    torch.cuda.synchronize(device)
    for i in range(warmup):
        calls[i % len(calls)]()
    torch.cuda.synchronize(device)
    method = "cuda-events"
    runners: Sequence[Callable[[], None]] = calls
    if cuda_graph:
        graphs = []
        stream = torch.cuda.Stream(device)
        with torch.cuda.stream(stream):
            for c in calls:  # warm once on the side stream, then capture
                c()
        torch.cuda.synchronize(device)
        for c in calls:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                c()
            graphs.append(g)
        runners = [g.replay for g in graphs]
        method = "cuda-graph"
    flush = _l2_flush_buffer(device) if flush_l2 else None
    flush_sum = torch.zeros((), dtype=torch.int64, device=device) if flush_l2 == "read" else None
    flush_l2_now = make_l2_flush(flush, flush_l2, flush_sum)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    t_end = time.perf_counter() + max_seconds
    done = 0
    for i in range(iters):
        flush_l2_now()
        starts[i].record()
        runners[i % len(runners)]()
        ends[i].record()
        done += 1
        if time.perf_counter() > t_end and done >= 5:
            break
    torch.cuda.synchronize(device)
    samples = [starts[i].elapsed_time(ends[i]) * 1e3 for i in range(done)]
    return _summary(samples, method)
