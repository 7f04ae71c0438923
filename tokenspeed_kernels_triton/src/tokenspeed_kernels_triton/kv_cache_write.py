"""Triton ``kv_cache_write``: scatter rows into the paged cache by slot, fp8 e4m3 quantisation.

The cache is contiguous [P, page_size, D], so slot s starts at element s * D whatever the page
size. A program moves BLOCK_T rows; a row whose slot is -1 is neither read nor written, and no
other cache row is touched. fp8: kv * (1 / kv_scale) in float32 (within an ulp of the spec's
quotient), clamped to +-448, rounded once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_MAX = 448.0
TILE_ELEMS = 4096


@triton.jit
def _round_to_e4m3(v):
    """v (float32, |v| <= 448) rounded to nearest even e4m3, still as float32.

    Only for the CPU interpreter, whose float32 -> e4m3 conversion drops the carry out of the
    mantissa (1.98 becomes 1.0, triton 3.9): handing it exact e4m3 values sidesteps that. GPUs
    convert with cvt.rn.satfinite and skip this.
    """
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000  # keep 3 mantissa bits, RNE
    normal = bits.to(tl.float32, bitcast=True)
    a = tl.abs(v)
    sub = (a + 16384.0) - 16384.0  # below 2^-6 e4m3 steps by 2^-9: round to a multiple of it
    sub = (sub.to(tl.uint32, bitcast=True) | (bits & 0x80000000)).to(tl.float32, bitcast=True)  # keep -0
    return tl.where(a >= 0.015625, normal, sub)


@triton.jit
def kv_cache_write_kernel(kv_ptr, slot_ptr, cache_ptr, T, D, inv_scale,
                          FP8: tl.constexpr, SCALE: tl.constexpr, BLOCK_T: tl.constexpr,
                          BLOCK_D: tl.constexpr, ROUND_E4M3: tl.constexpr = False):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    slots = tl.load(slot_ptr + rows, mask=rows < T, other=-1)
    row_ok = slots >= 0
    src_row = rows.to(tl.int64) * D
    dst_row = slots * D  # int64 slots: no overflow on large caches
    for start in range(0, D, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (cols < D)[None, :]
        v = tl.load(kv_ptr + src_row[:, None] + cols[None, :], mask=mask, other=0.0)
        if SCALE:
            v = v.to(tl.float32) * inv_scale
        if FP8:
            v = tl.clamp(v.to(tl.float32), -448.0, 448.0)
            if ROUND_E4M3:
                v = _round_to_e4m3(v)
        tl.store(cache_ptr + dst_row[:, None] + cols[None, :], v.to(cache_ptr.dtype.element_ty), mask=mask)


def launch_config(T: int, D: int) -> dict:
    block_d = max(16, min(1024, triton.next_power_of_2(D)))
    block_t = max(1, min(TILE_ELEMS // block_d, triton.next_power_of_2(max(T, 1))))
    return dict(BLOCK_T=block_t, BLOCK_D=block_d, num_warps=max(1, min(8, block_t * block_d // 512)))


def kv_cache_write(kv, slot_mapping, kv_cache, kv_scale=1.0):
    """kv_cache_write through Triton; destination passing (see tokenspeed_core.ops.kv_cache_write)."""
    T, D = kv.shape
    if T == 0:
        return
    cfg = launch_config(T, D)
    fp8 = kv_cache.dtype == torch.float8_e4m3fn
    kv_cache_write_kernel[(triton.cdiv(T, cfg["BLOCK_T"]),)](
        kv, slot_mapping, kv_cache, T, D, 1.0 / kv_scale, FP8=fp8, SCALE=kv_scale != 1.0,
        ROUND_E4M3=fp8 and kv.device.type == "cpu", **cfg)


def compile_targets() -> list[tuple]:
    """(jit function, signature, constexprs) variants for the ahead-of-time GPU compile test."""
    targets = []
    for kv, cache, fp8, scale in (("*bf16", "*bf16", False, False), ("*fp16", "*fp16", False, True),
                                  ("*fp32", "*fp32", False, False), ("*bf16", "*fp8e4nv", True, True),
                                  ("*fp16", "*fp8e4nv", True, True)):
        sig = {"kv_ptr": kv, "slot_ptr": "*i64", "cache_ptr": cache, "T": "i32", "D": "i32",
               "inv_scale": "fp32", "FP8": "constexpr", "SCALE": "constexpr", "BLOCK_T": "constexpr",
               "BLOCK_D": "constexpr", "ROUND_E4M3": "constexpr"}
        targets.append((kv_cache_write_kernel, sig, dict(FP8=fp8, SCALE=scale, BLOCK_T=4, BLOCK_D=1024,
                                                         ROUND_E4M3=False)))
    return targets


def register(registry, common) -> None:
    registry.register("kv_cache_write", kv_cache_write, dtypes=(torch.float32, torch.float16, torch.bfloat16),
                      doc="Triton kv_cache_write: slot scatter, -1 skips, fp8 e4m3 with a scale",
                      **common.kwargs())
