"""The routing half of the Triton ``moe`` in two kernels: routing, then the expert-sorted layout.

In a decode step the expert GEMMs read a few hundred MB of weights, yet the torch version of
these two steps (``tokenspeed_core.ops.moe.route``, then ``moe.align_rows``) is some 50 small
kernels; in a CUDA graph at T = 1 they were ~25% of the layer's time (docs/perf/triton-moe.md).
Here they are two launches:

1. ``route_kernel``, one program per token: DeepSeek-V3's grouped top-k exactly as the op
   defines it (sigmoid scores; group score = sum of the group's two largest biased scores;
   ``topk_group`` groups kept; ``top_k`` experts by biased score, weights from the unbiased
   score, normalised and scaled), then the shared experts appended as experts E, E + 1, ... of
   weight 1. Experts come out in descending score, as ``torch.topk`` returns them.
2. ``align_kernel``, one program in all: expert counts (histogram), each expert's run padded to
   BLOCK_M (cumsum), rows sorted by (expert, row) (bitonic sort of ``expert * ROWS + row``, so
   token order within an expert, as a stable argsort gives), scattered to their padded slots,
   and the expert of every BLOCK_M block (a vectorised searchsorted). The same layout as
   ``moe.align_rows``.

Sizes are bounded (``FUSED_MAX_ROWS`` rows, ``FUSED_MAX_EXPERTS`` experts): the decode regime,
where launches dominate. Larger calls take the torch path, whose cost is then small beside the
GEMMs.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice

FUSED_MAX_ROWS = 2048  # tokens x (top_k + shared experts) that the one-program alignment sorts
FUSED_MAX_EXPERTS = 1023  # routed + shared experts (one histogram bin is kept for padding rows)


@triton.jit
def route_kernel(logits_ptr, bias_ptr, ids_ptr, weights_ptr, stride_lt, n_group, group_size, topk_group, top_k,
                 num_experts, num_shared, scaling, NORM: tl.constexpr, NG: tl.constexpr, GS: tl.constexpr,
                 K: tl.constexpr, TORCH_SIGMOID: tl.constexpr):
    """ids / weights [T, top_k + num_shared] of token ``program_id(0)``."""
    t = tl.program_id(0)
    g = tl.arange(0, NG)[:, None]
    j = tl.arange(0, GS)[None, :]
    valid = (g < n_group) & (j < group_size)
    expert = g * group_size + j
    logit = tl.load(logits_ptr + t.to(tl.int64) * stride_lt + expert, mask=valid, other=0.0).to(tl.float32)
    if TORCH_SIGMOID:
        # torch's CUDA sigmoid, 1 / (1 + expf(-x)) with IEEE division, to the bit: an expert whose
        # score is within an ulp or two of the k-th must be chosen as the op's reference chooses
        # it (over 16K tokens a faster sigmoid flipped some; docs/perf/triton-moe.md)
        score = libdevice.div_rn(1.0, 1.0 + libdevice.exp(-logit))
    else:  # the interpreter has no libdevice
        score = tl.sigmoid(logit)
    chosen = tl.where(valid, score + tl.load(bias_ptr + expert, mask=valid, other=0.0).to(tl.float32),
                      float("-inf"))
    # group score: the two largest biased scores of the group (the largest alone in a group of one)
    first = tl.max(chosen, 1)
    at = tl.argmax(chosen, 1)
    second = tl.max(tl.where(j == at[:, None], float("-inf"), chosen), 1)
    group_score = tl.where(tl.arange(0, NG) < n_group, first + tl.where(group_size > 1, second, 0.0),
                           float("-inf"))
    keep = tl.zeros([NG], dtype=tl.int1)
    for _ in range(topk_group):
        best = tl.argmax(group_score, 0)
        keep = keep | (tl.arange(0, NG) == best)
        group_score = tl.where(tl.arange(0, NG) == best, float("-inf"), group_score)
    flat_chosen = tl.reshape(tl.where(keep[:, None], chosen, float("-inf")), [NG * GS])
    flat_expert = tl.reshape(expert, [NG * GS])
    flat_score = tl.reshape(score, [NG * GS])
    slot = tl.arange(0, K)
    ids = tl.zeros([K], dtype=tl.int32)
    weights = tl.zeros([K], dtype=tl.float32)
    for k in range(top_k):
        i = tl.argmax(flat_chosen, 0)
        here = tl.arange(0, NG * GS) == i
        ids = tl.where(slot == k, tl.sum(tl.where(here, flat_expert, 0), 0), ids)
        weights = tl.where(slot == k, tl.sum(tl.where(here, flat_score, 0.0), 0), weights)
        flat_chosen = tl.where(here, float("-inf"), flat_chosen)
    if NORM:
        weights = weights / tl.sum(weights, 0)
    weights = weights * scaling
    shared = (slot >= top_k) & (slot < top_k + num_shared)
    ids = tl.where(shared, num_experts + slot - top_k, ids)
    weights = tl.where(shared, 1.0, weights)
    row = t.to(tl.int64) * (top_k + num_shared)
    tl.store(ids_ptr + row + slot, ids, mask=slot < top_k + num_shared)
    tl.store(weights_ptr + row + slot, weights, mask=slot < top_k + num_shared)


@triton.jit
def align_kernel(ids_ptr, sorted_rows_ptr, block_expert_ptr, num_rows, num_experts, padded_len,
                 BLOCK_M: tl.constexpr, ROWS: tl.constexpr, EXPERTS: tl.constexpr, CHUNK: tl.constexpr):
    """The expert-sorted padded layout of ``moe.align_rows`` for ids [num_rows], one program."""
    row = tl.arange(0, ROWS)
    # rows past num_rows go to the last bin, which no expert uses (EXPERTS > num_experts)
    ids = tl.load(ids_ptr + row, mask=row < num_rows, other=EXPERTS - 1)
    bins = tl.arange(0, EXPERTS)
    counts = tl.where(bins < num_experts, tl.histogram(ids, EXPERTS), 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    pad_end = tl.cumsum(padded, 0)
    run_start = tl.cumsum(counts, 0) - counts  # first sorted position of each expert's rows
    for p0 in range(0, padded_len, CHUNK):  # every slot "no row" first; padding stays so
        p = p0 + tl.arange(0, CHUNK)
        tl.store(sorted_rows_ptr + p, num_rows, mask=p < padded_len)
    tl.debug_barrier()  # one CTA: the fill above lands before the scatter below
    key = tl.sort(ids * ROWS + row)  # by expert, then by row: a stable sort of the rows by expert
    expert = key // ROWS
    rank = row - tl.gather(run_start, expert, 0)
    dest = tl.gather(pad_end - padded, expert, 0) + rank
    tl.store(sorted_rows_ptr + dest, key % ROWS, mask=expert < num_experts)
    for b0 in range(0, padded_len // BLOCK_M, CHUNK):
        blk = b0 + tl.arange(0, CHUNK)
        owner = tl.sum((pad_end[None, :] <= (blk * BLOCK_M)[:, None]).to(tl.int32), 1)
        tl.store(block_expert_ptr + blk, tl.where(owner < num_experts, owner, -1),
                 mask=blk < padded_len // BLOCK_M)
