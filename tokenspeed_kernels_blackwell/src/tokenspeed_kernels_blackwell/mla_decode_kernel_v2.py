"""CuTe DSL MLA decode, v2 for sm_90a: warpgroup MMA (wgmma) over a deeper cp.async ring.

Imports cutlass at module level: only :mod:`.mla_decode` imports this module, and only once
nvidia-cutlass-dsl is known to be installed. Same launch interface, split-KV scheme, masking and
combine kernel as v1 (:mod:`.mla_decode_kernel`, which this class extends); what changes is the
inner loop (docs/cute.md, "v2"):

- S = Q K^T is one wgmma chain per warpgroup (m64 x BLOCK_N x k16, both operands read from
  shared memory through descriptors: Q resident, K = the cache tile), no ldmatrix, no
  register-file traffic for the operands.
- O += P V is a register-A wgmma (m64 n256 k16): P is the softmax of S converted to 16-bit in
  registers, V is the first Dv columns of the *same* smem tile, read as an MN-major B operand.
  The 128B-swizzled K-major layout of the (BLOCK_N, D) tile and the MN-major layout of the
  (Dv, BLOCK_N) view map every (row, col) to the same byte, so no second load and no copy.
- Each warpgroup owns half of Dv (256 columns, 128 fp32 accumulators per thread). Both still
  compute the same S (the cheaper of the two ways to share it costs a round trip of P through
  smem and a barrier per tile; not done yet).
- KV ring: ``stages`` tiles of ``block_n`` rows. 64 x 2 keeps v1's tile, 32 x 4 keeps three tiles
  (~110 KB) in flight per SM for the memory-bound shapes. cp.async writes are made visible to
  the tensor cores' async proxy with ``fence.proxy.async.shared::cta`` before the barrier.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass.cute.nvgpu import OperandMajorMode, cpasync, warpgroup

from .mla_decode_kernel import MlaDecodeSplitKV, _quad_max, _quad_sum

BLOCK_M = 64  # wgmma M: folded (q_len x heads) rows per CTA
NUM_THREADS = 256  # two warpgroups, each owning half of Dv


class MlaDecodeSplitKVWgmma(MlaDecodeSplitKV):
    """Static configuration of one compiled v2 kernel (one shape class, one tile config)."""

    def __init__(self, dtype, num_heads, q_len, head_dim, head_dim_v, page_size, block_n=32, stages=4,
                 combine_unroll=1):
        super().__init__(dtype, num_heads, q_len, head_dim, head_dim_v, page_size)
        self.combine_unroll = combine_unroll
        if page_size % block_n or block_n not in (32, 64) or stages < 2:
            raise ValueError(f"unsupported tile config block_n={block_n} stages={stages}")
        self.block_n = block_n
        self.stages = stages
        self.dv_half = head_dim_v // 2

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
        sKV_layout = cute.tile_to_shape(k_atom, (self.block_n, self.D, self.stages), (0, 1, 2))
        # V^T view of one stage: (Dv, block_n), MN-major; same offsets as sKV's (row, col < Dv)
        sVt_layout = cute.tile_to_shape(mn_atom, (self.Dv, self.block_n), (1, 0))

        @cute.struct
        class SharedStorage:
            sQ: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(sQ_layout)], 1024]
            sKV: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(sKV_layout)], 1024]

        copy_bits = 128
        g2s_atom = cute.make_copy_atom(
            cpasync.CopyG2SOp(cache_mode=cpasync.LoadCacheMode.GLOBAL), dtype, num_bits_per_copy=copy_bits
        )
        thr_layout = cute.make_layout((NUM_THREADS // 8, 8), stride=(8, 1))
        g2s_copy = cute.make_tiled_copy_tv(g2s_atom, thr_layout, cute.make_layout((1, copy_bits // dtype.width)))

        mma_qk = sm90_utils.make_trivial_tiled_mma(
            dtype, dtype, OperandMajorMode.K, OperandMajorMode.K, cutlass.Float32, (1, 1, 1),
            (BLOCK_M, self.block_n),
        )
        mma_pv = sm90_utils.make_trivial_tiled_mma(
            dtype, dtype, OperandMajorMode.K, OperandMajorMode.MN, cutlass.Float32, (1, 1, 1),
            (BLOCK_M, self.dv_half), warpgroup.OperandSource.RMEM,
        )

        batch = mQ.shape[0]
        num_splits = mOPart.shape[1]
        m_blocks = (self.M + BLOCK_M - 1) // BLOCK_M
        self.attention_kernel_v2(
            mQ, mKV, mPageTable, mSeqlens, mOPart, mLsePart, scale_log2,
            sQ_layout, sKV_layout, sVt_layout, g2s_copy, mma_qk, mma_pv, SharedStorage,
        ).launch(
            grid=[m_blocks, num_splits, batch],
            block=[NUM_THREADS, 1, 1],
            smem=SharedStorage.size_in_bytes(),
            stream=stream,
        )
        self.launch_combine(mOPart, mLsePart, mOut, mLse, kv_scale, stream)

    @cute.kernel
    def attention_kernel_v2(
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
        sVt_layout: cute.ComposedLayout,
        g2s_copy: cute.TiledCopy,
        mma_qk: cute.TiledMma,
        mma_pv: cute.TiledMma,
        SharedStorage: cutlass.Constexpr,
    ):
        BN = self.block_n
        STAGES = self.stages
        tidx, _, _ = cute.arch.thread_idx()
        m_block, split, b = cute.arch.block_idx()
        num_splits = cute.arch.grid_dim()[1]
        wg = tidx // 128
        wg_tidx = tidx % 128

        n = mSeqlens[b]
        n_tiles = (n + BN - 1) // BN
        per_split = (n_tiles + num_splits - 1) // num_splits
        t_begin = split * per_split
        t_end = cutlass.min(t_begin + per_split, n_tiles)
        row0 = m_block * BLOCK_M

        smem = cutlass.utils.SmemAllocator()
        storage = smem.allocate(SharedStorage)
        sQ = storage.sQ.get_tensor(sQ_layout.outer, swizzle=sQ_layout.inner)
        sKV = storage.sKV.get_tensor(sKV_layout.outer, swizzle=sKV_layout.inner)

        # ---- Q once, then the first STAGES - 1 KV tiles (one commit group each) ----
        thr_g2s = g2s_copy.get_slice(tidx)
        gQ = cute.local_tile(mQ[b, None, None], (BLOCK_M, self.D), (m_block, 0))
        tQgQ = thr_g2s.partition_S(gQ)
        tQsQ = thr_g2s.partition_D(sQ)
        tQc = thr_g2s.partition_S(cute.make_identity_tensor((BLOCK_M, self.D)))
        for r in cutlass.range_constexpr(cute.size(tQsQ.shape[1])):
            if row0 + tQc[0, r, 0][0] < self.M:
                cute.copy(g2s_copy, tQgQ[None, r, None], tQsQ[None, r, None])
            else:
                tQsQ[None, r, None].fill(0)
        tKVc = thr_g2s.partition_S(cute.make_identity_tensor((BN, self.D)))
        for s in cutlass.range_constexpr(STAGES - 1):
            if t_begin + s < t_end:
                self.load_kv_tile_v2(mKV, mPageTable, b, n, t_begin + s, s, sKV, thr_g2s, g2s_copy, tKVc)
            cute.arch.cp_async_commit_group()

        # ---- MMA fragments (each warpgroup: all 64 rows of S, its half of Dv for O) ----
        thr_qk = mma_qk.get_slice(wg_tidx)
        thr_pv = mma_pv.get_slice(wg_tidx)
        tSrQ = mma_qk.make_fragment_A(thr_qk.partition_A(sQ))
        acc_shape_S = thr_qk.partition_shape_C((BLOCK_M, BN))
        acc_O = cute.make_rmem_tensor(thr_pv.partition_shape_C((BLOCK_M, self.dv_half)), cutlass.Float32)
        acc_O.fill(0.0)
        acc_O_mn = _mn_view_sm90(acc_O)

        tScS_mn = _mn_view_sm90(thr_qk.partition_C(cute.make_identity_tensor((BLOCK_M, BN))))
        rows_per_thr = cute.size(tScS_mn, mode=[0])
        cols_per_thr = cute.size(tScS_mn, mode=[1])
        row_max = cute.make_rmem_tensor((rows_per_thr,), cutlass.Float32)
        row_sum = cute.make_rmem_tensor((rows_per_thr,), cutlass.Float32)
        row_max.fill(-cutlass.Float32.inf)
        row_sum.fill(0.0)
        row_limit = cute.make_rmem_tensor((rows_per_thr,), cutlass.Int32)
        for r in cutlass.range_constexpr(rows_per_thr):
            m = row0 + tScS_mn[r, 0][0]
            row_limit[r] = n - self.Q + cutlass.min(m, self.M - 1) // self.H

        for tile in cutlass.range(t_begin, t_end, 1, unroll=1):
            stage = (tile - t_begin) % STAGES
            # tile `tile` is the oldest of the STAGES - 1 groups in flight
            cute.arch.cp_async_wait_group(STAGES - 2)
            cute.arch.fence_proxy("async.shared", space="cta")
            cute.arch.sync_threads()
            # the slot read in the previous iteration is free (everyone passed the barrier)
            nxt = tile + STAGES - 1
            if nxt < t_end:
                self.load_kv_tile_v2(mKV, mPageTable, b, n, nxt, (nxt - t_begin) % STAGES, sKV, thr_g2s,
                                     g2s_copy, tKVc)
            cute.arch.cp_async_commit_group()

            sK = sKV[None, None, stage]
            # ---- S = Q K^T: one wgmma chain over D ----
            tSrK = mma_qk.make_fragment_B(thr_qk.partition_B(sK))
            acc_S = cute.make_rmem_tensor(acc_shape_S, cutlass.Float32)
            _wgmma(mma_qk, acc_S, tSrQ, tSrK, True)

            # ---- mask + online softmax (log2 domain), rescale O ----
            acc_S_mn = _mn_view_sm90(acc_S)
            pos0 = tile * BN
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
                acc_O_mn[r, None] = acc_O_mn[r, None].load() * alpha

            # ---- O += P V: P from registers, V^T = MN-major view of the same smem stage ----
            rP = cute.make_fragment_like(acc_S, self.dtype)
            rP.store(acc_S.load().to(self.dtype))
            tOrP = cute.make_tensor(rP.iterator, _acc_as_A_operand_sm90(rP.layout))
            sVt = cute.make_tensor(sKV[None, None, stage].iterator, sVt_layout.outer)
            sVt_half = cute.local_tile(sVt, (self.dv_half, BN), (wg, 0))
            tOrV = mma_pv.make_fragment_B(thr_pv.partition_B(sVt_half))
            _wgmma(mma_pv, acc_O, tOrP, tOrV, False)

        cute.arch.cp_async_wait_group(0)

        # ---- epilogue: normalise, write the split's partial O and LSE ----
        for r in cutlass.range_constexpr(rows_per_thr):
            total = _quad_sum(row_sum[r])
            empty = total == 0.0
            inv = 0.0 if empty else 1.0 / total
            lse = -cutlass.Float32.inf if empty else (row_max[r] + cute.math.log2(total)) * 0.6931471805599453
            acc_O_mn[r, None] = acc_O_mn[r, None].load() * inv
            m = row0 + tScS_mn[r, 0][0]
            if wg == 0:
                if tidx % 4 == 0:
                    if m < self.M:
                        mLsePart[b, split, m] = lse

        cO = thr_pv.partition_C(cute.make_identity_tensor((BLOCK_M, self.dv_half)))
        col0 = wg * self.dv_half
        for i in cutlass.range_constexpr(cute.size(acc_O)):
            m = row0 + cO[i][0]
            if m < self.M:
                mOPart[b, split, m, col0 + cO[i][1]] = acc_O[i]

    @cute.jit
    def load_kv_tile_v2(self, mKV, mPageTable, b, n, tile, stage, sKV, thr_g2s, g2s_copy, tKVc):
        """cp.async of KV tile ``tile`` (block_n rows inside one page) into ring slot ``stage``;
        rows at or past ``n`` are zero-filled (a stale cache may hold NaN; 0 x NaN = NaN)."""
        BN = self.block_n
        pos0 = tile * BN
        page = mPageTable[b, pos0 // self.page_size]
        cache_row0 = cutlass.Int64(page) * self.page_size + pos0 % self.page_size
        gKV = cute.local_tile(mKV, (BN, self.D), (cache_row0 // BN, 0))
        tKVg = thr_g2s.partition_S(gKV)
        tKVs = thr_g2s.partition_D(sKV[None, None, stage])
        for r in cutlass.range_constexpr(cute.size(tKVs.shape[1])):
            if pos0 + tKVc[0, r, 0][0] < n:
                cute.copy(g2s_copy, tKVg[None, r, None], tKVs[None, r, None])
            else:
                tKVs[None, r, None].fill(0)


# -- register-layout helpers (sm90 accumulators: ((2, 2, N / 8), MMA_M, MMA_N)) ------------------
@cute.jit
def _wgmma(tiled_mma, acc, tA, tB, zero_init: cutlass.Constexpr[bool]):
    """acc (+)= A B over all k blocks, issued as one wgmma group and waited for."""
    warpgroup.fence()
    atom = cute.make_mma_atom(tiled_mma.op)
    atom.set(warpgroup.Field.ACCUMULATE, not zero_init)
    for k in cutlass.range_constexpr(cute.size(tA.shape[2])):
        cute.gemm(atom, acc, tA[None, None, k], tB[None, None, k], acc)
        atom.set(warpgroup.Field.ACCUMULATE, True)
    warpgroup.commit_group()
    warpgroup.wait_group(0)


def _mn_view_sm90(acc: cute.Tensor) -> cute.Tensor:
    """(rows, cols) view of this thread's part of a wgmma accumulator: a thread holds rows
    (r, r + 8) of its warp's 16, and column pairs every 8."""
    lay = cute.make_layout(acc.layout.shape)
    mn = cute.make_layout(
        ((lay.shape[0][1], lay.shape[1]), (lay.shape[0][0], lay.shape[0][2], lay.shape[2])),
        stride=((lay.stride[0][1], lay.stride[1]), (lay.stride[0][0], lay.stride[0][2], lay.stride[2])),
    )
    return cute.make_tensor(acc.iterator, cute.composition(acc.layout, mn))


def _acc_as_A_operand_sm90(acc_layout):
    """((2, 2, N / 8), MMA_M, MMA_N) accumulator -> ((2, 2, 2), MMA_M, (N / 16, MMA_N)) A fragment
    of a k16 wgmma: two adjacent n8 column groups form one k16 step."""
    d = cute.logical_divide(acc_layout, ((None, None, 2), None, None))
    return cute.make_layout(
        ((d.shape[0][0], d.shape[0][1], d.shape[0][2][0]), d.shape[1], (d.shape[0][2][1], d.shape[2])),
        stride=((d.stride[0][0], d.stride[0][1], d.stride[0][2][0]), d.stride[1],
                (d.stride[0][2][1], d.stride[2])),
    )


__all__ = ["BLOCK_M", "MlaDecodeSplitKVWgmma"]
