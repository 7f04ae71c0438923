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


__all__ = ["BLOCK_M", "NUM_THREADS", "MlaDecodeSplitKVWgmma"]
