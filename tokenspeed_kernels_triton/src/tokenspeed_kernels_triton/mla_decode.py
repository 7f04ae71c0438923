"""``mla_decode`` in Triton: split-KV with query-axis folding, and a log-sum-exp combine.

The kernels live in ``_mla_decode_kernels.py`` (imported on first call, so registering never needs
triton or a GPU). This module holds what the host decides:

- ``pick_config``: the tile shape for a call's static dims (folded rows q_len x H, dtypes);
- ``plan_splits``: how many KV splits per request. It depends on the batch size, the page-table
  width (an upper bound of the lengths), the static dims and the SM count only, never on
  ``cache_seqlens`` values: no host sync, and a CUDA graph captured once stays valid;
- ``mla_decode_triton``: the registered implementation (destination passing);
- ``compile_targets``: kernel specs that CI compiles for sm_90 and sm_100 without a GPU.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from .plugin import sm_count

OP = "mla_decode"
SUPPORTED_Q = (torch.bfloat16, torch.float16, torch.float32)
MAX_SPLITS = 256
MAX_BLOCK_M = 64  # folded query rows per program: a 64 x 512 fp32 accumulator is 128 regs/thread at 8 warps


@dataclass(frozen=True)
class Config:
    """Tile shape and launch parameters of stage 1."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    dv_halves: bool = False  # two programs per row block, each owning half of the latent output
    # resident programs per SM (registers / shared memory of the compiled kernel, read off
    # cuobjdump on sm_90); the planner fills ctas_per_sm x SMs slots
    ctas_per_sm: int = 1
    # transposed stage 1 (``mla_decode_split_kernel_t``): KV rows on the MMA M side, so 16 folded
    # query rows still get warpgroup MMAs; block_m is then the query rows per program (MMA N)
    transposed: bool = False
    ablate: int = 0  # benchmark only: 1 drops the PV product, 2 the QK product (wrong results)
    maxnreg: int | None = None  # register cap (ptxas), to fit more programs per SM

    def __post_init__(self):
        if self.transposed and self.dv_halves:
            raise ValueError("the transposed kernel owns the whole latent output")

    def describe(self) -> str:
        h = "/dv2" if self.dv_halves else ""
        t = "/T" if self.transposed else ""
        a = f"/ablate{self.ablate}" if self.ablate else ""
        r = f"/r{self.maxnreg}x{self.ctas_per_sm}" if self.maxnreg else ""
        return f"M{self.block_m}/N{self.block_n}/w{self.num_warps}/s{self.num_stages}{h}{t}{a}{r}"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def pick_config(rows: int, q_dtype: torch.dtype, cache_dtype: torch.dtype, policy: str | None = None) -> Config:
    """Tiles for ``rows`` = q_len x H folded query rows (see docs/perf/triton-mla-decode.md).

    ``policy`` names a candidate tiling under evaluation (``POLICIES``); None is the default."""
    block_m = min(MAX_BLOCK_M, max(16, _pow2(rows)))
    if q_dtype == torch.float32:  # CPU tests and odd callers: correctness, not speed
        return Config(block_m, 32, 4, 1)
    if policy is not None:
        cfg = POLICIES[policy](block_m)
        if cfg is not None:
            return cfg
    if block_m == 16:  # mma.sync path: one KV buffer per program, so occupancy carries the bytes in flight
        if cache_dtype == torch.float8_e4m3fn:
            return Config(16, 32, 4, 2, ctas_per_sm=2)  # 197 regs x 128 threads, 56 KB smem
        # capped at 168 regs (168 B stack) so 3 programs share an SM: 65.7 -> 68.4% of copy on
        # H200 (b64 s16K); the fp8 cache measured 1% slower capped, so it keeps 2 programs
        return Config(16, 32, 4, 2, ctas_per_sm=3, maxnreg=168)
    if block_m == 32:
        return Config(32, 64, 8, 2)  # 198 regs, 112 KB smem
    return Config(64, 64, 8, 2)  # wgmma; 64 KV rows a step: 1.28-1.38x the 32-row step on H200 sweeps


