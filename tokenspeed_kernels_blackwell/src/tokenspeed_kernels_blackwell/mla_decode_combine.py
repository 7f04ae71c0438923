"""The combine stage of the split-KV MLA decode: merge each row's per-split partials.

Imports cutlass at module level (only the kernel modules import it). Every kernel variant's
split stage writes, per (request b, split s, folded row m), a normalised partial O over Dv
columns in the output's dtype and its fp32 LSE (natural log; -inf for an empty split, whose O is
0). This kernel computes, in fp32,

    out[b, m] = kv_scale * sum_s w_s O_s / sum_s w_s,   w_s = exp(lse_s - max_s lse_s)
    lse[b, m] = max_s lse_s + log(sum_s w_s)            (-inf when every split is empty)

A kernel class with ``one_split_direct`` (the sm_90a ones) writes ``out`` and ``lse`` itself when a
launch has one split a request (``store_lse`` here, ``store_result_staged`` of the wgmma base); the
combine is then not launched.

Why it is shaped this way: at b = 1 the split stage runs ~130 splits, and a first combine (one
CTA of 128 threads per row, looping over the splits) cost 18-21 µs on an H100, more than the
split stage itself (docs/perf/cute.md, run 4). One CTA takes (row, request, 128-column chunk);
its warps (8, or 4 from 65 folded rows: ``merge_warps``) take every 8th (4th) split each, a lane 4
adjacent columns (one 8-byte load per split).
A second version computed the splits' weights block-wide first (max, then weights into shared
memory, two barriers and two dependent rounds of LSE loads before the first O load). Now each
warp merges its splits with a running max as they arrive (flash-decoding's online softmax),
issuing `combine_batch` splits' loads at once, and the warps are merged once at the end: the
chain is one round of loads per batch.

The partials are 16-bit, as FlashInfer keeps them: until run 37 (docs/perf/cute.md) they were
fp32, twice the bytes for the split CTAs to store (~4.1 µs of a CTA's life, per-CTA stamps) and
for this kernel to read. A normalised partial is a convex combination of V rows, so it is in
range in the cache's 16-bit type (and in fp16 for an fp8 cache, whose values are at most 448);
the one added rounding of each partial costs 1.5x the output error of fp32 partials at 2 bf16
splits in a CPU emulation (docs/cute.md), far inside the conformance tolerance.

With few splits (2-8: batches of 16 and more at short contexts) that grid is mostly launch: at
B 64, q 4, H 16 (2 splits) its 16384 CTAs of one row x 128 columns took 12 µs (H100, per-CTA
stamps, docs/perf/cute.md run 32). There a warp takes a whole row instead (a CTA four rows): lane
l holds columns 256 j + 8 l .. + 7 (j < 2, 16-byte loads, a warp reads 512 contiguous bytes), every
split's loads are issued at once, and the weights come from one LSE a lane and two butterflies.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute

COMBINE_WARPS = 4  # warps per CTA of the row-per-warp combine (few splits): warp w takes row w
# warps per CTA of the batched combine (many splits; warp w takes splits w, w + warps, ...): 8 where
# a request has few folded rows, so its grid (rows x 4 column chunks) leaves most SMs free and more
# warps shorten each one's chain of loads; 4 from 65 rows, whose grid fills the SMs (H200, run 47:
# 8 warps 2-3.5% faster at b 1 H 16, 1.4% slower at b 1 H 128 64K)
MERGE_WARPS_FEW_ROWS, MERGE_WARPS_MANY_ROWS = 8, 4
FEW_SPLITS = 8  # up to this many splits a request: the row-per-warp combine
COMBINE_COLS = 128  # Dv columns per CTA of the batched combine: 32 lanes x 4 adjacent columns
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
    # split, where the partials (fp32 until run 37) cost twice the bytes of ``out`` to write and again to read,
    # and the combine's grid has a CTA per folded row and 128 columns (262144 CTAs at B 128,
    # q 4, H 128).
    one_split_direct = False

    @property
    def merge_warps(self) -> int:
        """Warps per CTA of ``combine_kernel`` (see MERGE_WARPS_FEW_ROWS)."""
        return MERGE_WARPS_FEW_ROWS if self.M <= 64 else MERGE_WARPS_MANY_ROWS

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
        warps = self.merge_warps

        @cute.struct
        class CombineStorage:
            partial: cute.struct.Align[cute.struct.MemRange[cutlass.Float32, warps * COMBINE_COLS], 16]
            warp_max: cute.struct.Align[cute.struct.MemRange[cutlass.Float32, warps], 16]
            warp_sum: cute.struct.Align[cute.struct.MemRange[cutlass.Float32, warps], 16]

        batch = mOut.shape[0]  # the partials are a placeholder with one split a request (launcher)
        # programmatic dependent launches (use_pdl): see combine_kernel
        rows_grid = [(self.M + COMBINE_WARPS - 1) // COMBINE_WARPS, batch, 1]
        # the row-per-warp builds hold every split's loads in registers: 2, 4 or 8 splits (the
        # 8-split build needs ~140 registers, 3 CTAs an SM)
        if mOPart.shape[1] <= 2:
            self.combine_rows_kernel(mOPart, mLsePart, mOut, mLse, kv_scale, 2).launch(
                grid=rows_grid, block=[COMBINE_WARPS * 32, 1, 1], stream=stream, use_pdl=True)
        elif mOPart.shape[1] <= 4:
            self.combine_rows_kernel(mOPart, mLsePart, mOut, mLse, kv_scale, 4).launch(
                grid=rows_grid, block=[COMBINE_WARPS * 32, 1, 1], stream=stream, use_pdl=True)
        elif mOPart.shape[1] <= FEW_SPLITS:
            self.combine_rows_kernel(mOPart, mLsePart, mOut, mLse, kv_scale, FEW_SPLITS).launch(
                grid=rows_grid, block=[COMBINE_WARPS * 32, 1, 1], stream=stream, use_pdl=True)
        else:
            self.combine_kernel(mOPart, mLsePart, mOut, mLse, kv_scale, CombineStorage).launch(
                grid=[self.M, batch, self.Dv // COMBINE_COLS], block=[warps * 32, 1, 1],
                smem=CombineStorage.size_in_bytes(), stream=stream, use_pdl=True)

    @cute.jit
    def merge_splits(self, mOPart: cute.Tensor, mLsePart: cute.Tensor, b, m, s0, warp, vec, acc, run_max,
                     run_sum, n: cutlass.Constexpr):
        """Fold splits s0 + u * merge_warps + warp (u < n) into this lane's running (max, sum,
        acc[4]) of one row: all 2n loads are issued before any is used, and no warp waits for
        another (each keeps its own running max, merged once at the end). Indices past the last
        split are skipped by a warp-uniform test, which ptxas turns into predicated loads that
        are still all issued together (clamping them to the last split instead re-read it)."""
        num_splits = mOPart.shape[1]
        lses = []
        vals = []
        for u in cutlass.range_constexpr(n):
            s = s0 + u * self.merge_warps + warp
            lse = -cutlass.Float32.inf  # past the last split: weight 0
            v = cute.make_rmem_tensor((4,), mOPart.element_type)
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
            lses[u] = lses[u] + vals[u][0].to(cutlass.Float32) * 0.0
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
                acc[j] = acc[j] + w * vals[u][j].to(cutlass.Float32)
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
        warps = self.merge_warps
        sPart = storage.partial.get_tensor(cute.make_layout((warps, COMBINE_COLS), stride=(COMBINE_COLS, 1)))
        sMax = storage.warp_max.get_tensor(cute.make_layout((warps,)))
        sSum = storage.warp_sum.get_tensor(cute.make_layout((warps,)))

        # ---- each warp: an online softmax merge over its splits (w, w + warps, ...) ----
        # Lane l holds columns 4l..4l+3 of this CTA's 128 (one 8-byte load per split). The
        # latency chain is one round of loads per `combine_batch` splits of a warp.
        vec = chunk * (COMBINE_COLS // 4) + lane
        acc = cute.make_rmem_tensor((4,), cutlass.Float32)
        acc.fill(0.0)
        run_max = -cutlass.Float32.inf
        run_sum = cutlass.Float32(0.0)
        # A request's splits (more than FEW_SPLITS) in one batch of the fewest loads that covers
        # them (4 or 8 per warp: no more than 2x the loads needed), else rounds of `combine_batch`.
        if num_splits <= 4 * warps:
            run_max, run_sum = self.merge_splits(mOPart, mLsePart, b, m, 0, warp, vec, acc, run_max, run_sum, 4)
        elif num_splits <= 8 * warps:
            run_max, run_sum = self.merge_splits(mOPart, mLsePart, b, m, 0, warp, vec, acc, run_max, run_sum, 8)
        else:
            step = warps * self.combine_batch
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
        for w in cutlass.range_constexpr(1, warps):
            row_max = cute.arch.fmax(row_max, sMax[w])
        base = 0.0 if row_max == -cutlass.Float32.inf else row_max
        if tidx < COMBINE_COLS:
            v = cutlass.Float32(0.0)
            total = cutlass.Float32(0.0)
            for w in cutlass.range_constexpr(warps):
                f = cute.math.exp2((sMax[w] - base) * LOG2_E, fastmath=True)
                v = v + f * sPart[w, tidx]
                total = total + f * sSum[w]
            inv = 0.0 if total == 0.0 else kv_scale / total
            mOut[b, m, chunk * COMBINE_COLS + tidx] = (v * inv).to(self.dtype)
            if chunk == 0:
                if tidx == 0:
                    mLse[b, m] = -cutlass.Float32.inf if total == 0.0 else base + cute.math.log(total)


    @cute.kernel
    def combine_rows_kernel(self, mOPart: cute.Tensor, mLsePart: cute.Tensor, mOut: cute.Tensor,
                            mLse: cute.Tensor, kv_scale: cutlass.Float32, n: cutlass.Constexpr):
        """Up to ``n`` (<= FEW_SPLITS) splits a request: warp w merges row 4 x blockIdx.x + w of
        request blockIdx.y over all Dv columns (see the module docstring)."""
        tidx, _, _ = cute.arch.thread_idx()
        mb, b, _ = cute.arch.block_idx()
        lane = tidx % 32
        m = mb * COMBINE_WARPS + tidx // 32
        num_splits = mOPart.shape[1]
        part_dt = mOPart.element_type
        VEC = 128 // part_dt.width  # columns of a 16-byte load: 8 (a warp instruction: 256 columns)
        CHUNKS = self.Dv // (32 * VEC)
        cute.arch.griddepcontrol_wait()  # the split grid's writes are visible (see combine_kernel)
        if m < self.M:
            parts = []
            for s in cutlass.range_constexpr(n):
                v = cute.make_rmem_tensor((CHUNKS * VEC,), part_dt)
                v.fill(0.0)
                if s < num_splits:  # warp-uniform
                    for j in cutlass.range_constexpr(CHUNKS):
                        cute.autovec_copy(cute.local_tile(mOPart[b, s, m, None], (VEC,), (j * 32 + lane,)),
                                          cute.local_tile(v, (VEC,), (j,)))
                parts.append(v)
            lse = -cutlass.Float32.inf  # lane s holds split s's LSE; -inf: no split, weight 0
            if lane < num_splits:
                lse = mLsePart[b, lane, m]
            # `+ 0 * O` ties every 16-byte load to the LSE reduction below, so all of them are in
            # flight before it: without a use there, ptxas issues two splits' loads at a time,
            # between the FMAs (seen in the SASS). Partial O values are finite.
            for s in cutlass.range_constexpr(n):
                for j in cutlass.range_constexpr(CHUNKS):
                    lse = lse + parts[s][j * VEC].to(cutlass.Float32) * 0.0
            row_max = xor_max(lse, WARP)
            base = 0.0 if row_max == -cutlass.Float32.inf else row_max  # every split empty: weights 0
            w_lane = cute.math.exp2((lse - base) * LOG2_E, fastmath=True)
            total = xor_sum(w_lane, WARP)
            acc = cute.make_rmem_tensor((CHUNKS * VEC,), cutlass.Float32)
            acc.fill(0.0)
            for s in cutlass.range_constexpr(n):
                w = cute.arch.shuffle_sync(w_lane, s)  # 0 past the last split
                for i in cutlass.range_constexpr(CHUNKS * VEC):
                    acc[i] = acc[i] + w * parts[s][i].to(cutlass.Float32)
            inv = 0.0 if total == 0.0 else kv_scale / total
            res = cute.make_rmem_tensor((VEC,), self.dtype)
            for j in cutlass.range_constexpr(CHUNKS):
                for i in cutlass.range_constexpr(VEC):
                    res[i] = (acc[j * VEC + i] * inv).to(self.dtype)
                cute.autovec_copy(res, cute.local_tile(mOut[b, m, None], (VEC,), (j * 32 + lane,)))
            if lane == 0:
                mLse[b, m] = -cutlass.Float32.inf if total == 0.0 else base + cute.math.log(total)


__all__ = ["COLUMN", "COMBINE_COLS", "FEW_SPLITS", "MAX_SPLITS", "QUAD", "SplitKVCombine", "WARP", "xor_max", "xor_sum"]
