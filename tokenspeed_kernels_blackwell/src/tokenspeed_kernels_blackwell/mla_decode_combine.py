"""The combine stage of the split-KV MLA decode: merge each row's per-split partials.

Imports cutlass at module level (only the kernel modules import it). Every kernel variant's
split stage writes, per (request b, split s, folded row m), a normalised fp32 partial O over Dv
columns and its LSE (natural log; -inf for an empty split, whose O is 0). This kernel computes

    out[b, m] = kv_scale * sum_s w_s O_s / sum_s w_s,   w_s = exp(lse_s - max_s lse_s)
    lse[b, m] = max_s lse_s + log(sum_s w_s)            (-inf when every split is empty)

Why it is shaped this way: at b = 1 the split stage runs ~130 splits, and the first combine (one
CTA of 128 threads per row, looping over the splits) cost 18-21 µs on an H100, more than the
split stage itself (docs/perf/cute.md, run 4). Here one CTA takes (row, request, 128-column
chunk): 4x the CTAs, the split loop is divided among 4 warps (each lane loads 4 adjacent
columns of a split: 512 B per warp and split), the weights are computed once per CTA into
shared memory, and the warps' partial sums are added through shared memory at the end.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute

COMBINE_WARPS = 4  # warps per CTA; warp w takes splits w, w + 4, ...
COMBINE_COLS = 128  # Dv columns per CTA: 32 lanes x 4 adjacent columns
MAX_SPLITS = 1024  # the launcher never asks for more (weights are staged in shared memory)
LOG2_E = 1.4426950408889634


# xor-shuffle (butterfly) reductions over the lanes that differ in the given lane bits; every
# kernel of the package uses these (plain Python: unrolled while the calling kernel is traced)
WARP = (16, 8, 4, 2, 1)  # all 32 lanes
QUAD = (2, 1)  # the 4 lanes of a quad (an mma / wgmma accumulator row)
COLUMN = (4, 8, 16)  # the 8 lanes that hold the same accumulator columns


def xor_max(v, offsets):
    for o in offsets:
        v = cute.arch.fmax(v, cute.arch.shuffle_sync_bfly(v, offset=o, mask=-1, mask_and_clamp=31))
    return v


def xor_sum(v, offsets):
    for o in offsets:
        v = v + cute.arch.shuffle_sync_bfly(v, offset=o, mask=-1, mask_and_clamp=31)
    return v


class SplitKVCombine:
    """Mixin of the kernel classes: ``launch_combine`` after the split stage. Needs ``self.dtype``
    (of ``out``), ``self.M`` (folded rows), ``self.Dv`` and ``self.combine_unroll``."""

    combine_unroll = 1

    @cute.jit
    def launch_combine(self, mOPart: cute.Tensor, mLsePart: cute.Tensor, mOut: cute.Tensor,
                       mLse: cute.Tensor, kv_scale: cutlass.Float32, stream):
        @cute.struct
        class CombineStorage:
            weights: cute.struct.Align[cute.struct.MemRange[cutlass.Float32, MAX_SPLITS], 16]
            partial: cute.struct.Align[cute.struct.MemRange[cutlass.Float32, COMBINE_WARPS * COMBINE_COLS], 16]
            reduce: cute.struct.Align[cute.struct.MemRange[cutlass.Float32, COMBINE_WARPS], 16]

        batch = mOPart.shape[0]
        self.combine_kernel(mOPart, mLsePart, mOut, mLse, kv_scale, CombineStorage).launch(
            grid=[self.M, batch, self.Dv // COMBINE_COLS],
            block=[COMBINE_WARPS * 32, 1, 1],
            smem=CombineStorage.size_in_bytes(),
            stream=stream,
            use_pdl=True,  # programmatic dependent launch: see combine_kernel
        )

    @cute.kernel
    def combine_kernel(
        self,
        mOPart: cute.Tensor,
        mLsePart: cute.Tensor,
        mOut: cute.Tensor,
        mLse: cute.Tensor,
        kv_scale: cutlass.Float32,
        CombineStorage: cutlass.Constexpr,
    ):
        nthr = COMBINE_WARPS * 32
        tidx, _, _ = cute.arch.thread_idx()
        m, b, chunk = cute.arch.block_idx()
        warp = tidx // 32
        lane = tidx % 32
        num_splits = mOPart.shape[1]

        # Launched as a programmatic dependent of the split stage (use_pdl): its CTAs may be
        # scheduled while the split kernel still runs (once every split CTA has called
        # griddepcontrol.launch_dependents, or exited), which hides the launch latency between
        # the two kernels. Nothing it reads may be touched before the split grid has finished
        # and flushed its writes: that is this wait (a no-op when launched without PDL).
        cute.arch.griddepcontrol_wait()
        smem = cutlass.utils.SmemAllocator()
        storage = smem.allocate(CombineStorage)
        sW = storage.weights.get_tensor(cute.make_layout((MAX_SPLITS,)))
        sPart = storage.partial.get_tensor(cute.make_layout((COMBINE_WARPS, COMBINE_COLS), stride=(COMBINE_COLS, 1)))
        sRed = storage.reduce.get_tensor(cute.make_layout((COMBINE_WARPS,)))

        # ---- the largest split LSE (block-wide) ----
        lse_max = -cutlass.Float32.inf
        for s in cutlass.range(tidx, num_splits, nthr, unroll=1):
            lse_max = cute.arch.fmax(lse_max, mLsePart[b, s, m])
        lse_max = xor_max(lse_max, WARP)
        if lane == 0:
            sRed[warp] = lse_max
        cute.arch.sync_threads()
        for w in cutlass.range_constexpr(COMBINE_WARPS):
            lse_max = cute.arch.fmax(lse_max, sRed[w])
        safe = 0.0 if lse_max == -cutlass.Float32.inf else lse_max
        cute.arch.sync_threads()  # everyone has read sRed before it is reused

        # ---- each split's weight, once, into shared memory; their sum (block-wide) ----
        w_sum = cutlass.Float32(0.0)
        for s in cutlass.range(tidx, num_splits, nthr, unroll=1):
            w = cute.math.exp2((mLsePart[b, s, m] - safe) * LOG2_E, fastmath=True)
            sW[s] = w
            w_sum = w_sum + w
        w_sum = xor_sum(w_sum, WARP)
        if lane == 0:
            sRed[warp] = w_sum
        cute.arch.sync_threads()
        total = cutlass.Float32(0.0)
        for w in cutlass.range_constexpr(COMBINE_WARPS):
            total = total + sRed[w]

        # ---- this warp's splits: weighted sum of 4 adjacent columns per lane ----
        # Whole blocks of `unroll` splits per warp first, with no branch inside a block, so all
        # their loads are in flight at once (an unrolled loop with a dynamic trip count branches
        # out after every split instead, and each load waits for the one before it: 8.5 µs at
        # 128 splits on an H200); then the remaining < 4 x unroll splits one by one. (Padding
        # the last block with re-reads of the last split instead cost large batches with 1-2
        # splits 8% of the whole decode: 8 loads per lane for 1 split.)
        unroll = self.combine_unroll
        step = COMBINE_WARPS * unroll
        full = (num_splits // step) * step
        col0 = chunk * COMBINE_COLS + lane * 4
        acc = cute.make_rmem_tensor((4,), cutlass.Float32)
        acc.fill(0.0)
        for s0 in cutlass.range(0, full, step, unroll=1):
            for u in cutlass.range_constexpr(unroll):
                s = s0 + u * COMBINE_WARPS + warp
                w = sW[s]
                for j in cutlass.range_constexpr(4):
                    acc[j] = acc[j] + w * mOPart[b, s, m, col0 + j]
        for s in cutlass.range(full + warp, num_splits, COMBINE_WARPS, unroll=1):
            w = sW[s]
            for j in cutlass.range_constexpr(4):
                acc[j] = acc[j] + w * mOPart[b, s, m, col0 + j]
        for j in cutlass.range_constexpr(4):
            sPart[warp, lane * 4 + j] = acc[j]
        cute.arch.sync_threads()

        # ---- add the warps' sums: thread t owns column t of the chunk ----
        v = cutlass.Float32(0.0)
        for w in cutlass.range_constexpr(COMBINE_WARPS):
            v = v + sPart[w, tidx]
        inv = 0.0 if total == 0.0 else kv_scale / total
        mOut[b, m, chunk * COMBINE_COLS + tidx] = (v * inv).to(self.dtype)
        if chunk == 0:
            if tidx == 0:
                mLse[b, m] = -cutlass.Float32.inf if total == 0.0 else safe + cute.math.log(total)


__all__ = ["COLUMN", "COMBINE_COLS", "MAX_SPLITS", "QUAD", "SplitKVCombine", "WARP", "xor_max", "xor_sum"]
