"""CuTe DSL MLA decode kernel: split-KV attention over a paged latent cache, plus the combine.

Imports cutlass at module level: only :mod:`.mla_decode` imports this module, and only once
nvidia-cutlass-dsl is known to be installed.

Design (v1, "simplest correct"; see docs/cute.md):
- The query axis is folded into the head axis: row ``m = qi * H + h`` of an M = q_len * H
  tall tile (``q[b]`` is ``[Q, H, D]`` contiguous, so the fold is a free view). All rows share
  the one latent row per KV position, so a speculative verify with q_len 4 fills MMA rows that
  plain decode leaves empty.
- One CTA = one (64-row block of M, KV split, request). 256 threads = two warpgroups; both
  compute the same S = Q K^T tile (4 warps along M, 16 rows each: row max/sum need only quad
  shuffles), and each owns half of Dv = 512 for O += P V (four 64-wide accumulator chunks,
  128 fp32 registers per thread). The duplicated QK^T costs tensor-core time, not bytes.
- KV tile = 64 cache rows = a contiguous slice of one page (page size is a multiple of 64),
  loaded with cp.async (16 B per thread per copy) into a two-stage swizzled smem ring; V is the
  same smem read through a transposed view (ldmatrix.trans). Q stays in smem for the whole CTA.
- Tensor cores: warp-level mma.sync m16n8k16 (bf16/fp16 in, fp32 accumulate), which sm_90a and
  sm_100a both execute. Not wgmma/tcgen05 yet: that is the next step (docs/cute.md).
- Split-KV: split ``s`` of request ``b`` takes an equal share of that request's 64-row tiles,
  computed on the device from ``cache_seqlens`` (no host sync, graph-capturable). It writes its
  normalised partial O (fp32) and partial LSE; the combine kernel (:mod:`.mla_decode_combine`)
  merges splits and applies ``kv_scale`` to O.
- Masking: key position p is visible to row qi iff ``p <= n - Q + qi``; rows past n are zero-
  filled in smem instead of loaded (a stale cache may hold NaN, and 0 * NaN is NaN).
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass.cute.nvgpu import cpasync, warp

from .mla_decode_combine import SplitKVCombine

BLOCK_M = 64  # folded (q_len x heads) rows per CTA
BLOCK_N = 64  # cache rows per KV tile
NUM_THREADS = 256  # two warpgroups, each owning half of Dv
STAGES = 2  # KV smem ring depth
DV_CHUNK = 64  # width of one O accumulator chunk
LOG2_E = 1.4426950408889634
LN_2 = 0.6931471805599453


class MlaDecodeSplitKV(SplitKVCombine):
    """Static configuration of one compiled kernel (one shape class)."""

    def __init__(self, dtype, num_heads: int, q_len: int, head_dim: int, head_dim_v: int, page_size: int):
        if page_size % BLOCK_N:
            raise ValueError(f"page_size must be a multiple of {BLOCK_N}, got {page_size}")
        if head_dim % 64 or head_dim_v % (2 * DV_CHUNK) or head_dim_v > head_dim:
            raise ValueError(f"unsupported head dims D={head_dim} Dv={head_dim_v}")
        self.dtype = dtype
        self.H = num_heads
        self.Q = q_len
        self.M = num_heads * q_len
        self.D = head_dim
        self.Dv = head_dim_v
        self.page_size = page_size
        self.chunks_per_wg = head_dim_v // 2 // DV_CHUNK

    # -- host side: layouts, atoms, launches ---------------------------------------------------
    @cute.jit
    def __call__(
        self,
        mQ: cute.Tensor,  # (B, M, D) dtype
        mKV: cute.Tensor,  # (P * page_size, D) dtype: the cache, rows flattened
        mPageTable: cute.Tensor,  # (B, MP) int32
        mSeqlens: cute.Tensor,  # (B,) int32
        mOPart: cute.Tensor,  # (B, S, M, Dv) fp32: per-split normalised O
        mLsePart: cute.Tensor,  # (B, S, M) fp32: per-split LSE (natural log)
        mOut: cute.Tensor,  # (B, M, Dv) dtype
        mLse: cute.Tensor,  # (B, M) fp32
        scale_log2: cutlass.Float32,  # softmax_scale * kv_scale * log2(e)
        kv_scale: cutlass.Float32,
        stream,
    ):
        dtype = self.dtype
        # Swizzled smem: 8 rows x 64 elements (128 B) atoms, Swizzle<3,3,3> spreads the 16 B
        # chunks of 8 consecutive rows over all banks for ldmatrix.
        atom = cute.make_composed_layout(
            cute.make_swizzle(3, 3, 3), 0, cute.make_layout((8, 64), stride=(64, 1))
        )
        sQ_layout = cute.tile_to_shape(atom, (BLOCK_M, self.D), (0, 1))
        sKV_layout = cute.tile_to_shape(atom, (BLOCK_N, self.D, STAGES), (0, 1, 2))

        @cute.struct
        class SharedStorage:
            sQ: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(sQ_layout)], 1024]
            sKV: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(sKV_layout)], 1024]

        copy_bits = 128
        elems = copy_bits // dtype.width
        g2s_atom = cute.make_copy_atom(
            cpasync.CopyG2SOp(cache_mode=cpasync.LoadCacheMode.GLOBAL), dtype, num_bits_per_copy=copy_bits
        )
        # 8 threads cover one 64-element row segment; 32 rows per pass of 256 threads
        thr_layout = cute.make_layout((NUM_THREADS // 8, 8), stride=(8, 1))
        g2s_copy = cute.make_tiled_copy_tv(g2s_atom, thr_layout, cute.make_layout((1, elems)))

        # one warpgroup: 4 warps along M, each 16 rows; mma.sync m16n8k16
        tiled_mma = cute.make_tiled_mma(
            warp.MmaF16BF16Op(dtype, cutlass.Float32, (16, 8, 16)),
            (4, 1, 1),
            permutation_mnk=(BLOCK_M, 16, 16),
        )

        batch = mQ.shape[0]
        num_splits = mOPart.shape[1]
        m_blocks = (self.M + BLOCK_M - 1) // BLOCK_M
        self.attention_kernel(
            mQ, mKV, mPageTable, mSeqlens, mOPart, mLsePart, scale_log2,
            sQ_layout, sKV_layout, g2s_copy, tiled_mma, SharedStorage,
        ).launch(
            grid=[m_blocks, num_splits, batch],
            block=[NUM_THREADS, 1, 1],
            smem=SharedStorage.size_in_bytes(),
            stream=stream,
        )
        self.launch_combine(mOPart, mLsePart, mOut, mLse, kv_scale, stream)

    # -- the split-KV attention kernel ---------------------------------------------------------
    @cute.kernel
    def attention_kernel(
        self,
        mQ: cute.Tensor,
        mKV: cute.Tensor,
        mPageTable: cute.Tensor,
        mSeqlens: cute.Tensor,
        mOPart: cute.Tensor,
        mLsePart: cute.Tensor,
        scale_log2: cutlass.Float32,
        sQ_layout: cute.ComposedLayout,
        sKV_layout: cute.ComposedLayout,
        g2s_copy: cute.TiledCopy,
        tiled_mma: cute.TiledMma,
        SharedStorage: cutlass.Constexpr,
    ):
        dtype = self.dtype
        tidx, _, _ = cute.arch.thread_idx()
        m_block, split, b = cute.arch.block_idx()
        num_splits = cute.arch.grid_dim()[1]
        wg = tidx // 128
        wg_tidx = tidx % 128

        n = mSeqlens[b]
        n_tiles = (n + BLOCK_N - 1) // BLOCK_N
        per_split = (n_tiles + num_splits - 1) // num_splits
        t_begin = split * per_split
        t_end = cutlass.min(t_begin + per_split, n_tiles)
        row0 = m_block * BLOCK_M

        smem = cutlass.utils.SmemAllocator()
        storage = smem.allocate(SharedStorage)
        sQ = storage.sQ.get_tensor(sQ_layout)
        sKV = storage.sKV.get_tensor(sKV_layout)

        # ---- global -> shared copies: Q once, KV tiles into the ring ----
        thr_g2s = g2s_copy.get_slice(tidx)
        gQ = cute.local_tile(mQ[b, None, None], (BLOCK_M, self.D), (m_block, 0))
        cTile = cute.make_identity_tensor((BLOCK_M, self.D))  # (row, col) of each element
        tQgQ = thr_g2s.partition_S(gQ)
        tQsQ = thr_g2s.partition_D(sQ)
        tQc = thr_g2s.partition_S(cTile)
        for r in cutlass.range_constexpr(cute.size(tQsQ.shape[1])):
            if row0 + tQc[0, r, 0][0] < self.M:
                cute.copy(g2s_copy, tQgQ[None, r, None], tQsQ[None, r, None])
            else:
                tQsQ[None, r, None].fill(0)

        tKVc = thr_g2s.partition_S(cute.make_identity_tensor((BLOCK_N, self.D)))

        if t_begin < t_end:
            self.load_kv_tile(mKV, mPageTable, b, n, t_begin, 0, sKV, thr_g2s, g2s_copy, tKVc)
        cute.arch.cp_async_commit_group()

        # ---- MMA partitions (per warpgroup: both see all 64 rows) ----
        thr_mma = tiled_mma.get_slice(wg_tidx)
        ldsm = warp.LdMatrix8x8x16bOp(transpose=False, num_matrices=4)
        ldsm_t = warp.LdMatrix8x8x16bOp(transpose=True, num_matrices=4)
        s2r_A = cute.make_tiled_copy_A(cute.make_copy_atom(ldsm, dtype), tiled_mma).get_slice(wg_tidx)
        s2r_B = cute.make_tiled_copy_B(cute.make_copy_atom(ldsm, dtype), tiled_mma).get_slice(wg_tidx)
        s2r_Vt = cute.make_tiled_copy_B(cute.make_copy_atom(ldsm_t, dtype), tiled_mma).get_slice(wg_tidx)

        # register fragments for two 16-wide k-steps (double-buffered smem -> register loads)
        sQ_k2 = cute.local_tile(sQ, (BLOCK_M, 32), (0, 0))
        tSrQ = thr_mma.make_fragment_A(thr_mma.partition_A(sQ_k2))
        tSrQ_v = s2r_A.retile(tSrQ)
        tSsQ = s2r_A.partition_S(sQ)
        k_steps = self.D // 16

        acc_shape_S = thr_mma.partition_shape_C((BLOCK_M, BLOCK_N))
        acc_shape_O = thr_mma.partition_shape_C((BLOCK_M, DV_CHUNK))
        acc_O = [cute.make_rmem_tensor(acc_shape_O, cutlass.Float32) for _ in range(self.chunks_per_wg)]
        for c in cutlass.range_constexpr(self.chunks_per_wg):
            acc_O[c].fill(0.0)

        # coordinates of this thread's S elements, for the mask
        tScS_mn = _mn_view(thr_mma.partition_C(cute.make_identity_tensor((BLOCK_M, BLOCK_N))))
        rows_per_thr = cute.size(tScS_mn, mode=[0])
        cols_per_thr = cute.size(tScS_mn, mode=[1])
        row_max = cute.make_rmem_tensor((rows_per_thr,), cutlass.Float32)
        row_sum = cute.make_rmem_tensor((rows_per_thr,), cutlass.Float32)
        row_max.fill(-cutlass.Float32.inf)
        row_sum.fill(0.0)
        # last visible key position of each of this thread's rows: n - Q + qi
        row_limit = cute.make_rmem_tensor((rows_per_thr,), cutlass.Int32)
        for r in cutlass.range_constexpr(rows_per_thr):
            m = row0 + tScS_mn[r, 0][0]
            row_limit[r] = n - self.Q + cutlass.min(m, self.M - 1) // self.H

        for tile in cutlass.range(t_begin, t_end, 1, unroll=1):
            stage = (tile - t_begin) % STAGES
            cute.arch.cp_async_wait_group(0)
            cute.arch.sync_threads()
            if tile + 1 < t_end:
                self.load_kv_tile(mKV, mPageTable, b, n, tile + 1, 1 - stage, sKV, thr_g2s, g2s_copy, tKVc)
            cute.arch.cp_async_commit_group()

            sK = sKV[None, None, stage]
            # ---- S = Q K^T over D ----
            sK_k2 = cute.local_tile(sK, (BLOCK_N, 32), (0, 0))
            tSrK = thr_mma.make_fragment_B(thr_mma.partition_B(sK_k2))
            tSrK_v = s2r_B.retile(tSrK)
            tSsK = s2r_B.partition_S(sK)
            acc_S = cute.make_rmem_tensor(acc_shape_S, cutlass.Float32)
            acc_S.fill(0.0)
            cute.copy(s2r_A, tSsQ[None, None, 0], tSrQ_v[None, None, 0])
            cute.copy(s2r_B, tSsK[None, None, 0], tSrK_v[None, None, 0])
            for k in cutlass.range_constexpr(k_steps):
                if k + 1 < k_steps:
                    cute.copy(s2r_A, tSsQ[None, None, k + 1], tSrQ_v[None, None, (k + 1) % 2])
                    cute.copy(s2r_B, tSsK[None, None, k + 1], tSrK_v[None, None, (k + 1) % 2])
                cute.gemm(tiled_mma, acc_S, tSrQ[None, None, k % 2], tSrK[None, None, k % 2], acc_S)

            # ---- mask + online softmax (log2 domain), rescale O ----
            acc_S_mn = _mn_view(acc_S)
            pos0 = tile * BLOCK_N
            for r in cutlass.range_constexpr(rows_per_thr):
                for c in cutlass.range_constexpr(cols_per_thr):
                    if pos0 + tScS_mn[0, c][1] > row_limit[r]:
                        acc_S_mn[r, c] = -cutlass.Float32.inf
                    else:
                        acc_S_mn[r, c] = acc_S_mn[r, c] * scale_log2
                s_row = acc_S_mn[r, None].load()
                m_new = _quad_max(s_row.reduce(cute.ReductionOp.MAX, -cutlass.Float32.inf, 0))
                m_new = cute.arch.fmax(m_new, row_max[r])
                m_safe = 0.0 if m_new == -cutlass.Float32.inf else m_new
                p_row = cute.math.exp2(s_row - m_safe, fastmath=True)
                alpha = cute.math.exp2(row_max[r] - m_safe, fastmath=True)
                row_sum[r] = row_sum[r] * alpha + p_row.reduce(cute.ReductionOp.ADD, cutlass.Float32.zero, 0)
                row_max[r] = m_new
                acc_S_mn[r, None] = p_row
                for c in cutlass.range_constexpr(self.chunks_per_wg):
                    acc_O_mn = _mn_view(acc_O[c])
                    acc_O_mn[r, None] = acc_O_mn[r, None].load() * alpha

            # ---- O += P V: P from registers, V = first Dv columns of the same smem tile ----
            rP = cute.make_fragment_like(acc_S, dtype)
            rP.store(acc_S.load().to(dtype))
            tOrP = _acc_as_A_operand(rP)
            sVt = cute.composition(sK, cute.make_layout((self.D, BLOCK_N), stride=(BLOCK_N, 1)))
            for c in cutlass.range_constexpr(self.chunks_per_wg):
                sVt_c = cute.local_tile(sVt, (DV_CHUNK, BLOCK_N), (wg * self.chunks_per_wg + c, 0))
                tOrV = thr_mma.make_fragment_B(thr_mma.partition_B(sVt_c))
                tOrV_v = s2r_Vt.retile(tOrV)
                tOsV = s2r_Vt.partition_S(sVt_c)
                cute.copy(s2r_Vt, tOsV, tOrV_v)
                for k in cutlass.range_constexpr(cute.size(tOrP.shape[2])):
                    cute.gemm(tiled_mma, acc_O[c], tOrP[None, None, k], tOrV[None, None, k], acc_O[c])

        # an empty split still issued the Q copy: drain it before the CTA exits
        cute.arch.cp_async_wait_group(0)

        # ---- epilogue: normalise, write the split's partial O and LSE ----
        for r in cutlass.range_constexpr(rows_per_thr):
            total = _quad_sum(row_sum[r])
            empty = total == 0.0
            inv = 0.0 if empty else 1.0 / total
            lse = -cutlass.Float32.inf if empty else (row_max[r] + cute.math.log2(total)) * LN_2
            for c in cutlass.range_constexpr(self.chunks_per_wg):
                acc_O_mn = _mn_view(acc_O[c])
                acc_O_mn[r, None] = acc_O_mn[r, None].load() * inv
            m = row0 + tScS_mn[r, 0][0]
            if wg == 0:
                if tidx % 4 == 0:
                    if m < self.M:
                        mLsePart[b, split, m] = lse

        cO = thr_mma.partition_C(cute.make_identity_tensor((BLOCK_M, DV_CHUNK)))
        for c in cutlass.range_constexpr(self.chunks_per_wg):
            col0 = (wg * self.chunks_per_wg + c) * DV_CHUNK
            for i in cutlass.range_constexpr(cute.size(acc_O[c])):
                m = row0 + cO[i][0]
                if m < self.M:
                    mOPart[b, split, m, col0 + cO[i][1]] = acc_O[c][i]

    @cute.jit
    def load_kv_tile(self, mKV, mPageTable, b, n, tile, stage, sKV, thr_g2s, g2s_copy, tKVc):
        """Start the cp.async of KV tile ``tile`` (64 rows inside one page) into ring slot ``stage``;
        rows at or past ``n`` are zero-filled instead."""
        pos0 = tile * BLOCK_N
        page = mPageTable[b, pos0 // self.page_size]
        # 64-bit: row * D overflows int32 once the cache holds more than 2^31 elements
        cache_row0 = cutlass.Int64(page) * self.page_size + pos0 % self.page_size
        gKV = cute.local_tile(mKV, (BLOCK_N, self.D), (cache_row0 // BLOCK_N, 0))
        tKVg = thr_g2s.partition_S(gKV)
        tKVs = thr_g2s.partition_D(sKV[None, None, stage])
        for r in cutlass.range_constexpr(cute.size(tKVs.shape[1])):
            if pos0 + tKVc[0, r, 0][0] < n:
                cute.copy(g2s_copy, tKVg[None, r, None], tKVs[None, r, None])
            else:
                tKVs[None, r, None].fill(0)


# -- register-layout helpers -------------------------------------------------------------------
def _mn_view(acc: cute.Tensor) -> cute.Tensor:
    """View an mma.sync accumulator ((2, 2), MMA_M, MMA_N) as (rows, cols) of this thread."""
    lay = cute.make_layout(acc.layout.shape)
    mn = cute.make_layout(
        ((lay.shape[0][1], lay.shape[1]), (lay.shape[0][0], lay.shape[2])),
        stride=((lay.stride[0][1], lay.stride[1]), (lay.stride[0][0], lay.stride[2])),
    )
    return cute.make_tensor(acc.iterator, cute.composition(acc.layout, mn))


def _acc_as_A_operand(rP: cute.Tensor) -> cute.Tensor:
    """An m16n8 accumulator (4, MMA_M, MMA_N) reread as the A operand of m16n8k16:
    two adjacent n8 tiles form one k16 step: ((4, 2), MMA_M, MMA_N / 2)."""
    d = cute.logical_divide(rP.layout, (None, None, 2))
    lay = cute.make_layout(
        ((d.shape[0], d.shape[2][0]), d.shape[1], d.shape[2][1]),
        stride=((d.stride[0], d.stride[2][0]), d.stride[1], d.stride[2][1]),
    )
    return cute.make_tensor(rP.iterator, lay)


@cute.jit
def _quad_max(v: cutlass.Float32) -> cutlass.Float32:
    # the 4 threads of a quad hold the same two rows of an m16n8 tile
    v = cute.arch.fmax(v, cute.arch.shuffle_sync_bfly(v, offset=2, mask=-1, mask_and_clamp=31))
    return cute.arch.fmax(v, cute.arch.shuffle_sync_bfly(v, offset=1, mask=-1, mask_and_clamp=31))


@cute.jit
def _quad_sum(v: cutlass.Float32) -> cutlass.Float32:
    v = v + cute.arch.shuffle_sync_bfly(v, offset=2, mask=-1, mask_and_clamp=31)
    return v + cute.arch.shuffle_sync_bfly(v, offset=1, mask=-1, mask_and_clamp=31)


def softmax_scale_log2(softmax_scale: float, kv_scale: float) -> float:
    return float(softmax_scale) * float(kv_scale) * LOG2_E


__all__ = ["BLOCK_M", "BLOCK_N", "MlaDecodeSplitKV", "softmax_scale_log2"]
