"""Triton ``mla_prefill``: FlashAttention-2 style ragged causal extend attention.

One program computes one block of BLOCK_M query rows of one request for one head, streaming that
request's keys/values in tiles of BLOCK_N with an online softmax (scores never leave registers, so
a 64K-token request costs no extra memory). Causality with the prefix offset: query row i of a
request with prefix P sees keys 0..P+i, so tiles left of the block's first row's diagonal run
without masks, the few tiles across the diagonal run with them, tiles right of it are never
loaded.

Program ids map to (request, query block) without a host sync and without metadata: request b's
blocks are numbered from ``cu_seqlens_q[b] // BLOCK_M + b`` (strictly increasing in b and never
overlapping, since a request adds at most one partial block), so a program finds its request by
binary search over ``cu_seqlens_q`` and the grid is ``T // BLOCK_M + B`` (at most B idle programs).
Programs run latest-block-first (the causal tail does the most work), query blocks fastest and
heads slowest, so programs running together share one head's keys/values in L2.

Head dims: Dqk = 192 is split into two power-of-two dot products (128 + 64), no padding;
other widths are padded to powers of two (at least 16) with masked loads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256  # above this the Q tile and the accumulator no longer fit a Hopper SM


@dataclass(frozen=True)
class Config:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Hopper, Dqk 192 / Dv 128, 16-bit: Q tile 48 KB + 3 stages x (K 24 KB + V 16 KB) = 168 KB smem
HOPPER_16BIT = Config(block_m=128, block_n=64, num_warps=8, num_stages=3)
GENERIC_16BIT = Config(block_m=64, block_n=64, num_warps=4, num_stages=2)
FP32 = Config(block_m=64, block_n=32, num_warps=4, num_stages=2)
# interpreter: small tiles so that small test shapes cross several tiles and the diagonal
INTERPRET = Config(block_m=16, block_n=16, num_warps=4, num_stages=1)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def split_head_dim(d: int) -> tuple[int, int]:
    """(DA, DB): a power-of-two part and a padded power-of-two remainder (0 if none), each >= 16
    (the smallest tl.dot K). 192 -> (128, 64); 48 -> (32, 16); 128 -> (128, 0); 8 -> (16, 0)."""
    if d <= 16:
        return 16, 0
    da = 1 << (d.bit_length() - 1)
    rest = d - da
    if rest == 0:
        return da, 0
    db = max(16, triton.next_power_of_2(rest))
    if da + db >= 2 * da:  # the remainder pads as wide as DA: one padded dot is as cheap
        return 2 * da, 0
    return da, db


def pad_dim(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


@triton.jit
def _scores(qa, qb, kta_ptrs, ktb_ptrs, start_n, offs_n, offs_da, offs_db, col_limit, stride_kt,
            DQK: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, MASKED: tl.constexpr,
            UPCAST: tl.constexpr):
    """q . k for one BLOCK_N tile of keys (unscaled); MASKED: keys at or past col_limit read as 0."""
    col_ok = (start_n + offs_n) < col_limit
    # K^T tile(s): [DA, BLOCK_N] (+ [DB, BLOCK_N]); masks only where a tile or a dim needs them
    if MASKED:
        kta = tl.load(kta_ptrs + start_n * stride_kt, mask=col_ok[None, :] & (offs_da[:, None] < DQK),
                      other=0.0)
    elif DA > DQK:
        kta = tl.load(kta_ptrs + start_n * stride_kt, mask=offs_da[:, None] < DQK, other=0.0)
    else:
        kta = tl.load(kta_ptrs + start_n * stride_kt)
    if UPCAST:
        kta = kta.to(tl.float32)
    s = tl.dot(qa, kta)
    if DB > 0:
        if MASKED:
            ktb = tl.load(ktb_ptrs + start_n * stride_kt,
                          mask=col_ok[None, :] & (offs_db[:, None] < DQK), other=0.0)
        else:
            ktb = tl.load(ktb_ptrs + start_n * stride_kt, mask=offs_db[:, None] < DQK, other=0.0)
        if UPCAST:
            ktb = ktb.to(tl.float32)
        s = tl.dot(qb, ktb, s)
    return s


@triton.jit
def _softmax_pv(acc, m_i, l_i, s, v_ptrs, start_n, offs_n, offs_dv, q_pos, kv_len, qk_scale_log2,
                stride_vt, DV: tl.constexpr, DV_PAD: tl.constexpr, MASKED: tl.constexpr,
                UPCAST: tl.constexpr):
    """Online-softmax update with one tile of scores, then accumulate P @ V."""
    cols = start_n + offs_n
    col_ok = cols < kv_len
    s = s * qk_scale_log2
    if MASKED:
        visible = (cols[None, :] <= q_pos[:, None]) & col_ok[None, :]
        s = tl.where(visible, s, float("-inf"))
    # every row sees key 0 in the first tile it processes, so m_new is finite
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if MASKED:
        v = tl.load(v_ptrs + start_n * stride_vt, mask=col_ok[:, None] & (offs_dv[None, :] < DV),
                    other=0.0)
    elif DV_PAD > DV:
        v = tl.load(v_ptrs + start_n * stride_vt, mask=offs_dv[None, :] < DV, other=0.0)
    else:
        v = tl.load(v_ptrs + start_n * stride_vt)
    if UPCAST:
        v = v.to(tl.float32)
    acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, m_new, l_i


@triton.jit
def _attend_range(acc, m_i, l_i, qa, qb, kta_ptrs, ktb_ptrs, v_ptrs, n_lo, n_hi, offs_n, offs_da,
                  offs_db, offs_dv, q_pos, kv_len, qk_scale_log2, stride_kt, stride_vt,
                  DQK: tl.constexpr, DV: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr,
                  DV_PAD: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                  UPCAST: tl.constexpr):
    """Key tiles [n_lo, n_hi) in steps of BLOCK_N."""
    for start_n in range(n_lo, n_hi, BLOCK_N):
        s = _scores(qa, qb, kta_ptrs, ktb_ptrs, start_n, offs_n, offs_da, offs_db, kv_len,
                    stride_kt, DQK, DA, DB, MASKED, UPCAST)
        acc, m_i, l_i = _softmax_pv(acc, m_i, l_i, s, v_ptrs, start_n, offs_n, offs_dv, q_pos,
                                    kv_len, qk_scale_log2, stride_vt, DV, DV_PAD, MASKED, UPCAST)
    return acc, m_i, l_i


@triton.jit
def mla_prefill_fwd_kernel(
    Q, K, V, CU_Q, CU_KV, Out, Lse,
    qk_scale_log2,  # softmax_scale * log2(e): scores in base-2 units
    batch, search_steps, num_q_programs,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_ot, stride_oh, stride_lt, stride_lh,
    DQK: tl.constexpr, DV: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, DV_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
):
    pid = num_q_programs - 1 - tl.program_id(0)  # latest (heaviest) query blocks first
    head = tl.program_id(1)

    # the request owning this program: the largest b with cu_q[b] // BLOCK_M + b <= pid
    lo = batch * 0
    hi = batch - 1
    for _ in range(search_steps):
        mid = (lo + hi + 1) // 2
        ok = tl.load(CU_Q + mid) // BLOCK_M + mid <= pid
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    q_start = tl.load(CU_Q + lo)
    q_len = tl.load(CU_Q + lo + 1) - q_start
    m_block = pid - (q_start // BLOCK_M + lo)
    if m_block * BLOCK_M >= q_len:  # a spare program (an empty request or a padding id)
        return
    kv_start = tl.load(CU_KV + lo)
    kv_len = tl.load(CU_KV + lo + 1) - kv_start
    prefix = kv_len - q_len

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)  # query rows within the request
    row_ok = offs_m < q_len
    q_pos = prefix + offs_m  # kv position of each query row: it sees keys 0..q_pos
    offs_n = tl.arange(0, BLOCK_N)
    offs_da = tl.arange(0, DA)
    offs_db = DA + tl.arange(0, DB if DB > 0 else 16)
    offs_dv = tl.arange(0, DV_PAD)

    q_rows = Q + (q_start + offs_m).to(tl.int64)[:, None] * stride_qt + head * stride_qh
    qa = tl.load(q_rows + offs_da[None, :], mask=row_ok[:, None] & (offs_da[None, :] < DQK),
                 other=0.0)
    if UPCAST:
        qa = qa.to(tl.float32)
    qb = qa  # placeholder when Dqk needs no second part
    if DB > 0:
        qb = tl.load(q_rows + offs_db[None, :], mask=row_ok[:, None] & (offs_db[None, :] < DQK),
                     other=0.0)
        if UPCAST:
            qb = qb.to(tl.float32)

    k_base = K + kv_start.to(tl.int64) * stride_kt + head * stride_kh
    kta_ptrs = k_base + offs_da[:, None] + offs_n[None, :] * stride_kt
    ktb_ptrs = k_base + offs_db[:, None] + offs_n[None, :] * stride_kt
    v_ptrs = V + kv_start.to(tl.int64) * stride_vt + head * stride_vh \
        + offs_n[:, None] * stride_vt + offs_dv[None, :]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], dtype=tl.float32)

    # keys every row of the block sees (left of the first row's diagonal): no masks
    n_full = (prefix + m_block * BLOCK_M + 1) // BLOCK_N * BLOCK_N
    acc, m_i, l_i = _attend_range(
        acc, m_i, l_i, qa, qb, kta_ptrs, ktb_ptrs, v_ptrs, 0, n_full, offs_n, offs_da, offs_db,
        offs_dv, q_pos, kv_len, qk_scale_log2, stride_kt, stride_vt,
        DQK, DV, DA, DB, DV_PAD, BLOCK_N, False, UPCAST)
    # tiles across the diagonal, up to the last row's last key
    n_end = tl.minimum(kv_len, prefix + (m_block + 1) * BLOCK_M)
    acc, m_i, l_i = _attend_range(
        acc, m_i, l_i, qa, qb, kta_ptrs, ktb_ptrs, v_ptrs, n_full, n_end, offs_n, offs_da, offs_db,
        offs_dv, q_pos, kv_len, qk_scale_log2, stride_kt, stride_vt,
        DQK, DV, DA, DB, DV_PAD, BLOCK_N, True, UPCAST)

    acc = acc / l_i[:, None]
    rows = (q_start + offs_m).to(tl.int64)
    out_ptrs = Out + rows[:, None] * stride_ot + head * stride_oh + offs_dv[None, :]
    tl.store(out_ptrs, acc.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # base-2 units back to natural log
    tl.store(Lse + rows * stride_lt + head * stride_lh, lse, mask=row_ok)


def pick_config(q: torch.Tensor) -> Config:
    if _interpreting() or q.device.type != "cuda":
        return INTERPRET
    if q.dtype == torch.float32:
        return FP32
    if torch.cuda.get_device_capability(q.device)[0] >= 9:
        return HOPPER_16BIT
    return GENERIC_16BIT


def launch(q, k, v, cu_seqlens_q, cu_seqlens_kv, out, lse, softmax_scale, config: Config | None = None):
    """Run the kernel (arguments already validated by the spec); ``config`` overrides the tuning."""
    T, H, Dqk = q.shape
    Dv = v.shape[2]
    batch = cu_seqlens_q.shape[0] - 1
    cfg = config or pick_config(q)
    num_q_programs = T // cfg.block_m + batch
    if num_q_programs == 0 or H == 0:
        return
    da, db = split_head_dim(Dqk)
    mla_prefill_fwd_kernel[(num_q_programs, H)](
        q, k, v, cu_seqlens_q, cu_seqlens_kv, out, lse,
        softmax_scale * LOG2E, batch, max(1, batch.bit_length() + 1), num_q_programs,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
        DQK=Dqk, DV=Dv, DA=da, DB=db, DV_PAD=pad_dim(Dv),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, UPCAST=_interpreting(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def mla_prefill_triton(q, k, v, cu_seqlens_q, cu_seqlens_kv, out, lse, softmax_scale):
    """Triton FlashAttention-2 ragged causal extend attention (online softmax, diagonal skip)."""
    launch(q, k, v, cu_seqlens_q, cu_seqlens_kv, out, lse, softmax_scale)


def supports(sig) -> str | None:
    dqk, dv = sig.dim("Dqk"), sig.dim("Dv")
    if dqk > MAX_HEAD_DIM or dv > MAX_HEAD_DIM:
        return (f"head dims Dqk={dqk}, Dv={dv}: above {MAX_HEAD_DIM} the query tile and accumulator "
                f"do not fit one SM with these block sizes")
    return None


def register(registry, common) -> None:
    registry.register(
        "mla_prefill", mla_prefill_triton, supports=supports,
        doc="Triton FlashAttention-2 ragged causal extend attention (tuned for Dqk 192 / Dv 128)",
        **common.kwargs(),
    )


def compile_targets() -> list[tuple]:
    """(jit_fn, signature, constexprs, options) for realistic configs, for the sm_90 / sm_100
    compile test: DeepSeek dims bf16 with the Hopper tiles (first), fp16 with the generic tiles,
    fp32, and a head-dim pair that needs padding (96 = 64 + 32, Dv 80 -> 128)."""
    targets = []
    for dtype, dqk, dv, cfg in (("bf16", 192, 128, HOPPER_16BIT), ("fp16", 192, 128, GENERIC_16BIT),
                                ("fp32", 192, 128, FP32), ("bf16", 96, 80, HOPPER_16BIT)):
        da, db = split_head_dim(dqk)
        sig = {
            "Q": f"*{dtype}", "K": f"*{dtype}", "V": f"*{dtype}", "CU_Q": "*i32", "CU_KV": "*i32",
            "Out": f"*{dtype}", "Lse": "*fp32", "qk_scale_log2": "fp32",
            "batch": "i32", "search_steps": "i32", "num_q_programs": "i32",
            **{name: "i32" for name in ("stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt",
                                        "stride_vh", "stride_ot", "stride_oh", "stride_lt", "stride_lh")},
        }
        constexprs = dict(DQK=dqk, DV=dv, DA=da, DB=db, DV_PAD=pad_dim(dv), BLOCK_M=cfg.block_m,
                          BLOCK_N=cfg.block_n, UPCAST=False)
        sig.update({name: "constexpr" for name in constexprs})
        options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        targets.append((mla_prefill_fwd_kernel, sig, constexprs, options))
    return targets
