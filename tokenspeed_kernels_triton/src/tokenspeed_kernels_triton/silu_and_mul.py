"""Triton ``silu_and_mul``: out = silu(gate) * up, one read of each input element, one write.

A 2-D grid (token, column block) with BLOCK columns per program: the gate and up halves of a row
are two contiguous loads, so N divisible by 8 (bf16) gives 16-byte accesses. Float32 math.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_BLOCK = 2048


@triton.jit
def silu_and_mul_kernel(x_ptr, out_ptr, N, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    gate = tl.load(x_ptr + t * 2 * N + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + t * 2 * N + N + cols, mask=mask, other=0.0).to(tl.float32)
    y = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + t * N + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def launch_config(N: int) -> dict:
    block = max(16, min(MAX_BLOCK, triton.next_power_of_2(N)))
    return dict(BLOCK=block, num_warps=max(1, min(8, block // 256)))


def silu_and_mul(x, out):
    """silu_and_mul through Triton; destination passing (see tokenspeed_core.ops.silu_and_mul)."""
    T, _, N = x.shape
    if T == 0 or N == 0:
        return
    cfg = launch_config(N)
    silu_and_mul_kernel[(T, triton.cdiv(N, cfg["BLOCK"]))](x, out, N, **cfg)


def compile_targets() -> list[tuple]:
    """(jit function, signature, constexprs) variants for the ahead-of-time GPU compile test."""
    return [(silu_and_mul_kernel, {"x_ptr": d, "out_ptr": d, "N": "i32", "BLOCK": "constexpr"},
             dict(BLOCK=2048)) for d in ("*bf16", "*fp16", "*fp32")]


def register(registry, common) -> None:
    registry.register("silu_and_mul", silu_and_mul, dtypes=(torch.float32, torch.float16, torch.bfloat16),
                      doc="Triton silu_and_mul: one pass, float32 math", **common.kwargs())
