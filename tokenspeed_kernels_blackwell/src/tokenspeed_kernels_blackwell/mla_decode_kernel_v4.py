"""CuTe DSL MLA decode, v4 for sm_90a and few folded rows: the KV rows are the MMA's M axis.

Imports cutlass at module level (only :mod:`.mla_decode` imports it, once the DSL is known to be
installed). Same interface, split-KV scheme, loader and combine as v3; used where the folded
query rows M = H x q_len are at most 32 (plain decode with 16 or 32 heads, a 2-token verify with
16), where v3 pads M to the 64 rows of a wgmma and so spends 2-4x the tensor work that the real
rows need. On an H200 that made the 16-head decode MMA-bound at ~82-87% of copy, and an fp8 cache
slower than a 16-bit one (docs/perf/cute.md, run 4). Here (docs/cute.md, "v4"):

- S^T = K Q^T: one wgmma chain m64 nN k16 (N = 16 or 32 query rows, no padding to 64), A = the
  64-row KV tile (K-major, as loaded), B = Q (K-major), 36 k-steps over D = 576.
- The softmax runs down the columns of S^T (one column per query row): a thread's two rows, then
  the 8 lanes of a column (shuffles), then the 4 warps (shared memory, one barrier).
- O^T += V^T P^T: m64 nN k16 over the 8 64-row blocks of Dv = 512, A = V^T read MN-major from
  the same smem tile (no copy), B = P^T written to smem (2-4 KB) by the softmax.
- One warpgroup per CTA (128 threads, 64-80 fp32 accumulator registers), one CTA per SM: Q
  (18-36 KB) + a 2-slot ring of 72 KB tiles; per tile the MMAs read ~160 KB of smem (~0.6 µs),
  well under the tile's load time, so the loads stay the limit.
- fp8 e4m3 cache: register-staged. Each thread loads its 288 bytes of the *next* tile from
  global memory into registers (16-byte loads) before the MMAs of the current tile, so the loads
  fly under them; at the top of the next iteration it converts them (e4m3 pairs -> 16-bit) and
  stores them into the one 16-bit tile the MMAs read. No fp8 smem staging and no smem re-read
  (v3's staging ring + convert-in-smem made an fp8 cache 1.3-1.5x slower than a 16-bit one).
  One tile in flight a CTA does not cover the memory latency, so: the tile after it is prefetched
  into L2 (``FP8_L2_AHEAD``), and with one 16-bit tile (95-113 KB of smem, <= 255 registers) two
  CTAs share an SM, which the split rule counts (``mla_decode.FP8_TWO_PER_SM_FROM_TILES``).
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass.cute.nvgpu import OperandMajorMode, cpasync, warpgroup

from . import mla_decode_kernel as base
from .mla_decode_combine import COLUMN, xor_max, xor_sum
from .mla_decode_kernel_v2 import MlaDecodeSplitKVWgmma, _mn_view_sm90, _wgmma
from .mla_decode_kernel_v5_loads import prefetch_tile

NUM_THREADS_V4 = 128  # one warpgroup
MAX_ROWS_V4 = 32  # folded query rows this kernel takes (the wgmma N)
KV_ROWS = 64  # a KV tile = the wgmma M
# fp8: the tile after the one in flight to registers is asked of L2 (one instruction of one
# thread): 3.4% faster at 32 rows, 0.5-1% at 16 (H200, run 48); two tiles ahead was slower
FP8_L2_AHEAD = 1
# sm_90's shared memory an SM, and what the driver reserves a CTA: with an fp8 cache two CTAs fit
SMEM_PER_SM, SMEM_RESERVED = 228 * 1024, 1024


class MlaDecodeSplitKVRowsOnM(MlaDecodeSplitKVWgmma):
    """v4: one warpgroup, KV rows on the MMA M axis, query rows on N (M = H x q_len <= 32)."""

    one_split_direct = True  # one split a request: out and lse written here, no combine

    def __init__(self, dtype, num_heads, q_len, head_dim, head_dim_v, page_size, block_n=64, stages=2,
                 combine_batch=16, kv_dtype=None):
        super().__init__(dtype, num_heads, q_len, head_dim, head_dim_v, page_size, KV_ROWS, stages,
                         combine_batch)
        if self.M > MAX_ROWS_V4:
            raise ValueError(f"v4 takes at most {MAX_ROWS_V4} folded rows, got {self.M}")
        self.N = 16 if self.M <= 16 else 32
        self.kv_dtype = dtype if kv_dtype is None else kv_dtype
        self.kv_fp8 = self.kv_dtype.width == 8
        self.kv_slots = 1 if self.kv_fp8 else 2  # 16-bit tiles in smem (fp8: staged in registers)

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
        BN, N = self.block_n, self.N
        k_atom = warpgroup.make_smem_layout_atom(warpgroup.SmemLayoutAtomKind.K_SW128, dtype)
        mn_atom = warpgroup.make_smem_layout_atom(warpgroup.SmemLayoutAtomKind.MN_SW128, dtype)
        sQ_layout = cute.tile_to_shape(k_atom, (N, self.D), (0, 1))
        sKV_layout = cute.tile_to_shape(k_atom, (BN, self.D, self.kv_slots), (0, 1, 2))
        # V^T view of one tile: (Dv, BN), MN-major; the same offsets as sKV's (row, col < Dv)
        sVt_layout = cute.tile_to_shape(mn_atom, (self.Dv, BN), (1, 0))
        # P^T: the B operand of O^T += V^T P^T, (N query rows, BN keys), K-major like Q
        sP_layout = cute.tile_to_shape(k_atom, (N, BN), (0, 1))

        @cute.struct
        class SharedStorage:
            sQ: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(sQ_layout)], 1024]
            sKV: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(sKV_layout)], 1024]
            sP: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(sP_layout)], 1024]
            # per warp and query row: the tile's column maximum, at the end the partial sum
            sCol: cute.struct.Align[cute.struct.MemRange[cutlass.Float32, 4 * MAX_ROWS_V4], 16]

        copy_bits = 128
        g2s_atom = cute.make_copy_atom(
            cpasync.CopyG2SOp(cache_mode=cpasync.LoadCacheMode.GLOBAL), dtype, num_bits_per_copy=copy_bits
        )
        thr_layout = cute.make_layout((NUM_THREADS_V4 // 8, 8), stride=(8, 1))
        g2s_copy = cute.make_tiled_copy_tv(g2s_atom, thr_layout, cute.make_layout((1, copy_bits // dtype.width)))
        kv_copy = g2s_copy
        if cutlass.const_expr(self.kv_fp8):
            # global -> registers, 16 fp8 per load; 4 threads cover 64 columns: 2 x 9 loads each
            kv_atom = cute.make_copy_atom(cute.nvgpu.CopyUniversalOp(), self.kv_dtype, num_bits_per_copy=copy_bits)
            kv_copy = cute.make_tiled_copy_tv(kv_atom, cute.make_layout((NUM_THREADS_V4 // 4, 4), stride=(4, 1)),
                                              cute.make_layout((1, copy_bits // self.kv_dtype.width)))

        # S^T = K Q^T: A = KV tile (K-major), B = Q (K-major)
        mma_s = sm90_utils.make_trivial_tiled_mma(
            dtype, dtype, OperandMajorMode.K, OperandMajorMode.K, cutlass.Float32, (1, 1, 1), (BN, N),
        )
        # O^T += V^T P^T: A = V^T (MN-major view of the same tile), B = P^T (K-major)
        mma_o = sm90_utils.make_trivial_tiled_mma(
            dtype, dtype, OperandMajorMode.MN, OperandMajorMode.K, cutlass.Float32, (1, 1, 1), (BN, N),
        )

        if cutlass.const_expr(self.kv_fp8 and 2 * (SharedStorage.size_in_bytes() + SMEM_RESERVED) > SMEM_PER_SM):
            # the split rule counts two of these CTAs an SM (mla_decode.FP8_TWO_PER_SM_FROM_TILES)
            raise ValueError(f"v4 fp8: {SharedStorage.size_in_bytes()} bytes of smem a CTA, two no longer fit "
                             f"in an SM's {SMEM_PER_SM}: change the split rule with it")
        batch = mQ.shape[0]
        num_splits = mOPart.shape[1]
        self.attention_kernel_v4(
            mQ, mKV, mPageTable, mSeqlens, mOPart, mLsePart, mOut, mLse, scale_log2, kv_scale,
            sQ_layout, sKV_layout, sVt_layout, sP_layout, g2s_copy, kv_copy, mma_s, mma_o, SharedStorage,
        ).launch(
            grid=[1, num_splits, batch],
            block=[NUM_THREADS_V4, 1, 1],
            smem=SharedStorage.size_in_bytes(),
            stream=stream,
        )
        self.launch_combine(mOPart, mLsePart, mOut, mLse, kv_scale, stream)

    @cute.kernel
    def attention_kernel_v4(
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
        g2s_copy: cute.TiledCopy,
        kv_copy: cute.TiledCopy,
        mma_s: cute.TiledMma,
        mma_o: cute.TiledMma,
        SharedStorage: cutlass.Constexpr,
    ):
        BN, N = self.block_n, self.N
        STAGES = self.stages  # the cp.async ring of a 16-bit cache
        tidx, _, _ = cute.arch.thread_idx()
        _, split, b = cute.arch.block_idx()
        num_splits = cute.arch.grid_dim()[1]
        warp = tidx // 32
        lane = tidx % 32
        self.stamp(base.STAMP_ENTRY, tidx, 0)

        n = mSeqlens[b]
        t_begin, t_end = self.split_tiles(n, split, num_splits, BN)

        smem = cutlass.utils.SmemAllocator()
        storage = smem.allocate(SharedStorage)
        sQ = storage.sQ.get_tensor(sQ_layout.outer, swizzle=sQ_layout.inner)
        sKV = storage.sKV.get_tensor(sKV_layout.outer, swizzle=sKV_layout.inner)
        sP = storage.sP.get_tensor(sP_layout.outer, swizzle=sP_layout.inner)
        # the same P^T smem seen as (keys, query rows): where the S^T-shaped accumulator goes
        sP_kn = storage.sP.get_tensor(cute.select(sP_layout.outer, mode=[1, 0]), swizzle=sP_layout.inner)
        sCol = storage.sCol.get_tensor(cute.make_layout((4, MAX_ROWS_V4), stride=(MAX_ROWS_V4, 1)))

        # ---- Q (rows past M zero-filled), then the first STAGES - 1 KV tiles ----
        thr_g2s = g2s_copy.get_slice(tidx)
        gQ = cute.local_tile(mQ[b, None, None], (N, self.D), (0, 0))
        tQgQ = thr_g2s.partition_S(gQ)
        tQsQ = thr_g2s.partition_D(sQ)
        tQc = thr_g2s.partition_S(cute.make_identity_tensor((N, self.D)))
        for r in cutlass.range_constexpr(cute.size(tQsQ.shape[1])):
            if tQc[0, r, 0][0] < self.M:
                cute.copy(g2s_copy, tQgQ[None, r, None], tQsQ[None, r, None])
            else:
                tQsQ[None, r, None].fill(0)
        thr_kv = kv_copy.get_slice(tidx)
        tKVc = thr_kv.partition_S(cute.make_identity_tensor((BN, self.D)))
        rKV = cute.make_rmem_tensor(tKVc.shape, self.kv_dtype)  # fp8: the next tile, in registers
        tKVs = thr_kv.partition_D(sKV[None, None, 0])  # fp8: where a thread's converted part goes
        if cutlass.const_expr(self.kv_fp8):
            cute.arch.cp_async_commit_group()  # Q
            # the first tile, or (empty split) any valid one: the loads are unconditional
            self.load_kv_tile_regs(mKV, mPageTable, b, t_begin if t_begin < t_end else 0, rKV, thr_kv, kv_copy)
        else:
            for s in cutlass.range_constexpr(STAGES - 1):
                if t_begin + s < t_end:
                    self.load_kv_tile_v2(mKV, mPageTable, b, n, t_begin + s, s, sKV, thr_kv, kv_copy, tKVc)
                cute.arch.cp_async_commit_group()

        self.stamp(base.STAMP_SETUP, tidx, 0)

        # ---- fragments ----
        thr_s = mma_s.get_slice(tidx)
        thr_o = mma_o.get_slice(tidx)
        tSrQ = mma_s.make_fragment_B(thr_s.partition_B(sQ))
        acc_shape_S = thr_s.partition_shape_C((BN, N))
        tPsP = thr_s.partition_C(sP_kn)  # where this thread's P^T elements go
        tOrP = mma_o.make_fragment_B(thr_o.partition_B(sP))
        acc_O = cute.make_rmem_tensor(thr_o.partition_shape_C((self.Dv, N)), cutlass.Float32)
        acc_O.fill(0.0)
        acc_O_mn = _mn_view_sm90(acc_O)  # (Dv rows of this thread, its query columns)

        tScS_mn = _mn_view_sm90(thr_s.partition_C(cute.make_identity_tensor((BN, N))))
        rows_per_thr = cute.size(tScS_mn, mode=[0])
        cols_per_thr = cute.size(tScS_mn, mode=[1])
        col_max = cute.make_rmem_tensor((cols_per_thr,), cutlass.Float32)
        col_sum = cute.make_rmem_tensor((cols_per_thr,), cutlass.Float32)  # over this thread's rows
        col_max.fill(-cutlass.Float32.inf)
        col_sum.fill(0.0)
        col_limit = cute.make_rmem_tensor((cols_per_thr,), cutlass.Int32)
        for c in cutlass.range_constexpr(cols_per_thr):
            q = tScS_mn[0, c][1]
            col_limit[c] = n - self.Q + cutlass.min(q, self.M - 1) // self.H

        for tile in cutlass.range(t_begin, t_end, 1, unroll=1):
            kv_slot = 0
            if cutlass.const_expr(self.kv_fp8):
                cute.arch.cp_async_wait_group(0)  # Q (first tile)
                # every warp is done with the previous tile's sCol, sP and the 16-bit tile
                cute.arch.sync_threads()
                # this tile: registers -> 16-bit -> smem; rows past n as zeros (a stale cache may
                # hold NaN encodings, and 0 x NaN = NaN)
                pos0 = tile * BN
                for r in cutlass.range_constexpr(cute.size(tKVs.shape[1])):
                    if pos0 + tKVc[0, r, 0][0] < n:
                        for c in cutlass.range_constexpr(cute.size(tKVs.shape[2])):
                            tKVs[None, r, c].store(rKV[None, r, c].load().to(self.dtype))
                    else:
                        tKVs[None, r, None].fill(0)
                # the next tile's loads fly under this tile's MMAs (the last tile reloads itself)
                self.load_kv_tile_regs(mKV, mPageTable, b, cutlass.min(tile + 1, t_end - 1), rKV, thr_kv, kv_copy)
                if tidx == 0:
                    if tile + 1 + FP8_L2_AHEAD < t_end:
                        prefetch_tile(mKV, mPageTable, b, tile + 1 + FP8_L2_AHEAD, BN, self.page_size)
                cute.arch.fence_proxy("async.shared", space="cta")
                cute.arch.sync_threads()
            else:
                stage = (tile - t_begin) % STAGES
                cute.arch.cp_async_wait_group(STAGES - 2)
                cute.arch.fence_proxy("async.shared", space="cta")
                # also: every warp is done with the previous tile's sCol, sP and KV slot
                cute.arch.sync_threads()
                nxt = tile + STAGES - 1
                if nxt < t_end:
                    self.load_kv_tile_v2(mKV, mPageTable, b, n, nxt, (nxt - t_begin) % STAGES, sKV, thr_kv,
                                         kv_copy, tKVc)
                cute.arch.cp_async_commit_group()
                kv_slot = stage
            sK = sKV[None, None, kv_slot]
            if cutlass.const_expr(self.stamp_addr != 0):
                if tile == t_begin:
                    self.stamp(base.STAMP_Q, tidx, 0)  # Q and the first tile landed

            # ---- S^T = K Q^T ----
            tSrK = mma_s.make_fragment_A(thr_s.partition_A(sK))
            acc_S = cute.make_rmem_tensor(acc_shape_S, cutlass.Float32)
            _wgmma(mma_s, acc_S, tSrK, tSrQ, True)
            if cutlass.const_expr(self.stamp_addr != 0):
                if tile == t_begin:
                    self.stamp(base.STAMP_FIRST_S, tidx, 0)

            # ---- mask, scale; column maxima of this tile -> smem ----
            acc_S_mn = _mn_view_sm90(acc_S)
            pos0 = tile * BN
            tile_max = cute.make_rmem_tensor((cols_per_thr,), cutlass.Float32)
            for c in cutlass.range_constexpr(cols_per_thr):
                mx = -cutlass.Float32.inf
                for r in cutlass.range_constexpr(rows_per_thr):
                    if pos0 + tScS_mn[r, 0][0] > col_limit[c]:
                        acc_S_mn[r, c] = -cutlass.Float32.inf
                    else:
                        acc_S_mn[r, c] = acc_S_mn[r, c] * scale_log2
                    mx = cute.arch.fmax(mx, acc_S_mn[r, c])
                tile_max[c] = xor_max(mx, COLUMN)
                if lane < 4:
                    sCol[warp, tScS_mn[0, c][1]] = tile_max[c]
            cute.arch.sync_threads()

            # ---- online softmax down each column (same max in every thread of a column) ----
            for c in cutlass.range_constexpr(cols_per_thr):
                q = tScS_mn[0, c][1]
                m_new = cute.arch.fmax(col_max[c], tile_max[c])
                for w in cutlass.range_constexpr(4):
                    m_new = cute.arch.fmax(m_new, sCol[w, q])
                m_safe = 0.0 if m_new == -cutlass.Float32.inf else m_new
                alpha = cute.math.exp2(col_max[c] - m_safe, fastmath=True)
                p_col = cute.math.exp2(acc_S_mn[None, c].load() - m_safe, fastmath=True)
                col_sum[c] = col_sum[c] * alpha + p_col.reduce(cute.ReductionOp.ADD, cutlass.Float32.zero, 0)
                col_max[c] = m_new
                acc_S_mn[None, c] = p_col
                acc_O_mn[None, c] = acc_O_mn[None, c].load() * alpha

            # ---- P^T -> smem (16-bit), visible to the tensor cores ----
            rP = cute.make_fragment_like(acc_S, self.dtype)
            rP.store(acc_S.load().to(self.dtype))
            for i in cutlass.range_constexpr(cute.size(rP)):
                tPsP[i] = rP[i]
            cute.arch.fence_proxy("async.shared", space="cta")
            cute.arch.sync_threads()

            # ---- O^T += V^T P^T over all 8 row blocks of Dv ----
            sVt = cute.make_tensor(sKV[None, None, kv_slot].iterator, sVt_layout.outer)
            tOrV = mma_o.make_fragment_A(thr_o.partition_A(sVt))
            _wgmma(mma_o, acc_O, tOrV, tOrP, False)

        self.stamp(base.STAMP_LOOP_END, tidx, 0)
        cute.arch.cp_async_wait_group(0)
        # The combine (a programmatic dependent launch) may now be scheduled: it waits for this
        # grid's end itself (griddepcontrol.wait). A combine CTA fits beside a split CTA of this
        # kernel (~180 KB of smem), so the combine spreads over the SMs. Not at the start: its
        # CTAs would wait there for the whole split stage (26.1 vs 22.5 µs at b = 1, run 5).
        cute.arch.griddepcontrol_launch_dependents()

        # ---- epilogue: column sums over all rows, normalise, write the split's partials ----
        cute.arch.sync_threads()
        for c in cutlass.range_constexpr(cols_per_thr):
            col_sum[c] = xor_sum(col_sum[c], COLUMN)
            if lane < 4:
                sCol[warp, tScS_mn[0, c][1]] = col_sum[c]
        cute.arch.sync_threads()
        self.stamp(base.STAMP_EPI_SYNC, tidx, 0)
        for c in cutlass.range_constexpr(cols_per_thr):
            q = tScS_mn[0, c][1]
            total = cutlass.Float32(0.0)
            for w in cutlass.range_constexpr(4):
                total = total + sCol[w, q]
            empty = total == 0.0
            inv = 0.0 if empty else 1.0 / total
            lse = -cutlass.Float32.inf if empty else (col_max[c] + cute.math.log2(total)) * 0.6931471805599453
            acc_O_mn[None, c] = acc_O_mn[None, c].load() * inv
            if warp == 0:
                if lane < 4:
                    if q < self.M:
                        self.store_lse(mLsePart, mLse, b, split, num_splits, q, lse)

        cO = thr_o.partition_C(cute.make_identity_tensor((self.Dv, N)))
        # O^T through smem (the KV ring: free after the barriers above) as O's rows
        self.store_result_staged(acc_O, cO, N, self.Dv, 0, 0, True, storage.sKV.data_ptr(), mOPart, mOut, b, split,
                                 num_splits, kv_scale, tidx, 1)
        self.stamp(base.STAMP_STORED, tidx, 0)


    @cute.jit
    def load_kv_tile_regs(self, mKV, mPageTable, b, tile, rKV, thr_kv, kv_copy):
        """Global -> register loads of this thread's part of KV tile ``tile`` (64 rows inside one
        page, all within the page's allocation; rows past the request's length are loaded too and
        zeroed when stored to smem)."""
        BN = self.block_n
        pos0 = tile * BN
        page = cutlass.Int64(mPageTable[b, pos0 // self.page_size])
        # clamped into the cache: the prologue of an empty request (length 0) loads "tile 0",
        # whose table entry need not name a real page; its data is never used
        page = cutlass.max(cutlass.min(page, mKV.shape[0] // self.page_size - 1), cutlass.Int64(0))
        cache_row0 = page * self.page_size + pos0 % self.page_size
        gKV = cute.local_tile(mKV, (BN, self.D), (cache_row0 // BN, 0))
        cute.copy(kv_copy, thr_kv.partition_S(gKV), rKV)


__all__ = ["MAX_ROWS_V4", "MlaDecodeSplitKVRowsOnM"]