# Candidate tilings (block_m -> Config, or None for the default's choice), selected with
# ``mla_decode_triton(..., policy=name)``; the GPU bench checks each on the full grid before one
# may become the default.
POLICIES = {
    # transposed kernel for 16 folded rows (q_len 1, H 16): wgmma instead of mma.sync.
    # sm_90 offline (triton 3.9): w4 255 regs + 40 B stack, 164 KB smem; w8 206 regs, no spill
    "t16w4": lambda bm: Config(16, 64, 4, 2, transposed=True) if bm == 16 else None,
    "t16w8": lambda bm: Config(16, 64, 8, 2, transposed=True) if bm == 16 else None,
    # ... and 32-row transposed programs (8 warps, 255 regs, no spill) for every larger row count:
    # QK computed once per 32 rows, the 512-column PV split over two warpgroups
    "t32w8": lambda bm: (Config(16, 64, 8, 2, transposed=True) if bm == 16
                         else Config(32, 64, 8, 2, transposed=True)),
    # the default 16-row tile under a register cap, so 3 (168 regs, 168 B stack) or 4 (128 regs,
    # 376 B stack) programs fit an SM instead of 2: more KV tiles in flight per SM
    "r168": lambda bm: Config(16, 32, 4, 2, ctas_per_sm=3, maxnreg=168) if bm == 16 else None,
    "r128": lambda bm: Config(16, 32, 4, 2, ctas_per_sm=4, maxnreg=128) if bm == 16 else None,
}


def plan_splits(batch: int, m_blocks: int, max_rows: int, block_n: int, sm_count: int, *,
                rows: int = 16, dv: int = 512, row_bytes: int = 1152) -> int:
    """KV splits per request, from shapes only (graph-capturable).

    Cost model in units of one KV tile streamed by every SM: programs run in waves of
    ``sm_count``; a wave costs its longest split (``ceil(tiles / splits)``) plus a fixed
    per-program overhead (query load, pipeline fill, epilogue). More than one split adds a launch
    and the fp32 partial results written and read back by the combine pass. ``max_rows``
    (page-table width x page size) stands in for the lengths, which the host must not read.
    ``rows`` = q_len x H folded query rows, ``row_bytes`` = bytes of one cache row.
    """
    if batch == 0 or max_rows <= 0:
        return 1
    tiles = math.ceil(max_rows / block_n)
    base = batch * m_blocks
    wave_bytes = sm_count * block_n * row_bytes  # bytes one tile-wave moves
    best, best_cost = 1, None
    for splits in range(1, min(tiles, MAX_SPLITS) + 1):
        waves = math.ceil(base * splits / sm_count)
        cost = waves * (math.ceil(tiles / splits) + 2.0)
        if splits > 1:
            cost += 1.0 + batch * rows * splits * dv * 8 / wave_bytes
        if best_cost is None or cost < best_cost * 0.98:
            best, best_cost = splits, cost
    return best


def _supports(sig) -> str | None:
    d, dv = sig.dim("D"), sig.dim("Dv")
    dr = d - dv
    if dv & (dv - 1) or not 16 <= dv <= 512:
        return f"latent width Dv={dv} must be a power of two in [16, 512]"
    if dr & (dr - 1) or not 16 <= dr <= 256:
        return f"rope width D-Dv={dr} must be a power of two in [16, 256]"
    if sig.dtype("q") not in SUPPORTED_Q:
        return f"q dtype {sig.dtype('q')} not supported"
    if sig.dtype("kv_cache") == torch.float8_e4m3fn and sig.device == "cuda" and sig.capability \
            and sig.capability < (8, 9):
        return "an fp8 e4m3 cache needs sm_89 or newer"
    return None


