"""The wgmma building blocks of the sm_90a CuTe DSL MLA decode kernels (v3, v4) and the base of
the sm_100a one: the tile configuration, the paged cp.async loader, the wgmma issue helper and
the accumulator (rows, cols) view.

Imports cutlass at module level: only the kernel modules import this one, and only once
nvidia-cutlass-dsl is known to be installed. The kernel this module was written for (v2: both
warpgroups compute the same S = Q K^T, register-A wgmma for P V, 32-row x 4-stage or 64-row x
2-stage rings) was removed once v3 and v4 beat it on every measured row; its design and numbers
are in docs/cute.md and docs/perf/cute.md (runs 2-3), its code in git history (before
2026-11-27 16:40). What it established and the others keep (docs/cute.md, "wgmma building
blocks"):

- Operands are read from shared memory through descriptors: Q and the KV tile in the
  128B-swizzled K-major layout of ``warpgroup.make_smem_layout_atom(K_SW128)``, the swizzle on
  the smem pointer.
- V is the first Dv columns of the *same* smem tile read MN-major: the K-major (block_n, D)
  layout and the MN-major (Dv, block_n) view (``MN_SW128`` atom, tiled N-first) map every
  element to the same byte, so there is no second load and no copy.
- cp.async writes are made visible to the tensor cores' async proxy with
  ``fence.proxy.async.shared::cta`` before the barrier that publishes them.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass.cute.nvgpu import warpgroup

from .mla_decode_kernel import MlaDecodeSplitKV

BLOCK_M = 64  # wgmma M: folded (q_len x heads) rows per CTA
NUM_THREADS = 256  # two warpgroups, each owning half of Dv


class MlaDecodeSplitKVWgmma(MlaDecodeSplitKV):
    """Tile configuration shared by the wgmma kernels (one shape class, one tile config)."""

    def __init__(self, dtype, num_heads, q_len, head_dim, head_dim_v, page_size, block_n=32, stages=4,
                 combine_batch=16):
        super().__init__(dtype, num_heads, q_len, head_dim, head_dim_v, page_size)
        self.combine_batch = combine_batch
        if page_size % block_n or block_n not in (32, 64) or stages < 2:
            raise ValueError(f"unsupported tile config block_n={block_n} stages={stages}")
        self.block_n = block_n
        self.stages = stages
        self.dv_half = head_dim_v // 2

    @cute.jit
    def load_q(self, mQ, sQ, b, m_block, row0, tiled_copy, tidx, block_m: cutlass.Constexpr):
        """cp.async of this CTA's ``block_m`` folded query rows into ``sQ`` (not committed); rows
        past M are zero-filled (the padding of the last m-block)."""
        thr = tiled_copy.get_slice(tidx)
        tQgQ = thr.partition_S(cute.local_tile(mQ[b, None, None], (block_m, self.D), (m_block, 0)))
        tQsQ = thr.partition_D(sQ)
        tQc = thr.partition_S(cute.make_identity_tensor((block_m, self.D)))
        for r in cutlass.range_constexpr(cute.size(tQsQ.shape[1])):
            if row0 + tQc[0, r, 0][0] < self.M:
                cute.copy(tiled_copy, tQgQ[None, r, None], tQsQ[None, r, None])
            else:
                tQsQ[None, r, None].fill(0)

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

    @cute.jit
    def store_result_staged(self, acc_O, coords, rows: cutlass.Constexpr, cols: cutlass.Constexpr, row0, col0,
                            transposed: cutlass.Constexpr, stage_ptr, mOPart, mOut, b, split, num_splits,
                            kv_scale: cutlass.Float32, tid, barrier_id):
        """The epilogue's O (normalised; a tile of ``rows`` folded rows from ``row0`` x ``cols``
        Dv columns from ``col0``, held by 128 threads; ``coords`` the (row, column) of each
        accumulator element in the tile, (column, row) if ``transposed``) through shared memory
        to ``out`` (times ``kv_scale``, 16-bit) when the launch has one split a request, else to
        the partials (16-bit, unscaled). ``stage_ptr``: rows x cols x 4 bytes of smem that these
        128 threads alone may overwrite, 1024-byte aligned; ``barrier_id``: a named barrier of
        the 128.

        Why: an sm90 accumulator spreads a thread's values over 2 rows (16-bit: column pairs)
        or over Dv rows (v4's transposed O), so storing them straight to global memory is 64-128
        scalar or paired stores a thread, each warp instruction touching 8 rows. That epilogue
        took 14.8-15.9 µs of a CTA's life with fp32 partials and 7-8.7 µs with one split (v5 /
        v3, H100, per-CTA stamps, docs/perf/cute.md run 32). Staged, each warp instruction
        writes 512 contiguous bytes (16 bytes a lane)."""
        if num_splits == 1:
            self.stage_rows(acc_O, coords, rows, cols, row0, col0, transposed, stage_ptr, mOut[b, None, None],
                            self.dtype, kv_scale, True, tid, barrier_id)
        else:
            self.stage_rows(acc_O, coords, rows, cols, row0, col0, transposed, stage_ptr,
                            mOPart[b, split, None, None], mOPart.element_type, kv_scale, False, tid, barrier_id)

    @cute.jit
    def stage_rows(self, acc_O, coords, rows: cutlass.Constexpr, cols: cutlass.Constexpr, row0, col0,
                   transposed: cutlass.Constexpr, stage_ptr, gDst, dtype: cutlass.Constexpr, kv_scale,
                   scaled: cutlass.Constexpr, tid, barrier_id):
        """acc_O (as ``dtype``, times ``kv_scale`` if ``scaled``) -> smem rows -> rows ``row0 +
        r`` (< M), columns ``col0 + c`` of ``gDst`` (M, Dv), 16 bytes a lane. The smem rows are
        XOR-swizzled by 16-byte chunk (chunk ^ row % 8): the accumulator writes (a warp: 8 rows
        x 32 bytes, or v4's 8 columns x 4 rows) and the row reads (512 contiguous bytes a warp)
        are free of bank conflicts."""
        VEC = 128 // dtype.width  # elements of a 16-byte chunk
        sO = cute.make_tensor(cute.recast_ptr(stage_ptr, dtype=dtype), cute.make_layout((rows, cols), stride=(cols, 1)))
        if cutlass.const_expr(transposed):  # adjacent elements are adjacent rows: one at a time
            for i in cutlass.range_constexpr(cute.size(acc_O)):
                c, r = coords[i]
                v = acc_O[i] * kv_scale if cutlass.const_expr(scaled) else acc_O[i]
                sO[r, ((c // VEC) ^ (r % 8)) * VEC + c % VEC] = v.to(dtype)
        else:  # elements 2k, 2k + 1 are adjacent columns of one row: one store for both
            pair = cute.make_rmem_tensor((2,), dtype)
            for i in cutlass.range_constexpr(0, cute.size(acc_O), 2):
                r, c = coords[i]
                pc = ((c // VEC) ^ (r % 8)) * VEC + c % VEC
                for j in cutlass.range_constexpr(2):
                    v = acc_O[i + j] * kv_scale if cutlass.const_expr(scaled) else acc_O[i + j]
                    pair[j] = v.to(dtype)
                cute.autovec_copy(pair, cute.local_tile(sO[r, None], (2,), (pc // 2,)))
        cute.arch.barrier(barrier_id=barrier_id, number_of_threads=128)
        chunk = cute.make_rmem_tensor((VEC,), dtype)
        for it in cutlass.range_constexpr(rows * cols // VEC // 128):
            idx = it * 128 + tid
            r = idx // (cols // VEC)
            ch = idx % (cols // VEC)
            if row0 + r < self.M:
                cute.autovec_copy(cute.local_tile(sO[r, None], (VEC,), (ch ^ (r % 8),)), chunk)
                cute.autovec_copy(chunk, cute.local_tile(gDst[row0 + r, None], (VEC,), (col0 // VEC + ch,)))


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


def _acc_as_A_operand_sm90(acc_layout):
    """((2, 2, N / 8), MMA_M, MMA_N) accumulator -> ((2, 2, 2), MMA_M, (N / 16, MMA_N)) A fragment
    of a k16 wgmma: two adjacent n8 column groups form one k16 step."""
    d = cute.logical_divide(acc_layout, ((None, None, 2), None, None))
    return cute.make_layout(
        ((d.shape[0][0], d.shape[0][1], d.shape[0][2][0]), d.shape[1], (d.shape[0][2][1], d.shape[2])),
        stride=((d.stride[0][0], d.stride[0][1], d.stride[0][2][0]), d.stride[1],
                (d.stride[0][2][1], d.stride[2])),
    )


def _mn_view_sm90(acc: cute.Tensor) -> cute.Tensor:
    """(rows, cols) view of this thread's part of a wgmma accumulator: a thread holds rows
    (r, r + 8) of its warp's 16, and column pairs every 8."""
    lay = cute.make_layout(acc.layout.shape)
    mn = cute.make_layout(
        ((lay.shape[0][1], lay.shape[1]), (lay.shape[0][0], lay.shape[0][2], lay.shape[2])),
        stride=((lay.stride[0][1], lay.stride[1]), (lay.stride[0][0], lay.stride[0][2], lay.stride[2])),
    )
    return cute.make_tensor(acc.iterator, cute.composition(acc.layout, mn))


__all__ = ["BLOCK_M", "NUM_THREADS", "MlaDecodeSplitKVWgmma"]
