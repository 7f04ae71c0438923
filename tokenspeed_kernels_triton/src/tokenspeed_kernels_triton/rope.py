"""Triton ``rope``: one program rotates BLOCK_H q heads of one token (the first also its k heads).

The token's cos/sin row is read once per program; each head row is read and written once with
contiguous (vectorisable) accesses: ``neox`` loads the two halves, ``gptj`` loads the whole row and
splits the interleaved pairs in registers. Float32 math. In place is safe (q_out may be q): every
element is loaded before the program stores it, and no other program touches it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TILE_ELEMS = 8192  # q head elements per program (128 heads of 64)


@triton.jit
def _rotate_heads(src, dst, row, head_ok, cos, sin, HALF: tl.constexpr, BLOCK: tl.constexpr,
                  BLOCK_HALF: tl.constexpr, NEOX: tl.constexpr):
    """Rotate the head rows starting at ``row`` (one token's heads) from src into dst."""
    i = tl.arange(0, BLOCK_HALF)
    if NEOX:
        mask = head_ok[:, None] & (i < HALF)[None, :]
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
        a, b = tl.split(tl.reshape(x, [BLOCK, BLOCK_HALF, 2]))
        y = tl.reshape(tl.join(a * cos - b * sin, b * cos + a * sin), [BLOCK, 2 * BLOCK_HALF])
        tl.store(dst + offs, y.to(dst.dtype.element_ty), mask=mask)


@triton.jit
def rope_kernel(q_ptr, k_ptr, q_out_ptr, k_out_ptr, positions_ptr, cache_ptr, Hq, Hk, cache_row_stride,
                HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
                NEOX: tl.constexpr):
    # Program (t, hb) rotates q heads [hb * BLOCK_H, +BLOCK_H) of token t; program (t, 0) also
    # rotates all of the token's k heads. MLA has one k head beside 16-128 q heads: a program of
    # its own per token for it (an earlier layout) was a third of the programs for 1% of the bytes.
    t = tl.program_id(0)
    hb = tl.program_id(1)
    pos = tl.load(positions_ptr + t)
    i = tl.arange(0, BLOCK_HALF)
    i_ok = i < HALF
    cache_row = cache_ptr + pos * cache_row_stride
    cos = tl.load(cache_row + i, mask=i_ok, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(cache_row + HALF + i, mask=i_ok, other=0.0).to(tl.float32)[None, :]

    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    _rotate_heads(q_ptr, q_out_ptr, (t.to(tl.int64) * Hq + heads) * (2 * HALF), heads < Hq, cos, sin,
                  HALF, BLOCK_H, BLOCK_HALF, NEOX)
    if hb == 0:
        for h0 in range(0, Hk, BLOCK_HK):
            k_heads = h0 + tl.arange(0, BLOCK_HK)
            _rotate_heads(k_ptr, k_out_ptr, (t.to(tl.int64) * Hk + k_heads) * (2 * HALF), k_heads < Hk, cos,
                          sin, HALF, BLOCK_HK, BLOCK_HALF, NEOX)


def launch_config(Hq: int, Hk: int, Dr: int) -> dict:
    block_half = max(1, triton.next_power_of_2(Dr // 2))
    max_heads = max(1, TILE_ELEMS // (2 * block_half))
    block_h = min(triton.next_power_of_2(max(Hq, 1)), max_heads)
    block_hk = min(triton.next_power_of_2(max(Hk, 1)), max_heads)
    num_warps = max(1, min(8, block_h * block_half * 2 // 512))
    return dict(BLOCK_H=block_h, BLOCK_HK=block_hk, BLOCK_HALF=block_half, num_warps=num_warps)


def rope(q, k, positions, cos_sin_cache, q_out, k_out, style="neox"):
    """rope through Triton; destination passing (see tokenspeed_core.ops.rope)."""
    T, Hq, Dr = q.shape
    Hk = k.shape[1]
    if T == 0:
        return
    cfg = launch_config(Hq, Hk, Dr)
    grid = (T, max(1, triton.cdiv(Hq, cfg["BLOCK_H"])))
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
                   "BLOCK_HK": "constexpr", "BLOCK_HALF": "constexpr", "NEOX": "constexpr"}
            targets.append((rope_kernel, sig, dict(HALF=32, BLOCK_H=128, BLOCK_HK=1, BLOCK_HALF=32, NEOX=neox)))
    return targets


def register(registry, common) -> None:
    registry.register("rope", rope, dtypes=(torch.float32, torch.float16, torch.bfloat16),
                      doc="Triton rope: neox and gptj pairs, q and k in one launch", **common.kwargs())
