"""CuTe DSL MLA decode, v3 for sm_90a: ONE S per CTA, shared by the two warpgroups.

Imports cutlass at module level (only :mod:`.mla_decode` imports it, once the DSL is known to be
installed). The loader, wgmma helpers and combine are the shared ones
(:mod:`.mla_decode_kernel_v2`, :mod:`.mla_decode_combine`); what v3 changes against the removed
v2 is who computes S (docs/cute.md, "v3"):

- v2 (removed): both warpgroups computed the whole S = Q K^T of a 64-row KV tile (m64 n64), i.e.
  a third of the tensor work was duplicated and Q was re-read from smem by both.
- v3: warpgroup w computes S for KV rows [32 w, 32 w + 32) of the tile (m64 n32). The online
  softmax needs one max per row over all 64 columns: each warpgroup publishes its row maxima in
  smem, both take the max of the two (fmax is exact, so both get the same value and scale P and
  O identically). Each writes its P half (16-bit) into a 64 x 64 K-major smem tile, and then
  both run O[:, own Dv half] += P V as an SS wgmma (m64 n256 k16, 4 k-steps) over the whole P.
  Row sums stay per-warpgroup partials (same scale factors) and are added once at the end.
- Costs: two CTA barriers per tile (row maxima, P) and 8 KB of P written to smem per tile.
- fp8 e4m3 cache (``kv_dtype``): the tiles are staged by cp.async as fp8 (half the bytes) into
  a ring of unswizzled fp8 slots, and each is converted once, by all 256 threads, into the one
  16-bit swizzled tile the MMAs read (e4m3 -> bf16/fp16 is exact; ``kv_scale`` is applied to
  the scores and in the combine, as for a 16-bit cache). Smem stays the same size: one 16-bit
  tile (72 KB) plus two fp8 slots (2 x 36 KB) replace two 16-bit tiles.

Status: variant ``v3`` only: the default variant (v5) ran it for an fp8 cache above 32 folded rows
until run 49 (the see-saw kernel's producer converts since, 1.30-1.43x faster) and for 33-64 rows
with a 16-bit cache until run 39. Passed the
conformance kit's full grid on an H100 and an H200 (graph replay == eager); timings in
docs/perf/cute.md, runs 3-11.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass.cute.nvgpu import OperandMajorMode, cpasync, warpgroup

from . import mla_decode_kernel as base
from .mla_decode_combine import QUAD, xor_max, xor_sum
from .mla_decode_kernel_v2 import (
    BLOCK_M,
    NUM_THREADS,
    MlaDecodeSplitKVWgmma,
    _mn_view_sm90,
    _wgmma,
)


class MlaDecodeSplitKVSharedS(MlaDecodeSplitKVWgmma):
    """v3: 64-row KV tiles, S split by columns between the two warpgroups, P shared in smem."""

    one_split_direct = True  # one split a request: out and lse written here, no combine

    def __init__(self, dtype, num_heads, q_len, head_dim, head_dim_v, page_size, block_n=64, stages=2,
                 combine_batch=16, kv_dtype=None):
        super().__init__(dtype, num_heads, q_len, head_dim, head_dim_v, page_size, block_n, stages,
                         combine_batch)
        self.half_n = block_n // 2
        # the cache's element type: ``dtype`` (16-bit, the MMAs read the cp.async ring directly)
        # or fp8 e4m3 (staged, then converted into one 16-bit tile per KV tile)
        self.kv_dtype = dtype if kv_dtype is None else kv_dtype
        self.kv_fp8 = self.kv_dtype.width == 8
        self.kv_slots = 1 if self.kv_fp8 else stages  # 16-bit tiles in smem

    @cute.jit
    def __call__(
        self,
        mQ: cute.Tensor,
        mKV: cute.Tensor,
        mPageTable: cute.Tensor,
        mSeqlens: cute.Tensor,
        mOPart: cute.Tensor,
        mLsePart: cute.Tensor,
        mOut: cute.Tensor,
        mLse: cute.Tensor,
        scale_log2: cutlass.Float32,
        kv_scale: cutlass.Float32,
        stream,
    ):
        dtype = self.dtype
        k_atom = warpgroup.make_smem_layout_atom(warpgroup.SmemLayoutAtomKind.K_SW128, dtype)
        mn_atom = warpgroup.make_smem_layout_atom(warpgroup.SmemLayoutAtomKind.MN_SW128, dtype)
        sQ_layout = cute.tile_to_shape(k_atom, (BLOCK_M, self.D), (0, 1))
        sKV_layout = cute.tile_to_shape(k_atom, (self.block_n, self.D, self.kv_slots), (0, 1, 2))
        # fp8 staging ring (row-major); a 16-element placeholder for a 16-bit cache
        stage_shape = (self.block_n, self.D, self.stages) if self.kv_fp8 else (1, 16, 1)
        sStage_layout = cute.make_layout(stage_shape, stride=(stage_shape[1], 1, stage_shape[0] * stage_shape[1]))
        sVt_layout = cute.tile_to_shape(mn_atom, (self.Dv, self.block_n), (1, 0))
        # P: the A operand of PV, (64 rows, block_n keys), K-major like Q
        sP_layout = cute.tile_to_shape(k_atom, (BLOCK_M, self.block_n), (0, 1))

        @cute.struct
        class SharedStorage:
            sQ: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(sQ_layout)], 1024]
            sKV: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(sKV_layout)], 1024]
            sStage: cute.struct.Align[cute.struct.MemRange[self.kv_dtype, cute.cosize(sStage_layout)], 128]
            sP: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(sP_layout)], 1024]
            # per warpgroup and row: the tile's row maximum, at the end the partial row sum
            sRow: cute.struct.Align[cute.struct.MemRange[cutlass.Float32, 2 * BLOCK_M], 16]

        copy_bits = 128
        g2s_atom = cute.make_copy_atom(
            cpasync.CopyG2SOp(cache_mode=cpasync.LoadCacheMode.GLOBAL), dtype, num_bits_per_copy=copy_bits
        )
        thr_layout = cute.make_layout((NUM_THREADS // 8, 8), stride=(8, 1))
        g2s_copy = cute.make_tiled_copy_tv(g2s_atom, thr_layout, cute.make_layout((1, copy_bits // dtype.width)))
        kv_copy, cvt_copy = g2s_copy, g2s_copy
        if cutlass.const_expr(self.kv_fp8):
            # 16 fp8 per cp.async; 4 threads cover 64 columns, so 576 = 9 passes and 64 rows = 1
            kv_atom = cute.make_copy_atom(cpasync.CopyG2SOp(cache_mode=cpasync.LoadCacheMode.GLOBAL),
                                          self.kv_dtype, num_bits_per_copy=copy_bits)
            kv_copy = cute.make_tiled_copy_tv(kv_atom, cute.make_layout((NUM_THREADS // 4, 4), stride=(4, 1)),
                                              cute.make_layout((1, copy_bits // self.kv_dtype.width)))
            # conversion: 8 elements (one 16 B store of the 16-bit tile) per thread and step
            cvt_atom = cute.make_copy_atom(cute.nvgpu.CopyUniversalOp(), dtype, num_bits_per_copy=copy_bits)
            cvt_copy = cute.make_tiled_copy_tv(cvt_atom, thr_layout, cute.make_layout((1, copy_bits // dtype.width)))

        mma_qk = sm90_utils.make_trivial_tiled_mma(
            dtype, dtype, OperandMajorMode.K, OperandMajorMode.K, cutlass.Float32, (1, 1, 1),
            (BLOCK_M, self.half_n),
        )
        mma_pv = sm90_utils.make_trivial_tiled_mma(
            dtype, dtype, OperandMajorMode.K, OperandMajorMode.MN, cutlass.Float32, (1, 1, 1),
            (BLOCK_M, self.dv_half),
        )

        batch = mQ.shape[0]
        num_splits = mOPart.shape[1]
        m_blocks = (self.M + BLOCK_M - 1) // BLOCK_M
        self.attention_kernel_v3(
            mQ, mKV, mPageTable, mSeqlens, mOPart, mLsePart, mOut, mLse, scale_log2, kv_scale,
            sQ_layout, sKV_layout, sVt_layout, sP_layout, sStage_layout, g2s_copy, kv_copy, cvt_copy,
            mma_qk, mma_pv, SharedStorage,
        ).launch(
            grid=[m_blocks, num_splits, batch],
            block=[NUM_THREADS, 1, 1],
            smem=SharedStorage.size_in_bytes(),
            stream=stream,
        )
        self.launch_combine(mOPart, mLsePart, mOut, mLse, kv_scale, stream)

    @cute.kernel
    def attention_kernel_v3(
        self,
        mQ: cute.Tensor,
        mKV: cute.Tensor,
        mPageTable: cute.Tensor,
        mSeqlens: cute.Tensor,
        mOPart: cute.Tensor,
        mLsePart: cute.Tensor,
        mOut: cute.Tensor,
        mLse: cute.Tensor,
        scale_log2: cutlass.Float32,
        kv_scale: cutlass.Float32,
        sQ_layout: cute.ComposedLayout,
        sKV_layout: cute.ComposedLayout,
        sVt_layout: cute.ComposedLayout,
        sP_layout: cute.ComposedLayout,
        sStage_layout: cute.Layout,
        g2s_copy: cute.TiledCopy,
        kv_copy: cute.TiledCopy,
        cvt_copy: cute.TiledCopy,
        mma_qk: cute.TiledMma,
        mma_pv: cute.TiledMma,
        SharedStorage: cutlass.Constexpr,
    ):
        BN = self.block_n
        HN = self.half_n
        STAGES = self.stages
        tidx, _, _ = cute.arch.thread_idx()
        m_block, split, b = cute.arch.block_idx()
        num_splits = cute.arch.grid_dim()[1]
        wg = tidx // 128
        wg_tidx = tidx % 128
        self.stamp(base.STAMP_ENTRY, tidx, 0)

        n = mSeqlens[b]
        t_begin, t_end = self.split_tiles(n, split, num_splits, BN)
        row0 = m_block * BLOCK_M

        smem = cutlass.utils.SmemAllocator()
        storage = smem.allocate(SharedStorage)
        sQ = storage.sQ.get_tensor(sQ_layout.outer, swizzle=sQ_layout.inner)
        sKV = storage.sKV.get_tensor(sKV_layout.outer, swizzle=sKV_layout.inner)
        sP = storage.sP.get_tensor(sP_layout.outer, swizzle=sP_layout.inner)
        sStage = storage.sStage.get_tensor(sStage_layout)
        # where cp.async puts KV tiles: the 16-bit ring itself, or the fp8 staging ring
        sLoad = sStage if cutlass.const_expr(self.kv_fp8) else sKV
        sRow = storage.sRow.get_tensor(cute.make_layout((BLOCK_M, 2), stride=(1, BLOCK_M)))

        # ---- Q once, then the first STAGES - 1 KV tiles (one commit group each) ----
        self.load_q(mQ, sQ, b, m_block, row0, g2s_copy, tidx, BLOCK_M)
        thr_kv = kv_copy.get_slice(tidx)
        tKVc = thr_kv.partition_S(cute.make_identity_tensor((BN, self.D)))
        for s in cutlass.range_constexpr(STAGES - 1):
            if t_begin + s < t_end:
                self.load_kv_tile_v2(mKV, mPageTable, b, n, t_begin + s, s, sLoad, thr_kv, kv_copy, tKVc)
            cute.arch.cp_async_commit_group()
        thr_cvt = cvt_copy.get_slice(tidx)
        self.stamp(base.STAMP_SETUP, tidx, 0)

        # ---- fragments: S half of this warpgroup; O half of this warpgroup over the whole P ----
        thr_qk = mma_qk.get_slice(wg_tidx)
        thr_pv = mma_pv.get_slice(wg_tidx)
        tSrQ = mma_qk.make_fragment_A(thr_qk.partition_A(sQ))
        acc_shape_S = thr_qk.partition_shape_C((BLOCK_M, HN))
        tOrP = mma_pv.make_fragment_A(thr_pv.partition_A(sP))
        tPsP = thr_qk.partition_C(cute.local_tile(sP, (BLOCK_M, HN), (0, wg)))  # where this wg's P goes
        acc_O = cute.make_rmem_tensor(thr_pv.partition_shape_C((BLOCK_M, self.dv_half)), cutlass.Float32)
        acc_O.fill(0.0)
        acc_O_mn = _mn_view_sm90(acc_O)

        tScS_mn = _mn_view_sm90(thr_qk.partition_C(cute.make_identity_tensor((BLOCK_M, HN))))
        rows_per_thr = cute.size(tScS_mn, mode=[0])
        cols_per_thr = cute.size(tScS_mn, mode=[1])
        row_max = cute.make_rmem_tensor((rows_per_thr,), cutlass.Float32)
        row_sum = cute.make_rmem_tensor((rows_per_thr,), cutlass.Float32)  # over this wg's columns
        row_max.fill(-cutlass.Float32.inf)
        row_sum.fill(0.0)
        row_limit = cute.make_rmem_tensor((rows_per_thr,), cutlass.Int32)
        for r in cutlass.range_constexpr(rows_per_thr):
            m = row0 + tScS_mn[r, 0][0]
            row_limit[r] = n - self.Q + cutlass.min(m, self.M - 1) // self.H

        for tile in cutlass.range(t_begin, t_end, 1, unroll=1):
            stage = (tile - t_begin) % STAGES
            cute.arch.cp_async_wait_group(STAGES - 2)
            cute.arch.fence_proxy("async.shared", space="cta")
            # also: every warpgroup is done with the previous tile's sRow, sP and KV slot
            cute.arch.sync_threads()
            if cutlass.const_expr(self.stamp_addr != 0):
                if tile == t_begin:
                    self.stamp(base.STAMP_Q, tidx, 0)  # Q and the first tile landed
            nxt = tile + STAGES - 1
            if nxt < t_end:
                self.load_kv_tile_v2(mKV, mPageTable, b, n, nxt, (nxt - t_begin) % STAGES, sLoad, thr_kv,
                                     kv_copy, tKVc)
            cute.arch.cp_async_commit_group()

            kv_slot = stage
            if cutlass.const_expr(self.kv_fp8):
                # fp8 -> 16-bit into the one MMA tile (free: the barrier above follows the
                # previous tile's PV), then visible to the tensor cores' async proxy
                src = thr_cvt.partition_S(sStage[None, None, stage])
                dst = thr_cvt.partition_D(sKV[None, None, 0])
                for i in cutlass.range_constexpr(cute.size(src.shape[1])):
                    for j in cutlass.range_constexpr(cute.size(src.shape[2])):
                        dst[None, i, j].store(src[None, i, j].load().to(self.dtype))
                cute.arch.fence_proxy("async.shared", space="cta")
                cute.arch.sync_threads()
                kv_slot = 0
            sK = sKV[None, None, kv_slot]
            # ---- S half = Q K[wg half]^T ----
            tSrK = mma_qk.make_fragment_B(thr_qk.partition_B(cute.local_tile(sK, (HN, self.D), (wg, 0))))
            acc_S = cute.make_rmem_tensor(acc_shape_S, cutlass.Float32)
            _wgmma(mma_qk, acc_S, tSrQ, tSrK, True)
            if cutlass.const_expr(self.stamp_addr != 0):
                if tile == t_begin:
                    self.stamp(base.STAMP_FIRST_S, tidx, 0)

            # ---- mask, scale, this half's row maxima -> smem ----
            acc_S_mn = _mn_view_sm90(acc_S)
            pos0 = tile * BN + wg * HN
            tile_max = cute.make_rmem_tensor((rows_per_thr,), cutlass.Float32)
            for r in cutlass.range_constexpr(rows_per_thr):
                for c in cutlass.range_constexpr(cols_per_thr):
                    if pos0 + tScS_mn[0, c][1] > row_limit[r]:
                        acc_S_mn[r, c] = -cutlass.Float32.inf
                    else:
                        acc_S_mn[r, c] = acc_S_mn[r, c] * scale_log2
                tile_max[r] = xor_max(acc_S_mn[r, None].load().reduce(
                    cute.ReductionOp.MAX, -cutlass.Float32.inf, 0), QUAD)
                if tidx % 4 == 0:
                    sRow[tScS_mn[r, 0][0], wg] = tile_max[r]
            cute.arch.sync_threads()

            # ---- online softmax with the row max over both halves (same in both warpgroups) ----
            for r in cutlass.range_constexpr(rows_per_thr):
                other = sRow[tScS_mn[r, 0][0], 1 - wg]
                m_new = cute.arch.fmax(cute.arch.fmax(row_max[r], tile_max[r]), other)
                m_safe = 0.0 if m_new == -cutlass.Float32.inf else m_new
                p_row = cute.math.exp2(acc_S_mn[r, None].load() - m_safe, fastmath=True)
                alpha = cute.math.exp2(row_max[r] - m_safe, fastmath=True)
                row_sum[r] = row_sum[r] * alpha + p_row.reduce(cute.ReductionOp.ADD, cutlass.Float32.zero, 0)
                row_max[r] = m_new
                acc_S_mn[r, None] = p_row
                acc_O_mn[r, None] = acc_O_mn[r, None].load() * alpha

            # ---- this half of P -> smem (16-bit), visible to the tensor cores ----
            rP = cute.make_fragment_like(acc_S, self.dtype)
            rP.store(acc_S.load().to(self.dtype))
            for i in cutlass.range_constexpr(cute.size(rP)):
                tPsP[i] = rP[i]
            cute.arch.fence_proxy("async.shared", space="cta")
            cute.arch.sync_threads()

            # ---- O[:, wg half] += P V over the whole tile: SS wgmma ----
            sVt = cute.make_tensor(sKV[None, None, kv_slot].iterator, sVt_layout.outer)
            tOrV = mma_pv.make_fragment_B(thr_pv.partition_B(cute.local_tile(sVt, (self.dv_half, BN), (wg, 0))))
            _wgmma(mma_pv, acc_O, tOrP, tOrV, False)

        self.stamp(base.STAMP_LOOP_END, tidx, 0)
        cute.arch.cp_async_wait_group(0)
        # No griddepcontrol.launch_dependents here (unlike v4): a split CTA of this kernel leaves
        # no room on its SM for a combine CTA, so an early trigger puts all the combine's CTAs
        # on the few SMs without a split CTA, where they wait and then run crowded (+4-8 µs
        # at b = 1 on an H200, docs/perf/cute.md run 5). Untriggered, the combine is launched
        # when this grid ends, as without PDL.

        # ---- epilogue: add the two warpgroups' partial row sums, normalise, write ----
        cute.arch.sync_threads()
        for r in cutlass.range_constexpr(rows_per_thr):
            row_sum[r] = xor_sum(row_sum[r], QUAD)
            if tidx % 4 == 0:
                sRow[tScS_mn[r, 0][0], wg] = row_sum[r]
        cute.arch.sync_threads()
        self.stamp(base.STAMP_EPI_SYNC, tidx, 0)
        for r in cutlass.range_constexpr(rows_per_thr):
            total = row_sum[r] + sRow[tScS_mn[r, 0][0], 1 - wg]
            empty = total == 0.0
            inv = 0.0 if empty else 1.0 / total
            lse = -cutlass.Float32.inf if empty else (row_max[r] + cute.math.log2(total)) * 0.6931471805599453
            acc_O_mn[r, None] = acc_O_mn[r, None].load() * inv
            m = row0 + tScS_mn[r, 0][0]
            if wg == 0:
                if tidx % 4 == 0:
                    if m < self.M:
                        self.store_lse(mLsePart, mLse, b, split, num_splits, m, lse)

        cO = thr_pv.partition_C(cute.make_identity_tensor((BLOCK_M, self.dv_half)))
        # O through smem: WG0 stages its half in Q's space, WG1 in the first KV tile's (both free now)
        stage = storage.sQ.data_ptr()
        if wg == 1:
            stage = storage.sKV.data_ptr()
        self.store_result_staged(acc_O, cO, BLOCK_M, self.dv_half, row0, wg * self.dv_half, False, stage, mOPart,
                                 mOut, b, split, num_splits, kv_scale, wg_tidx, 1 + wg)
        self.stamp(base.STAMP_STORED, tidx, 0)


__all__ = ["MlaDecodeSplitKVSharedS"]
