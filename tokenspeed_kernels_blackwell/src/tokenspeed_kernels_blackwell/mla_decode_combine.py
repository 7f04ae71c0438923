"""The combine stage of the split-KV MLA decode: merge each row's per-split partials.

Imports cutlass at module level (only the kernel modules import it). Every kernel variant's
split stage writes, per (request b, split s, folded row m), a normalised fp32 partial O over Dv
columns and its LSE (natural log; -inf for an empty split, whose O is 0). This kernel computes

    out[b, m] = kv_scale * sum_s w_s O_s / sum_s w_s,   w_s = exp(lse_s - max_s lse_s)
    lse[b, m] = max_s lse_s + log(sum_s w_s)            (-inf when every split is empty)

A kernel class with ``one_split_direct`` (the sm_90a ones) writes ``out`` and ``lse`` itself when a
launch has one split a request (``store_lse`` here, ``store_result_staged`` of the wgmma base); the
combine is then not launched.

Why it is shaped this way: at b = 1 the split stage runs ~130 splits, and a first combine (one
CTA of 128 threads per row, looping over the splits) cost 18-21 µs on an H100, more than the
split stage itself (docs/perf/cute.md, run 4). One CTA takes (row, request, 128-column chunk);
its 4 warps take every 4th split each, a lane 4 adjacent columns (one 16-byte load per split).
A second version computed the splits' weights block-wide first (max, then weights into shared
memory, two barriers and two dependent rounds of LSE loads before the first O load). Now each
warp merges its splits with a running max as they arrive (flash-decoding's online softmax),
issuing `combine_batch` splits' loads at once, and the warps are merged once at the end: the
chain is one round of loads per batch.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute

COMBINE_WARPS = 4  # warps per CTA; warp w takes splits w, w + 4, ...
COMBINE_COLS = 128  # Dv columns per CTA: 32 lanes x 4 adjacent columns
COMBINE_BATCH = 16  # splits per warp whose loads are in flight together (5 x 16 registers)
MAX_SPLITS = 1024  # the launcher never asks for more (mla_decode.MAX_KV_SPLITS)
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
    (of ``out``), ``self.M`` (folded rows), ``self.Dv`` and ``self.combine_batch``."""

    combine_batch = COMBINE_BATCH
    # A split kernel that writes ``out`` and ``lse`` itself when a call has one split per request
    # (``store_lse``, ``store_result_staged``) sets this: the combine is then not launched. Large batches run one
    # split, where the fp32 partials cost twice the bytes of ``out`` to write and again to read,
    # and the combine's grid has a CTA per folded row and 128 columns (262144 CTAs at B 128,
    # q 4, H 128).
    one_split_direct = False

    @cute.jit
    def launch_combine(self, mOPart: cute.Tensor, mLsePart: cute.Tensor, mOut: cute.Tensor,
                       mLse: cute.Tensor, kv_scale: cutlass.Float32, stream):
        if cutlass.const_expr(self.one_split_direct):
            if mOPart.shape[1] > 1:
                self.launch_combine_kernel(mOPart, mLsePart, mOut, mLse, kv_scale, stream)
        else:
            self.launch_combine_kernel(mOPart, mLsePart, mOut, mLse, kv_scale, stream)

    @cute.jit
    def store_lse(self, mLsePart, mLse, b, split, num_splits, m, lse):
        """The LSE of folded row ``m`` (< M): to ``lse`` when the launch has one split a request
        and the class sets ``one_split_direct`` (its kernel then writes ``out`` too), else to the
        partial LSE. ``num_splits`` is uniform over the grid."""
        if cutlass.const_expr(self.one_split_direct):
            if num_splits == 1:
                mLse[b, m] = lse
            else:
                mLsePart[b, split, m] = lse
        else:
            mLsePart[b, split, m] = lse

    @cute.jit
    def launch_combine_kernel(self, mOPart: cute.Tensor, mLsePart: cute.Tensor, mOut: cute.Tensor,
                              mLse: cute.Tensor, kv_scale: cutlass.Float32, stream):
        @cute.struct
        class CombineStorage:
            partial: cute.struct.Align[cute.struct.MemRange[cutlass.Float32, COMBINE_WARPS * COMBINE_COLS], 16]
            warp_max: cute.struct.Align[cute.struct.MemRange[cutlass.Float32, COMBINE_WARPS], 16]
            warp_sum: cute.struct.Align[cute.struct.MemRange[cutlass.Float32, COMBINE_WARPS], 16]

        batch = mOPart.shape[0]
        grid = [self.M, batch, self.Dv // COMBINE_COLS]
        # Two builds of the kernel: with at most one split per warp (large batches: the grid
        # has up to B x M x 4 CTAs of little work each) the 32-register build, so that 16 CTAs
        # fit on an SM; the batched build needs ~128 registers (4 CTAs an SM), which made those
        # grids 3-14% slower in total (docs/perf/cute.md, run 12).
        if mOPart.shape[1] <= COMBINE_WARPS:
            self.combine_kernel(mOPart, mLsePart, mOut, mLse, kv_scale, CombineStorage, False).launch(
                grid=grid, block=[COMBINE_WARPS * 32, 1, 1], smem=CombineStorage.size_in_bytes(), stream=stream,
                use_pdl=True)  # programmatic dependent launch: see combine_kernel
        else:
            self.combine_kernel(mOPart, mLsePart, mOut, mLse, kv_scale, CombineStorage, True).launch(
                grid=grid, block=[COMBINE_WARPS * 32, 1, 1], smem=CombineStorage.size_in_bytes(), stream=stream,
                use_pdl=True)

    @cute.jit
    def merge_splits(self, mOPart: cute.Tensor, mLsePart: cute.Tensor, b, m, s0, warp, vec, acc, run_max,
                     run_sum, n: cutlass.Constexpr):
        """Fold splits s0 + u * COMBINE_WARPS + warp (u < n) into this lane's running (max, sum,
        acc[4]) of one row: all 2n loads are issued before any is used, and no warp waits for
        another (each keeps its own running max, merged once at the end). Indices past the last
        split are skipped by a warp-uniform test, which ptxas turns into predicated loads that
        are still all issued together (clamping them to the last split instead re-read it)."""
        num_splits = mOPart.shape[1]
        lses = []
        vals = []
        for u in cutlass.range_constexpr(n):
            s = s0 + u * COMBINE_WARPS + warp
            lse = -cutlass.Float32.inf  # past the last split: weight 0
            v = cute.make_rmem_tensor((4,), cutlass.Float32)
            v.fill(0.0)
            if s < num_splits:  # warp-uniform
                lse = mLsePart[b, s, m]
                cute.autovec_copy(cute.local_tile(mOPart[b, s, m, None], (4,), (vec,)), v)
            lses.append(lse)
            vals.append(v)
        new_max = run_max
        for u in cutlass.range_constexpr(n):
            # `+ 0 * O` ties each O load to the max: without a use before the max, ptxas sinks
            # every O load to just before its FMAs below, one L2 round trip after the other
            # (seen in the SASS). Partial O values are finite, so the LSE is unchanged.
            lses[u] = lses[u] + vals[u][0] * 0.0
            new_max = cute.arch.fmax(new_max, lses[u])
        base = 0.0 if new_max == -cutlass.Float32.inf else new_max  # every split so far empty: weights 0
        scale = cute.math.exp2((run_max - base) * LOG2_E, fastmath=True)
        run_sum = run_sum * scale
        for j in cutlass.range_constexpr(4):
            acc[j] = acc[j] * scale
        for u in cutlass.range_constexpr(n):
            w = cute.math.exp2((lses[u] - base) * LOG2_E, fastmath=True)
            run_sum = run_sum + w
            for j in cutlass.range_constexpr(4):
                acc[j] = acc[j] + w * vals[u][j]
        return new_max, run_sum

    @cute.kernel
    def combine_kernel(
        self,
        mOPart: cute.Tensor,
        mLsePart: cute.Tensor,
        mOut: cute.Tensor,
        mLse: cute.Tensor,
        kv_scale: cutlass.Float32,
        CombineStorage: cutlass.Constexpr,
        batched: cutlass.Constexpr,
    ):
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
        sPart = storage.partial.get_tensor(cute.make_layout((COMBINE_WARPS, COMBINE_COLS), stride=(COMBINE_COLS, 1)))
        sMax = storage.warp_max.get_tensor(cute.make_layout((COMBINE_WARPS,)))
        sSum = storage.warp_sum.get_tensor(cute.make_layout((COMBINE_WARPS,)))

        # ---- each warp: an online softmax merge over its splits (w, w + 4, ...) ----
        # Lane l holds columns 4l..4l+3 of this CTA's 128 (one 16-byte load per split). The
        # latency chain is one round of loads per `combine_batch` splits of a warp.
        vec = chunk * (COMBINE_COLS // 4) + lane
        acc = cute.make_rmem_tensor((4,), cutlass.Float32)
        acc.fill(0.0)
        run_max = -cutlass.Float32.inf
        run_sum = cutlass.Float32(0.0)
        # A request's splits in one batch of the fewest loads that covers them (1, 2, 4 or 8
        # per warp: no more than 2x the loads needed), else rounds of `combine_batch`.
        if cutlass.const_expr(not batched):  # launched only where num_splits <= COMBINE_WARPS
            run_max, run_sum = self.merge_splits(mOPart, mLsePart, b, m, 0, warp, vec, acc, run_max, run_sum, 1)
        elif num_splits <= 2 * COMBINE_WARPS:
            run_max, run_sum = self.merge_splits(mOPart, mLsePart, b, m, 0, warp, vec, acc, run_max, run_sum, 2)
        elif num_splits <= 4 * COMBINE_WARPS:
            run_max, run_sum = self.merge_splits(mOPart, mLsePart, b, m, 0, warp, vec, acc, run_max, run_sum, 4)
        elif num_splits <= 8 * COMBINE_WARPS:
            run_max, run_sum = self.merge_splits(mOPart, mLsePart, b, m, 0, warp, vec, acc, run_max, run_sum, 8)
        else:
            step = COMBINE_WARPS * self.combine_batch
            for s0 in cutlass.range(0, num_splits, step, unroll=1):
                run_max, run_sum = self.merge_splits(mOPart, mLsePart, b, m, s0, warp, vec, acc, run_max,
                                                     run_sum, self.combine_batch)
        for j in cutlass.range_constexpr(4):
            sPart[warp, lane * 4 + j] = acc[j]
        if lane == 0:
            sMax[warp] = run_max
            sSum[warp] = run_sum
        cute.arch.sync_threads()

        # ---- merge the warps: thread t owns column t of the chunk ----
        row_max = sMax[0]
        for w in cutlass.range_constexpr(1, COMBINE_WARPS):
            row_max = cute.arch.fmax(row_max, sMax[w])
        base = 0.0 if row_max == -cutlass.Float32.inf else row_max
        v = cutlass.Float32(0.0)
        total = cutlass.Float32(0.0)
        for w in cutlass.range_constexpr(COMBINE_WARPS):
            f = cute.math.exp2((sMax[w] - base) * LOG2_E, fastmath=True)
            v = v + f * sPart[w, tidx]
            total = total + f * sSum[w]
        inv = 0.0 if total == 0.0 else kv_scale / total
        mOut[b, m, chunk * COMBINE_COLS + tidx] = (v * inv).to(self.dtype)
        if chunk == 0:
            if tidx == 0:
                mLse[b, m] = -cutlass.Float32.inf if total == 0.0 else base + cute.math.log(total)


__all__ = ["COLUMN", "COMBINE_COLS", "MAX_SPLITS", "QUAD", "SplitKVCombine", "WARP", "xor_max", "xor_sum"]
