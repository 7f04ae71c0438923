"""The load side of the see-saw kernel (v5, :mod:`.mla_decode_kernel_v5`): how a step's two KV
tiles are cut into column groups, who frees each, and the producer warp that loads them (and Q)
by TMA, multicast to both CTAs of a pair.

Imports cutlass at module level (only the kernel modules import it). A mixin of
``MlaDecodeSplitKVSeesaw``: it uses ``block_n``, ``D``, ``page_size``, ``dtype``, ``cluster``
and the probe's ``timed`` of the kernel classes.

- A tile is 64 rows x 576 columns, nine 64-column chunks (one TMA box each, 8 KB, one SW128
  atom column); chunk 8 holds the rope columns, dead once the tile's S is computed (the other
  warpgroup's P goes there).
- Each tile slot's chunks form two column groups, each with a "landed" mbarrier (count 1, armed
  with the group's bytes by the warpgroup that frees it) and a "freed" one (one arrival per CTA
  of the pair). The freeing warpgroup arms and signals without blocking (``release``); the
  producer warp waits for "freed" and issues the group's boxes (``issue_group``); in a pair, CTA
  j issues the groups j, multicast into both CTAs' smem.
- The producer warp also initialises the mbarriers and issues the CTA's Q first thing
  (``setup_and_load_q``), before the pair's cluster barrier.
- With an fp8 cache the KV is not loaded by TMA: the producer warpgroup converts it through
  registers (:mod:`.mla_decode_kernel_v5_fp8`); the mbarriers, groups and order are these.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass._mlir.dialects import llvm
from cutlass.cute.nvgpu import cpasync
from cutlass.cutlass_dsl import dsl_user_op

from . import mla_decode_kernel as base
from .mla_decode_kernel_v2 import BLOCK_M

CHUNK = 64  # columns of one k-group (one 64-column SW128 atom column; 8 KB of a 64-row tile)
# Column groups per tile slot, in chunk numbers (chunk 8 = the rope columns, where P goes), and
# the warpgroup that frees each (the one whose MMA reads it last).
K0_EARLY, K0_LATE = (0, 1, 2, 3), (4, 5, 6, 7, 8)  # freed by WG0, by WG1
K1_EARLY, K1_LATE = (4, 5, 6, 7), (0, 1, 2, 3, 8)  # freed by WG1, by WG0
GROUPS = ((K0_EARLY, K0_LATE), (K1_EARLY, K1_LATE))  # [slot][j], as the mbarriers: group 2 slot + j
ROPE_CHUNK = 8


@dsl_user_op
def prefetch_l2(addr, nbytes: int, *, loc=None, ip=None):
    """``cp.async.bulk.prefetch.L2``: start pulling ``nbytes`` (a multiple of 16) at the 16-byte
    aligned global address ``addr`` into L2; no registers, no completion to wait for."""
    llvm.inline_asm(
        None,
        [cutlass.Int64(addr).ir_value(loc=loc, ip=ip), cutlass.Int32(nbytes).ir_value(loc=loc, ip=ip)],
        "cp.async.bulk.prefetch.L2.global [$0], $1;",
        "l,r",
        has_side_effects=True,
        is_align_stack=False,
        asm_dialect=llvm.AsmDialect.AD_ATT,
        loc=loc,
        ip=ip,
    )


def cache_row_tile(mPageTable, b, tile, block_n: int, page_size: int):
    """Index of KV tile ``tile`` of request ``b`` in ``block_n``-row units of the flattened cache
    (a tile lies inside one page: the page size is a multiple of the tile's rows)."""
    pos0 = tile * block_n
    page = mPageTable[b, pos0 // page_size]
    return page * (page_size // block_n) + (pos0 % page_size) // block_n


def chunk_box(tma_atom, sTile, gChunks, c: int):
    """(smem, gmem) views of 64-column chunk ``c`` as one TMA box: ``sTile`` a 64-row tile in
    smem, ``gChunks`` the matching (64, CHUNK, chunks) tiling of the global tensor."""
    return cpasync.tma_partition(
        tma_atom, 0, cute.make_layout(1),
        cute.group_modes(cute.local_tile(sTile, (cute.size(sTile, mode=[0]), CHUNK), (0, c)), 0, 2),
        cute.group_modes(gChunks[None, None, c], 0, 2))


@cute.jit
def issue_q_boxes(tma_atom_q, tma_q, sQ, m_block, b, mbar_q):
    """A whole warp (see ``setup_and_load_q``): m-block ``m_block`` of request ``b``'s Q, one
    (rows of ``sQ``) x CHUNK box per chunk over the (folded row, column, request) view ``tma_q``,
    completing on ``mbar_q``, which the caller armed with the boxes' bytes."""
    rows = cute.size(sQ, mode=[0])
    gQ = cute.local_tile(tma_q, (rows, CHUNK), (m_block, None, b))
    for c in cutlass.range_constexpr(cute.size(sQ, mode=[1]) // CHUNK):
        tQs, tQg = chunk_box(tma_atom_q, sQ, gQ, c)
        cute.copy(tma_atom_q, tQg, tQs, tma_bar_ptr=mbar_q)


class SeesawLoads:
    """The see-saw kernel's loads (a mixin; see the module docstring)."""

    @cute.jit
    def setup_and_load_q(self, tma_atom_q, tma_q, tma_atom, sQ, m_block, b, lane, mbar, mbar_free, mbar_q):
        """The producer warp, first thing: the mbarriers, then this CTA's Q by TMA (it needs no
        other CTA, so it goes before the pair's barrier), in flight while `cache_seqlens`, the
        page table and that barrier are waited for. The whole warp runs the TMA copies: each
        elects one lane (elect.sync over all 32; with one lane active it hangs)."""
        cpasync.prefetch_descriptor(tma_atom_q)
        if cutlass.const_expr(not self.kv_fp8):  # an fp8 cache has no KV descriptor (mla_decode_kernel_v5_fp8)
            cpasync.prefetch_descriptor(tma_atom)
        if lane == 0:
            for i in cutlass.range_constexpr(4):
                cute.arch.mbarrier_init(mbar + i, 1)
                cute.arch.mbarrier_init(mbar_free + i, self.cluster)
            cute.arch.mbarrier_init(mbar_q, 1)
            cute.arch.mbarrier_init_fence()
            cute.arch.mbarrier_arrive_and_expect_tx(mbar_q, BLOCK_M * self.D * self.dtype.width // 8)
        cute.arch.sync_warp()
        issue_q_boxes(tma_atom_q, tma_q, sQ, m_block, b, mbar_q)

    @cute.jit
    def release(self, slot: cutlass.Constexpr, j: cutlass.Constexpr, wg_tidx, mbar, mbar_free):
        """This warpgroup has read column group ``GROUPS[slot][j]`` of its tile slot for the last
        time: arm this CTA's "landed" mbarrier for the group's next load with its bytes, and tell
        the producer of the CTA that issues it (CTA j of a pair), which waits until every CTA of
        the pair has freed the group, then multicasts it to all of them. Never blocks. With an fp8
        cache the producer warpgroup converts the group and arrives on "landed" itself: no bytes
        are armed."""
        g = slot * 2 + j
        if wg_tidx == 0:
            if cutlass.const_expr(not self.kv_fp8):
                cute.arch.mbarrier_arrive_and_expect_tx(mbar + g, len(GROUPS[slot][j]) * self.block_n * CHUNK
                                                        * self.dtype.width // 8)
            if cutlass.const_expr(self.cluster > 1):
                cute.arch.mbarrier_arrive(mbar_free + g, peer_cta_rank_in_cluster=j)
            else:
                cute.arch.mbarrier_arrive(mbar_free + g)

    @cute.jit
    def issue_group(self, tma_atom, tma_kv, mPageTable, b, tile, sTile, slot: cutlass.Constexpr,
                    j: cutlass.Constexpr, mbar, mbar_free, phase, sums):
        """Producer warp: wait until column group ``GROUPS[slot][j]`` is free in every CTA of the
        pair, then TMA its 64 x 64 chunks of KV tile ``tile`` (to every CTA of the pair)."""
        BN = self.block_n
        g = slot * 2 + j
        # the page-table read is issued before the wait, so its round trip hides under it
        row_tile = cache_row_tile(mPageTable, b, tile, BN, self.page_size)
        self.timed(sums, base.WAIT_FREED, cute.arch.mbarrier_wait, mbar_free + g, phase)
        gKV = cute.local_tile(tma_kv, (BN, CHUNK), (row_tile, None))
        chunks = GROUPS[slot][j]
        for c in cutlass.range_constexpr(len(chunks)):
            tAs, tAg = chunk_box(tma_atom, sTile, gKV, chunks[c])
            if cutlass.const_expr(self.cluster > 1):
                cute.copy(tma_atom, tAg, tAs, tma_bar_ptr=mbar + g,
                          mcast_mask=cutlass.Int16((1 << self.cluster) - 1))
            else:
                cute.copy(tma_atom, tAg, tAs, tma_bar_ptr=mbar + g)

    @cute.jit
    def produce(self, mKV, tma_atom, tma_kv, mPageTable, b, t_begin, t_end, sK0, sK1, rank, mbar, mbar_free,
                sums):
        """The producer warp's loop: every KV tile of the split, column group by column group, in
        the order the math warpgroups free them (in a pair, this CTA issues the groups j = rank).
        It turns to a step's tiles as the math warpgroups begin the step before, which is when it
        asks L2 for them from the third step on (``l2_prefetch``; a math thread asks for the
        second step's once the first S is done, so they do not compete with Q and the first tiles)."""
        for t0 in cutlass.range(t_begin, t_end, 2, unroll=1):
            phase = ((t0 - t_begin) // 2) % 2
            if cutlass.const_expr(self.l2_prefetch):
                if rank == 0 and t0 >= t_begin + 4:
                    if cute.arch.lane_idx() == 0:
                        self.prefetch_tiles(mKV, mPageTable, b, t0, t_end)
            for j in cutlass.range_constexpr(2):
                if self.cluster == 1 or j == rank:
                    self.issue_group(tma_atom, tma_kv, mPageTable, b, t0, sK0, 0, j, mbar, mbar_free, phase, sums)
            if t0 + 1 < t_end:
                for j in cutlass.range_constexpr(2):
                    if self.cluster == 1 or j == rank:
                        self.issue_group(tma_atom, tma_kv, mPageTable, b, t0 + 1, sK1, 1, j, mbar, mbar_free,
                                         phase, sums)

    @cute.jit
    def prefetch_tiles(self, mKV, mPageTable, b, tile, t_end):
        """L2 prefetch of KV tiles ``tile`` and ``tile + 1`` (those before ``t_end``). Issued about
        a step before their use (``produce``), so their bytes are on the way from HBM before that
        step's TMA loads (issued as columns free) ask for them."""
        for j in cutlass.range_constexpr(2):
            if tile + j < t_end:
                prefetch_tile(mKV, mPageTable, b, tile + j, self.block_n, self.page_size)


def prefetch_tile(mKV, mPageTable, b, tile, block_n: int, page_size: int):
    """L2 prefetch (``prefetch_l2``) of KV tile ``tile`` of request ``b``: ``block_n`` contiguous
    rows of one page of the flattened cache ``mKV`` (rows, D). The caller checks that the tile is
    one of the request's (the page table names no page past its length)."""
    d = cute.size(mKV, mode=[1])
    row_tile = cutlass.Int64(cache_row_tile(mPageTable, b, tile, block_n, page_size))  # > 2^31 elements
    gKV = cute.local_tile(mKV, (block_n, d), (row_tile, 0))
    prefetch_l2(gKV.iterator.toint(), block_n * d * mKV.element_type.width // 8)


__all__ = ["CHUNK", "GROUPS", "K0_EARLY", "K0_LATE", "K1_EARLY", "K1_LATE", "ROPE_CHUNK", "SeesawLoads", "cache_row_tile",
           "chunk_box", "issue_q_boxes", "prefetch_tile"]
