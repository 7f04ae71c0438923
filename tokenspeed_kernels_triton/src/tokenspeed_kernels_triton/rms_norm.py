"""Triton ``rms_norm`` (+ fused residual add): one pass over the rows, float32 math.

A program normalises BLOCK_T whole rows held in registers (one read of x and residual, one write
of out and, with a residual, residual_out: the op's minimum traffic). Rows wider than ONE_PASS_MAX
elements take a second sweep that re-reads residual_out (written in the first sweep, ordered by a
CTA barrier), since re-reading ``residual`` would be wrong when residual_out aliases it; without a
residual the second sweep re-reads x.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ONE_PASS_MAX = 16384  # widest row (elements) kept in registers
TILE_ELEMS = 4096  # elements per program when rows are narrow


@triton.jit
def rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr, T, N, eps,
                    HAS_RESIDUAL: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                    ONE_PASS: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    row_start = rows.to(tl.int64) * N
    cols = tl.arange(0, BLOCK_N)
    if ONE_PASS:
        mask = row_ok[:, None] & (cols[None, :] < N)
        offs = row_start[:, None] + cols[None, :]
        s = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            s += tl.load(residual_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            s_stored = s.to(residual_out_ptr.dtype.element_ty)
            tl.store(residual_out_ptr + offs, s_stored, mask=mask)
            s = s_stored.to(tl.float32)  # normalise exactly what the residual stream holds
        inv_rms = tl.rsqrt(tl.sum(s * s, axis=1) / N + eps)
        w = tl.load(weight_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
        y = s * inv_rms[:, None] * w[None, :]
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        sum_sq = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = row_ok[:, None] & (c[None, :] < N)
            offs = row_start[:, None] + c[None, :]
            s = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                s += tl.load(residual_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                s_stored = s.to(residual_out_ptr.dtype.element_ty)
                tl.store(residual_out_ptr + offs, s_stored, mask=mask)
                s = s_stored.to(tl.float32)
            sum_sq += s * s
        inv_rms = tl.rsqrt(tl.sum(sum_sq, axis=1) / N + eps)
        tl.debug_barrier()  # this CTA's residual_out stores are visible to all its threads
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = row_ok[:, None] & (c[None, :] < N)
            offs = row_start[:, None] + c[None, :]
            if HAS_RESIDUAL:
                s = tl.load(residual_out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            else:
                s = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(weight_ptr + c, mask=c < N, other=0.0).to(tl.float32)
            y = s * inv_rms[:, None] * w[None, :]
            tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def launch_config(T: int, N: int) -> dict:
    """Block shape and warps for a [T, N] problem."""
    width = max(16, triton.next_power_of_2(N))
    one_pass = width <= ONE_PASS_MAX
    block_n = width if one_pass else ONE_PASS_MAX // 2
    block_t = max(1, min(TILE_ELEMS // block_n, triton.next_power_of_2(max(T, 1))))
    # about 16 elements per thread: two 16-byte loads of bf16 per tensor
    num_warps = max(1, min(16, block_t * block_n // 512))
    return dict(BLOCK_T=block_t, BLOCK_N=block_n, ONE_PASS=one_pass, num_warps=num_warps)


def rms_norm(x, weight, out, residual_out=None, residual=None, eps=1e-6):
    """rms_norm through Triton; destination passing (see tokenspeed_core.ops.rms_norm)."""
    T, N = x.shape
    if T == 0:
        return
    cfg = launch_config(T, N)
    grid = (triton.cdiv(T, cfg["BLOCK_T"]),)
    has_res = residual is not None
    # without a residual the two pointers are never dereferenced (HAS_RESIDUAL is a constexpr)
    rms_norm_kernel[grid](x, residual if has_res else x, weight, out, residual_out if has_res else out,
                          T, N, eps, HAS_RESIDUAL=has_res, **cfg)


def compile_targets() -> list[tuple]:
    """(jit function, signature, constexprs) variants for the ahead-of-time GPU compile test."""
    targets = []
    for dtype in ("*bf16", "*fp16", "*fp32"):
        for has_res, one_pass, block_t, block_n in ((True, True, 1, 8192), (False, True, 8, 512),
                                                    (True, False, 1, 8192)):
            sig = {"x_ptr": dtype, "residual_ptr": dtype, "weight_ptr": dtype, "out_ptr": dtype,
                   "residual_out_ptr": dtype, "T": "i32", "N": "i32", "eps": "fp32",
                   "HAS_RESIDUAL": "constexpr", "BLOCK_T": "constexpr", "BLOCK_N": "constexpr",
                   "ONE_PASS": "constexpr"}
            targets.append((rms_norm_kernel, sig, dict(HAS_RESIDUAL=has_res, BLOCK_T=block_t,
                                                       BLOCK_N=block_n, ONE_PASS=one_pass)))
    return targets


def register(registry, common) -> None:
    registry.register("rms_norm", rms_norm, dtypes=(torch.float32, torch.float16, torch.bfloat16),
                      doc="Triton rms_norm: one pass, rows in registers, fused residual add",
                      **common.kwargs())