def mla_decode_triton(q, kv_cache, page_table, cache_seqlens, out, lse, softmax_scale,
                      head_dim_v=512, kv_scale=1.0, *, config: Config | None = None,
                      num_splits: int | None = None, policy: str | None = None) -> None:
    """Triton MLA decode; writes ``out`` and ``lse``. ``config``/``num_splits``/``policy``
    override the plan (tests and the benchmark sweep)."""
    from . import _mla_decode_kernels as K

    B, q_len, H, D = q.shape
    if B == 0:
        return
    rows = q_len * H
    dv = head_dim_v
    cfg = config or pick_config(rows, q.dtype, kv_cache.dtype, policy)
    m_blocks = math.ceil(rows / cfg.block_m)
    dv_blocks = 2 if cfg.dv_halves else 1
    page_size = kv_cache.shape[1]
    if num_splits is None:
        num_splits = plan_splits(B, m_blocks * dv_blocks, page_table.shape[1] * page_size, cfg.block_n,
                                 sm_count(q.device) * cfg.ctas_per_sm, rows=rows, dv=dv,
                                 row_bytes=D * kv_cache.element_size())
    upcast = _interpreting() or q.dtype == torch.float32
    ieee = q.dtype == torch.float32
    qk_scale = float(softmax_scale) * float(kv_scale) * K.LOG2E
    split = num_splits > 1
    if split:
        part_out = torch.empty((B, rows, num_splits, dv), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((B, rows, num_splits), dtype=torch.float32, device=q.device)
        dst_out, dst_lse = part_out, part_lse
    else:
        dst_out, dst_lse = out, lse
    extra = {"maxnreg": cfg.maxnreg} if cfg.maxnreg else {}
    args = (q, kv_cache, page_table, cache_seqlens, dst_out, dst_lse, qk_scale, float(kv_scale),
            q_len, H, page_size, page_table.shape[1], num_splits)
    if cfg.transposed:
        K.mla_decode_split_kernel_t[(m_blocks, num_splits, B)](
            *args, D=D, DV=dv, BLOCK_H=cfg.block_m, BLOCK_N=cfg.block_n,
            SPLIT=split, UPCAST=upcast, IEEE=ieee, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **extra,
        )
    else:
        K.mla_decode_split_kernel[(m_blocks * dv_blocks, num_splits, B)](
            *args, D=D, DV=dv, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_DV=dv // dv_blocks,
            SPLIT=split, UPCAST=upcast, IEEE=ieee, ABLATE=cfg.ablate,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **extra,
        )
    if split:
        block_dv = min(dv, 128)
        K.mla_decode_combine_kernel[(B * rows, dv // block_dv)](
            part_out, part_lse, out, lse, num_splits,
            DV=dv, BLOCK_DV=block_dv, BLOCK_S=_pow2(num_splits), CHUNK_S=8, num_warps=4,
        )


def register(registry, common) -> None:
    registry.register(
        OP, mla_decode_triton, supports=_supports,
        doc="Triton split-KV MLA decode, q_len x heads folded into the dot M axis",
        **common.kwargs(),
    )


def compile_targets() -> list[tuple]:
    """(jit fn, signature, constexprs, options) that CI compiles for sm_90 and sm_100 without a GPU
    (``tests/triton/test_compile_gpu_targets.py``): the tile configs the planner picks for
    DeepSeek-V3 decode (bf16 and fp8 caches; 16, 32 and 64 folded query rows), and the combine."""
    from . import _mla_decode_kernels as K

    def split_target(q_ty: str, kv_ty: str, cfg: Config, split: bool) -> tuple:
        sig = {
            "q_ptr": f"*{q_ty}", "kv_ptr": f"*{kv_ty}", "page_table_ptr": "*i32", "seqlens_ptr": "*i32",
            "out_ptr": "*fp32" if split else f"*{q_ty}", "lse_ptr": "*fp32", "qk_scale": "fp32",
            "v_scale": "fp32", "q_len": "i32", "num_heads": "i32", "page_size": "i32",
            "page_table_stride": "i32", "num_splits": "i32",
            "D": "constexpr", "DV": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
            "BLOCK_DV": "constexpr", "SPLIT": "constexpr", "UPCAST": "constexpr", "IEEE": "constexpr",
            "ABLATE": "constexpr",
        }
        consts = dict(D=576, DV=512, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                      BLOCK_DV=256 if cfg.dv_halves else 512, SPLIT=split, UPCAST=False, IEEE=False, ABLATE=0)
        fn = K.mla_decode_split_kernel
        if cfg.transposed:  # same arguments, BLOCK_M renamed BLOCK_H, no BLOCK_DV / ABLATE
            fn = K.mla_decode_split_kernel_t
            sig = {("BLOCK_H" if k == "BLOCK_M" else k): v for k, v in sig.items()
                   if k not in ("BLOCK_DV", "ABLATE")}
            consts = {("BLOCK_H" if k == "BLOCK_M" else k): v for k, v in consts.items()
                      if k not in ("BLOCK_DV", "ABLATE")}
        opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        if cfg.maxnreg:
            opts["maxnreg"] = cfg.maxnreg
        return (fn, sig, consts, opts)

    bf16, fp8 = torch.bfloat16, torch.float8_e4m3fn
    targets = [
        split_target("bf16", "bf16", pick_config(16, bf16, bf16), False),
        split_target("bf16", "bf16", pick_config(32, bf16, bf16), True),
        split_target("bf16", "bf16", pick_config(64, bf16, bf16), True),
        split_target("fp16", "fp8e4nv", pick_config(16, torch.float16, fp8), True),
        split_target("bf16", "fp8e4nv", pick_config(64, bf16, fp8), False),
    ]
    for policy in POLICIES:  # candidate tilings must compile too
        for rows in (16, 64):
            cfg = pick_config(rows, bf16, bf16, policy)
            if cfg.transposed:
                targets.append(split_target("bf16", "bf16", cfg, True))
    targets.append(split_target("bf16", "fp8e4nv", pick_config(16, bf16, fp8, "t16w4"), True))
    combine_sig = {"part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "out_ptr": "*bf16", "lse_ptr": "*fp32",
                   "num_splits": "i32", "DV": "constexpr", "BLOCK_DV": "constexpr", "BLOCK_S": "constexpr",
                   "CHUNK_S": "constexpr"}
    targets.append((K.mla_decode_combine_kernel, combine_sig,
                    dict(DV=512, BLOCK_DV=128, BLOCK_S=128, CHUNK_S=8), {"num_warps": 4}))
    return targets
