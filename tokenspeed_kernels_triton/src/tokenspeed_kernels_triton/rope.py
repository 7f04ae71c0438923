"""Triton ``rope``: one program rotates BLOCK_H heads of one token, q and k in one launch.

The token's cos/sin row is read once per program; each head row is read and written once with
contiguous (vectorisable) accesses: ``neox`` loads the two halves, ``gptj`` loads the whole row and
splits the interleaved pairs in registers. Float32 math. In place is safe (q_out may be q): every
element is loaded before the program stores it, and no other program touches it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TILE_ELEMS = 4096  # head elements per program


@triton.jit
def rope_kernel(q_ptr, k_ptr, q_out_ptr, k_out_ptr, positions_ptr, cache_ptr, Hq, Hk, cache_row_stride,
                HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, NEOX: tl.constexpr):
    t = tl.program_id(0)
    hb = tl.program_id(1)
    q_blocks = tl.cdiv(Hq, BLOCK_H)
    if hb < q_blocks:
        src, dst, H, h0 = q_ptr, q_out_ptr, Hq, hb * BLOCK_H
    else:
        src, dst, H, h0 = k_ptr, k_out_ptr, Hk, (hb - q_blocks) * BLOCK_H
    heads = h0 + tl.arange(0, BLOCK_H)
    head_ok = heads < H
    row = (t.to(tl.int64) * H + heads) * (2 * HALF)  # start of each head's rotary vector

    pos = tl.load(positions_ptr + t)
    i = tl.arange(0, BLOCK_HALF)
    i_ok = i < HALF
    cache_row = cache_ptr + pos * cache_row_stride
    cos = tl.load(cache_row + i, mask=i_ok, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(cache_row + HALF + i, mask=i_ok, other=0.0).to(tl.float32)[None, :]

    if NEOX:
        mask = head_ok[:, None] & i_ok[None, :]
        offs = row[:, None] + i[None, :]
        a = tl.load(src + offs, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(src + offs + HALF, mask=mask, other=0.0).to(tl.float32)
        tl.store(dst + offs, (a * cos - b * sin).to(dst.dtype.element_ty), mask=mask)
        tl.store(dst + offs + HALF, (b * cos + a * sin).to(dst.dtype.element_ty), mask=mask)
    else:
        j = tl.arange(0, 2 * BLOCK_HALF)
        mask = head_ok[:, None] & (j < 2 * HALF)[None, :]
        offs = row[:, None] + j[None, :]
        x = tl.load(src + offs, mask=mask, other=0.0).to(tl.float32)
        a, b = tl.split(tl.reshape(x, [BLOCK_H, BLOCK_HALF, 2]))
        y = tl.reshape(tl.join(a * cos - b * sin, b * cos + a * sin), [BLOCK_H, 2 * BLOCK_HALF])
        tl.store(dst + offs, y.to(dst.dtype.element_ty), mask=mask)


def launch_config(Hq: int, Hk: int, Dr: int) -> dict:
    block_half = max(1, triton.next_power_of_2(Dr // 2))
    block_h = max(1, min(triton.next_power_of_2(max(Hq, Hk)), TILE_ELEMS // (2 * block_half)))
    num_warps = max(1, min(8, block_h * block_half * 2 // 512))
    return dict(BLOCK_H=block_h, BLOCK_HALF=block_half, num_warps=num_warps)


def rope(q, k, positions, cos_sin_cache, q_out, k_out, style="neox"):
    """rope through Triton; destination passing (see tokenspeed_core.ops.rope)."""
    T, Hq, Dr = q.shape
    Hk = k.shape[1]
    if T == 0:
        return
    cfg = launch_config(Hq, Hk, Dr)
    grid = (T, triton.cdiv(Hq, cfg["BLOCK_H"]) + triton.cdiv(Hk, cfg["BLOCK_H"]))
    rope_kernel[grid](q, k, q_out, k_out, positions, cos_sin_cache, Hq, Hk, cos_sin_cache.stride(0),
                      HALF=Dr // 2, NEOX=style == "neox", **cfg)


def compile_targets() -> list[tuple]:
    """(jit function, signature, constexprs) variants for the ahead-of-time GPU compile test."""
    targets = []
    for dtype, cache in (("*bf16", "*fp32"), ("*fp16", "*fp16"), ("*fp32", "*fp32")):
        for neox in (False, True):
            sig = {"q_ptr": dtype, "k_ptr": dtype, "q_out_ptr": dtype, "k_out_ptr": dtype,
                   "positions_ptr": "*i64", "cache_ptr": cache, "Hq": "i32", "Hk": "i32",
                   "cache_row_stride": "i32", "HALF": "constexpr", "BLOCK_H": "constexpr",
                   "BLOCK_HALF": "constexpr", "NEOX": "constexpr"}
            targets.append((rope_kernel, sig, dict(HALF=32, BLOCK_H=64, BLOCK_HALF=32, NEOX=neox)))
    return targets


def register(registry, common) -> None:
    registry.register("rope", rope, dtypes=(torch.float32, torch.float16, torch.bfloat16),
                      doc="Triton rope: neox and gptj pairs, q and k in one launch", **common.kwargs())
