"""The two Triton kernels of ``mla_decode``; private: ``mla_decode.py`` plans and launches them.

Stage 1 (``mla_decode_split_kernel``), one program per (block of folded query rows, KV split,
request). The q_len x H query rows of a request are folded into one M axis (row m is query token
``m // H``, head ``m % H``; exactly the memory order of ``q[b]``), so every query of a request
shares one pass over its KV and the QK^T / PV products are ``tl.dot`` tiles of BLOCK_M rows.
Each row carries its own causal limit. KV rows are gathered page by page, dequantised on load
(fp8: the scale is folded into the score scale and applied to the output once) and masked past
the split's end, so rows past a request's length are never read.

Stage 2 (``mla_decode_combine_kernel``) merges the per-split partial results by their
log-sum-exp. With one split, stage 1 writes the final out/lse itself and stage 2 is skipped.

Softmax runs in base 2 (``exp2``); partial lse are kept in base 2, the final lse is natural log.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # host side: folded into qk_scale
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit(do_not_specialize=["q_len", "num_heads", "page_size", "page_table_stride", "num_splits"])
def mla_decode_split_kernel(
    q_ptr,  # [B, q_len, H, D], contiguous: rows b * q_len * H + m
    kv_ptr,  # [P, page_size, D]
    page_table_ptr,  # [B, page_table_stride] int32
    seqlens_ptr,  # [B] int32
    out_ptr,  # SPLIT: fp32 [B, q_len*H, num_splits, DV]; else out [B, q_len*H, DV]
    lse_ptr,  # SPLIT: fp32 [B, q_len*H, num_splits] (base 2); else lse [B, q_len*H] (natural)
    qk_scale,  # softmax_scale * kv_scale * log2(e)
    v_scale,  # kv_scale
    q_len,
    num_heads,
    page_size,
    page_table_stride,
    num_splits,
    D: tl.constexpr,  # row width (latent + rope)
    DV: tl.constexpr,  # latent width (the value); D - DV is the rope part
    BLOCK_M: tl.constexpr,  # folded query rows per program
    BLOCK_N: tl.constexpr,  # KV rows per step
    BLOCK_DV: tl.constexpr,  # output columns per program: DV, or DV // 2 (halves the accumulator)
    SPLIT: tl.constexpr,  # write partial results for the combine stage
    UPCAST: tl.constexpr,  # compute in fp32 (the interpreter's bf16 arithmetic is wrong)
    IEEE: tl.constexpr,  # fp32 inputs: full-precision dots, not tf32
    ABLATE: tl.constexpr = 0,  # benchmark only (wrong results): 1 drops the PV dot, 2 the QK dots
):
    DR: tl.constexpr = D - DV
    HALVES: tl.constexpr = BLOCK_DV < DV
    # the DV halves of one row block are neighbours in launch order: they share KV tiles in L2
    pid_m = tl.program_id(0) // (DV // BLOCK_DV)
    pid_d = tl.program_id(0) % (DV // BLOCK_DV)
    pid_s = tl.program_id(1)
    b = tl.program_id(2)
    rows = q_len * num_heads

    seqlen = tl.load(seqlens_ptr + b)
    # The split count is fixed by shapes (graph capture); each request cuts its own length into
    # num_splits tile-aligned chunks, so splits stay balanced whatever the lengths are.
    chunk = tl.cdiv(tl.cdiv(seqlen, num_splits), BLOCK_N) * BLOCK_N
    start = pid_s * chunk
    end = tl.minimum(start + chunk, seqlen)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < rows
    # query token i of the request sits at position seqlen - q_len + i and sees rows 0..that
    last_pos = seqlen - q_len + offs_m // num_heads
    # this program's output columns (the PV operand); with HALVES the other half of the latent
    # still enters the scores
    offs_v = pid_d * BLOCK_DV + tl.arange(0, BLOCK_DV)
    offs_o = (1 - pid_d) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    offs_r = DV + tl.arange(0, DR)

    q_rows = q_ptr + (b * rows + offs_m).to(tl.int64)[:, None] * D
    q_nope = tl.load(q_rows + offs_v[None, :], mask=row_ok[:, None], other=0.0)
    q_rope = tl.load(q_rows + offs_r[None, :], mask=row_ok[:, None], other=0.0)
    if UPCAST:
        q_nope = q_nope.to(tl.float32)
        q_rope = q_rope.to(tl.float32)
    if HALVES:
        q_other = tl.load(q_rows + offs_o[None, :], mask=row_ok[:, None], other=0.0)
        if UPCAST:
            q_other = q_other.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    table = page_table_ptr + b.to(tl.int64) * page_table_stride

    for n0 in range(start, end, BLOCK_N):
        t = n0 + offs_n
        t_ok = t < end
        page = tl.load(table + t // page_size, mask=t_ok, other=0)
        kv_rows = kv_ptr + (page.to(tl.int64) * page_size + t % page_size) * D
        kv = tl.load(kv_rows[:, None] + offs_v[None, :], mask=t_ok[:, None], other=0.0)
        k_rope = tl.load(kv_rows[:, None] + offs_r[None, :], mask=t_ok[:, None], other=0.0)
        kv = kv.to(q_nope.dtype)  # fp8 dequant (its scale lives in qk_scale / v_scale)
        k_rope = k_rope.to(q_nope.dtype)

        if ABLATE == 2:  # timing the PV side alone: scores from the rope columns only, no dot
            s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32) + tl.sum(k_rope.to(tl.float32), 1)[None, :]
        elif IEEE:
            s = tl.dot(q_nope, tl.trans(kv), input_precision="ieee")
            s = tl.dot(q_rope, tl.trans(k_rope), s, input_precision="ieee")
        else:
            s = tl.dot(q_nope, tl.trans(kv))
            s = tl.dot(q_rope, tl.trans(k_rope), s)
        if HALVES:
            k_other = tl.load(kv_rows[:, None] + offs_o[None, :], mask=t_ok[:, None], other=0.0)
            k_other = k_other.to(q_nope.dtype)
            if IEEE:
                s = tl.dot(q_other, tl.trans(k_other), s, input_precision="ieee")
            else:
                s = tl.dot(q_other, tl.trans(k_other), s)
        s = s * qk_scale
        visible = t_ok[None, :] & (t[None, :] <= last_pos[:, None])
        s = tl.where(visible, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row with nothing visible yet keeps m = -inf; subtract 0 then, not -inf (NaN)
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_sub)
        p = tl.exp2(s - m_sub[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if ABLATE == 1:  # timing the QK side alone: keep the softmax, drop the PV product
            acc = acc * alpha[:, None]
        elif IEEE:
            acc = tl.dot(p.to(kv.dtype), kv, acc * alpha[:, None], input_precision="ieee")
        else:
            acc = tl.dot(p.to(kv.dtype), kv, acc * alpha[:, None])
        m_i = m_new

    # a split with no visible row for this query row (empty split, or causal) contributes nothing
    has_rows = l_i > 0.0
    inv_l = tl.where(has_rows, v_scale / tl.where(has_rows, l_i, 1.0), 0.0)
    o = acc * inv_l[:, None]
    lse2 = tl.where(has_rows, m_i + tl.log2(tl.where(has_rows, l_i, 1.0)), float("-inf"))
    slot = (b * rows + offs_m).to(tl.int64) * num_splits + pid_s
    o_ptrs = out_ptr + slot[:, None] * DV + offs_v[None, :]
    tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    if pid_d == 0:  # both halves hold the same lse
        if SPLIT:
            tl.store(lse_ptr + slot, lse2, mask=row_ok)
        else:
            tl.store(lse_ptr + slot, lse2 * LN2, mask=row_ok)


@triton.jit(do_not_specialize=["q_len", "num_heads", "page_size", "page_table_stride", "num_splits"])
def mla_decode_split_kernel_t(
    q_ptr, kv_ptr, page_table_ptr, seqlens_ptr, out_ptr, lse_ptr,  # as mla_decode_split_kernel
    qk_scale,
    v_scale,
    q_len,
    num_heads,
    page_size,
    page_table_stride,
    num_splits,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_H: tl.constexpr,  # folded query rows per program: the N side of both products
    BLOCK_N: tl.constexpr,  # KV rows per step: the M side of the score product (64 per warpgroup)
    SPLIT: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    """Stage 1, transposed: the same result as ``mla_decode_split_kernel``, computed as
    S^T = K Q^T ([BLOCK_N KV rows, BLOCK_H query rows]) and out^T = V^T P^T ([DV, BLOCK_H]).

    With few folded rows (q_len x H = 16) the plain form has M = 16, too small for a Hopper
    warpgroup MMA (M = 64 per warpgroup), so it runs on mma.sync. Here the KV rows fill M
    (64 per step) and the latent columns fill M of the output product (512 = 8 x 64), so both
    products are warpgroup MMAs with N = BLOCK_H, operands K / V^T straight from the staged tile.
    The softmax runs down the columns (over KV rows) instead of along rows.
    """
    DR: tl.constexpr = D - DV
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = tl.program_id(2)
    rows = q_len * num_heads

    seqlen = tl.load(seqlens_ptr + b)
    chunk = tl.cdiv(tl.cdiv(seqlen, num_splits), BLOCK_N) * BLOCK_N
    start = pid_s * chunk
    end = tl.minimum(start + chunk, seqlen)

    offs_h = pid_m * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = offs_h < rows
    last_pos = seqlen - q_len + offs_h // num_heads
    offs_v = tl.arange(0, DV)
    offs_r = DV + tl.arange(0, DR)

    q_rows = q_ptr + (b * rows + offs_h).to(tl.int64)[:, None] * D
    q_nope = tl.load(q_rows + offs_v[None, :], mask=row_ok[:, None], other=0.0)
    q_rope = tl.load(q_rows + offs_r[None, :], mask=row_ok[:, None], other=0.0)
    if UPCAST:
        q_nope = q_nope.to(tl.float32)
        q_rope = q_rope.to(tl.float32)
    q_nope_t = tl.trans(q_nope)  # [DV, BLOCK_H]: loop-invariant B operand of the score product
    q_rope_t = tl.trans(q_rope)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([DV, BLOCK_H], tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    table = page_table_ptr + b.to(tl.int64) * page_table_stride

    for n0 in range(start, end, BLOCK_N):
        t = n0 + offs_n
        t_ok = t < end
        page = tl.load(table + t // page_size, mask=t_ok, other=0)
        kv_rows = kv_ptr + (page.to(tl.int64) * page_size + t % page_size) * D
        kv = tl.load(kv_rows[:, None] + offs_v[None, :], mask=t_ok[:, None], other=0.0)
        k_rope = tl.load(kv_rows[:, None] + offs_r[None, :], mask=t_ok[:, None], other=0.0)
        kv = kv.to(q_nope.dtype)
        k_rope = k_rope.to(q_nope.dtype)

        if IEEE:
            s = tl.dot(kv, q_nope_t, input_precision="ieee")
            s = tl.dot(k_rope, q_rope_t, s, input_precision="ieee")
        else:
            s = tl.dot(kv, q_nope_t)
            s = tl.dot(k_rope, q_rope_t, s)
        s = s * qk_scale
        visible = t_ok[:, None] & (t[:, None] <= last_pos[None, :])
        s = tl.where(visible, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 0))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_sub)
        p = tl.exp2(s - m_sub[None, :])
        l_i = l_i * alpha + tl.sum(p, 0)
        if IEEE:
            acc = tl.dot(tl.trans(kv), p.to(kv.dtype), acc * alpha[None, :], input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(kv), p.to(kv.dtype), acc * alpha[None, :])
        m_i = m_new

    has_rows = l_i > 0.0
    inv_l = tl.where(has_rows, v_scale / tl.where(has_rows, l_i, 1.0), 0.0)
    o = tl.trans(acc * inv_l[None, :])  # [BLOCK_H, DV]: rows of DV contiguous outputs
    lse2 = tl.where(has_rows, m_i + tl.log2(tl.where(has_rows, l_i, 1.0)), float("-inf"))
    slot = (b * rows + offs_h).to(tl.int64) * num_splits + pid_s
    o_ptrs = out_ptr + slot[:, None] * DV + offs_v[None, :]
    tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    if SPLIT:
        tl.store(lse_ptr + slot, lse2, mask=row_ok)
    else:
        tl.store(lse_ptr + slot, lse2 * LN2, mask=row_ok)


@triton.jit(do_not_specialize=["num_splits"])
def mla_decode_combine_kernel(
    part_out_ptr,  # fp32 [R, num_splits, DV], R = B * q_len * H
    part_lse_ptr,  # fp32 [R, num_splits], base 2
    out_ptr,  # [R, DV]
    lse_ptr,  # fp32 [R], natural log
    num_splits,
    DV: tl.constexpr,
    BLOCK_DV: tl.constexpr,  # output columns per program
    BLOCK_S: tl.constexpr,  # >= num_splits (power of two)
    CHUNK_S: tl.constexpr,  # splits merged per step
):
    row = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    lse_row = part_lse_ptr + row * num_splits
    lse_all = tl.load(lse_row + offs_s, mask=offs_s < num_splits, other=float("-inf"))
    lse_max = tl.max(lse_all, 0)  # finite: split 0 always holds row 0, visible to every query
    total = tl.sum(tl.exp2(lse_all - lse_max), 0)

    offs_d = pid_d * BLOCK_DV + tl.arange(0, BLOCK_DV)
    offs_c = tl.arange(0, CHUNK_S)
    acc = tl.zeros([BLOCK_DV], tl.float32)
    for s0 in range(0, num_splits, CHUNK_S):
        s_idx = s0 + offs_c
        s_ok = s_idx < num_splits
        w = tl.exp2(tl.load(lse_row + s_idx, mask=s_ok, other=float("-inf")) - lse_max)
        part = tl.load(part_out_ptr + (row * num_splits + s_idx)[:, None] * DV + offs_d[None, :],
                       mask=s_ok[:, None], other=0.0)
        acc += tl.sum(w[:, None] * part, 0)
    tl.store(out_ptr + row * DV + offs_d, (acc / total).to(out_ptr.dtype.element_ty))
    if pid_d == 0:
        tl.store(lse_ptr + row, (lse_max + tl.log2(total)) * LN2)
