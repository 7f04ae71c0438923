"""CuTe DSL MLA decode for sm_100a / sm_103a (Blackwell): tcgen05 MMA with TMEM accumulators.

Imports cutlass at module level: only :mod:`.mla_decode` imports this module, and only once
nvidia-cutlass-dsl is known to be installed. Same launch interface as the sm_90a kernels (fake
tensors, split-KV partials + LSE, the combine kernel, query axis folded into the head axis with
row ``m = qi * H + h`` and the causal-by-position mask ``p <= n - q_len + qi``); what changes is
where the math runs (docs/cute.md, "sm_100a"):

- **MMA**: ``tcgen05.mma`` (kind::f16, cta_group::1, M = 128), issued by one thread; operands in
  shared memory through UMMA descriptors, accumulators in tensor memory (TMEM), never in registers.
  S = Q K^T is 128 x 32 (36 k-steps over D = 576); O += P V is 128 x 256 (2 k-steps).
- **TMEM budget** (512 columns x 128 lanes per SM): O over all of Dv = 512 fp32 columns plus S
  would need 544 columns, so a CTA owns half of Dv: O = columns [0, 256), S = [256, 288). The two
  Dv halves of a (row block, split) are two CTAs that read the same KV tiles (the second read hits
  L2) and both compute S, which costs tensor-core time, not HBM bytes.
- **Warps**: 160 threads. Warps 0-3 (128 threads) are the softmax warps, warp 0 also
  initialises the mbarriers, allocates TMEM and issues the MMAs (one elected thread); warp 4 is
  the producer, which only issues the TMA loads, so they do not sit on the softmax threads.
- **Softmax** (the 128 threads of warps 0-3; thread t owns folded row t, which is TMEM lane t):
  ``tcgen05.ld`` of its 32 S columns, mask, row max / sum with no shuffles, P (16-bit) written to
  shared memory in the K-major layout the PV MMA reads; the running-max correction of O is a
  ``tcgen05.ld`` / scale / ``tcgen05.st`` of the row in 32-column chunks, skipped by a whole warp
  when no row of it changed its maximum, and skipped on a split's first tile, whose PV MMA
  overwrites O instead of accumulating (TMEM starts as garbage, and 0 x NaN = NaN).
- **Loads**: TMA (``cp.async.bulk.tensor``), issued by the whole producer warp (the DSL's TMA copy
  elects one lane with ``elect.sync`` over the full warp: issued under ``if tidx == 0`` it hangs).
  Q (128 x 576) once, nine 128 x 64 boxes over the (folded row, column, request) view; rows past M
  lie outside the tensor and TMA zero-fills them. KV in a 2-slot ring of 32-row tiles, nine 32 x 64
  boxes a tile over the flattened cache, the box's row coordinate from the page table (a 32-row tile
  is contiguous inside a page: page size is a multiple of 64); the boxes are v5's
  (``chunk_box``), one column of 128B-swizzle atoms each, as the smem tile is laid out. A tile's
  page-table read is issued before the wait for its slot. Every row of a tile is
  loaded, also those at or past the request's length (a stale cache may hold NaN): their S
  columns are masked (a select, so NaN never leaves it) and their V rows, this CTA's Dv half, are
  zeroed in smem before the MMAs (P is 0 there, but 0 x NaN = NaN). V is the first Dv columns of
  the same smem tile, read by the PV MMA as an MN-major B operand (the 128B-swizzled K-major
  (32, 576) tile and the MN-major (512, 32) view map each element to the same byte).
  Shared memory: Q 144 KB + ring 72 KB + P 8 KB = 224 KB, one CTA per SM.
- **Ordering** (who waits on what, with which phase):

  - ``q_full`` (count 1): armed by producer lane 0 with Q's bytes (the whole boxes: TMA counts the
    zero-filled rows too), completes once; every thread waits for phase 0 before the loop.
  - ``kv_full[s]`` (count 1): armed by producer lane 0 with a tile's bytes (32 x 576 x 2) just
    before the tile's boxes are issued. Slot s holds tiles t_begin + s, t_begin + s + 2, ...,
    so it completes once per use: tile t waits for phase ((t - t_begin) // 2) % 2. Every softmax
    thread waits: warp 0 before issuing the MMAs that read the tile, all of them before zeroing
    stale V rows (after the TMA wrote them, or the TMA would overwrite the zeros).
  - ``kv_empty[s]`` (count 1): armed by ``tcgen05.commit`` after each PV MMA (the last reader of
    the tile's slot: S read it before), so it completes once per use of slot s, when every MMA
    issued so far is done (a commit tracks all earlier MMAs of the issuing thread; their smem
    reads are then complete). The producer loads tile t >= t_begin + 2 only after waiting for
    the completion of the slot's previous use, phase ((t - t_begin) // 2 - 1) % 2; tiles t_begin
    and t_begin + 1 go into empty slots. No barrier runs two phases ahead of its waiter: each
    completion needs the waiter's side to have consumed the previous one.
  - ``mma_bar`` (count 1): armed by ``tcgen05.commit`` after each S MMA and waited by every
    softmax thread, phase = the tile's parity (it completes once per tile; once more after the
    loop, for the last PV). Its completion also means the previous tile's PV MMA is done: P may be
    overwritten and O may be rescaled.
  - Proxies: TMA writes smem in the async proxy, which the tcgen05 MMAs read, so a tile or Q is
    visible to them once its mbarrier phase completed: no proxy fence. Smem the threads write (the
    zeroed V rows, P) is generic proxy: ``fence.proxy.async.shared::cta`` by every writer, then
    the softmax warps' named barrier, then warp 0 issues the MMA.
  - TMEM loads/stores are ordered against the MMA thread with ``tcgen05.wait`` +
    ``tcgen05.fence::before_thread_sync`` / named barrier / ``tcgen05.fence::after_thread_sync``
    (the softmax warps' own barrier, ``BAR_MATH``: the producer takes no part after the start).
  - The mbarriers are initialised by warp 0, then ``fence.mbarrier_init`` and a ``bar.sync`` of
    all 160 threads before the producer arms one. An empty split loads nothing, and every load is
    waited for by the softmax warps, so no TMA is in flight when the CTA exits (the producer warp
    may exit first).

Compiled for every shape class and its PTX inspected (tests/blackwell/test_cute_sm100.py); never
run on hardware.

Not yet (speed, not correctness): an MMA warp running ahead of the softmax warps (two S buffers
in TMEM), a deeper ring, 2-CTA MMA (cta_group::2) so the Dv halves share one KV read, and M = 64 tiles for small
H x q_len.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
import cutlass.pipeline as pipeline
import cutlass.utils.blackwell_helpers as sm100_utils
from cutlass._mlir.dialects import nvvm
from cutlass.cute.nvgpu import OperandMajorMode, cpasync, tcgen05

from .mla_decode_kernel_v2 import MlaDecodeSplitKVWgmma
from .mla_decode_kernel_v5_loads import CHUNK, cache_row_tile, chunk_box, issue_q_boxes

BLOCK_M = 128  # tcgen05 M (cta_group::1): folded (q_len x heads) rows per CTA = TMEM lanes
BLOCK_N = 32  # cache rows per KV tile (S columns)
STAGES = 2  # KV ring slots
MATH_THREADS = 128  # four softmax warps: warp w reads TMEM lanes 32w..32w+31 (its rows)
NUM_THREADS = MATH_THREADS + 32  # and the load warp
DV_PARTS = 2  # CTAs per (row block, split): each owns Dv / 2 columns of O
TMEM_COLS = 512  # allocation (power of two >= O + S columns)
TMEM_O_COL = 0
O_CHUNK = 32  # columns per tcgen05.ld / st of O (32 registers per thread)
COMBINE_BATCH = 16  # splits per warp in flight in the combine stage, as the sm_90a kernels use
# The producer warp, which only issues the TMA loads (all 32 lanes: the DSL's TMA copy elects a
# lane with elect.sync over the full warp, so issuing it from one active lane hangs). Warp 0
# initialises the mbarriers, allocates TMEM and issues the MMAs.
LOAD_WARP = MATH_THREADS // 32
BAR_MATH = 2  # named barrier of the softmax warps (0: all threads; 1: the TMEM allocator's)


def ctas_per_split(m: int) -> int:
    """CTAs of one (request, KV split): 128-row blocks of the folded M, times the Dv halves."""
    return -(-m // BLOCK_M) * DV_PARTS


class MlaDecodeSplitKVTcgen05(MlaDecodeSplitKVWgmma):
    """Static configuration of one compiled sm_100a kernel (one shape class).

    Extends the sm_90a v2 class only for what is arch-neutral: the constructor's checks (page size
    a multiple of the 32-row tile), the split bounds and the combine stage (``launch_combine``,
    :mod:`.mla_decode_combine`). The TMA boxes are v5's (:func:`.mla_decode_kernel_v5_loads.chunk_box`).
    """

    def __init__(self, dtype, num_heads, q_len, head_dim, head_dim_v, page_size):
        super().__init__(dtype, num_heads, q_len, head_dim, head_dim_v, page_size, block_n=BLOCK_N,
                         stages=STAGES, combine_batch=COMBINE_BATCH)
        self.dv_cta = head_dim_v // DV_PARTS
        if self.dv_cta % O_CHUNK or self.dv_cta > 256 or head_dim % 64:
            raise ValueError(f"unsupported head dims D={head_dim} Dv={head_dim_v}")
        self.tmem_s_col = TMEM_O_COL + self.dv_cta

    @cute.jit
    def __call__(
        self,
        mQ: cute.Tensor,  # (B, M, D) dtype, row m = qi * H + h
        mKV: cute.Tensor,  # (P * page_size, D) dtype: the cache, rows flattened
        mPageTable: cute.Tensor,  # (B, MP) int32
        mSeqlens: cute.Tensor,  # (B,) int32
        mOPart: cute.Tensor,  # (B, S, M, Dv) dtype: per-split normalised O
        mLsePart: cute.Tensor,  # (B, S, M) fp32: per-split LSE (natural log)
        mOut: cute.Tensor,  # (B, M, Dv) dtype
        mLse: cute.Tensor,  # (B, M) fp32
        scale_log2: cutlass.Float32,  # softmax_scale * kv_scale * log2(e)
        kv_scale: cutlass.Float32,
        stream,
    ):
        dtype = self.dtype
        k_atom = tcgen05.make_smem_layout_atom(tcgen05.SmemLayoutAtomKind.K_SW128, dtype)
        mn_atom = tcgen05.make_smem_layout_atom(tcgen05.SmemLayoutAtomKind.MN_SW128, dtype)
        # P rows are BLOCK_N = 32 elements = 64 B: the 64B-swizzled K-major atom
        p_atom = tcgen05.make_smem_layout_atom(tcgen05.SmemLayoutAtomKind.K_SW64, dtype)
        sQ_layout = cute.tile_to_shape(k_atom, (BLOCK_M, self.D), (0, 1))
        sKV_layout = cute.tile_to_shape(k_atom, (BLOCK_N, self.D, STAGES), (0, 1, 2))
        # V^T view of one ring slot: (Dv, BLOCK_N), MN-major, tiled K first: same byte offsets as
        # the K-major slot's (row, col < Dv)
        sVt_layout = cute.tile_to_shape(mn_atom, (self.Dv, BLOCK_N), (1, 0))
        sP_layout = cute.tile_to_shape(p_atom, (BLOCK_M, BLOCK_N), (0, 1))

        @cute.struct
        class SharedStorage:
            mma_bar: cute.struct.MemRange[cutlass.Int64, 1]
            kv_full: cute.struct.MemRange[cutlass.Int64, STAGES]  # "ring slot s landed" (TMA bytes)
            kv_empty: cute.struct.MemRange[cutlass.Int64, STAGES]  # "ring slot s read" (tcgen05.commit)
            q_full: cute.struct.MemRange[cutlass.Int64, 1]  # "Q landed" (TMA bytes)
            tmem_holder: cutlass.Int32
            sQ: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(sQ_layout)], 1024]
            sKV: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(sKV_layout)], 1024]
            sP: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(sP_layout)], 1024]

        # KV by TMA: one box = 32 rows x 64 columns of the flattened cache (4 KB, one column of
        # 128B-swizzle atoms, as the smem tile is laid out), nine a tile; the rows of a tile are
        # contiguous inside one page, so the box's row coordinate comes from the page table
        kv_box = cute.tile_to_shape(k_atom, (BLOCK_N, CHUNK), (0, 1))
        tma_atom_kv, tma_kv = cpasync.make_tiled_tma_atom(cpasync.CopyBulkTensorTileG2SOp(), mKV, kv_box,
                                                          (BLOCK_N, CHUNK))
        # Q by TMA over the (folded row, column, request) view: 128 x 64 boxes; rows past M are
        # outside the tensor, so TMA fills the padding of the last row block with zeros
        mQ_mdb = cute.make_tensor(mQ.iterator, cute.select(mQ.layout, mode=[1, 2, 0]))
        q_box = cute.tile_to_shape(k_atom, (BLOCK_M, CHUNK), (0, 1))
        tma_atom_q, tma_q = cpasync.make_tiled_tma_atom(cpasync.CopyBulkTensorTileG2SOp(), mQ_mdb, q_box,
                                                        (BLOCK_M, CHUNK))

        mma_qk = sm100_utils.make_trivial_tiled_mma(
            dtype, dtype, OperandMajorMode.K, OperandMajorMode.K, cutlass.Float32, tcgen05.CtaGroup.ONE,
            (BLOCK_M, BLOCK_N),
        )
        mma_pv = sm100_utils.make_trivial_tiled_mma(
            dtype, dtype, OperandMajorMode.K, OperandMajorMode.MN, cutlass.Float32, tcgen05.CtaGroup.ONE,
            (BLOCK_M, self.dv_cta),
        )

        batch = mQ.shape[0]
        num_splits = mOPart.shape[1]
        m_blocks = (self.M + BLOCK_M - 1) // BLOCK_M
        self.attention_kernel_sm100(
            tma_atom_q, tma_q, tma_atom_kv, tma_kv, mPageTable, mSeqlens, mOPart, mLsePart, scale_log2,
            sQ_layout, sKV_layout, sVt_layout, sP_layout, mma_qk, mma_pv, SharedStorage,
        ).launch(
            grid=[m_blocks * DV_PARTS, num_splits, batch],
            block=[NUM_THREADS, 1, 1],
            smem=SharedStorage.size_in_bytes(),
            stream=stream,
        )
        self.launch_combine(mOPart, mLsePart, mOut, mLse, kv_scale, stream)

    @cute.kernel
    def attention_kernel_sm100(
        self,
        tma_atom_q: cute.CopyAtom,
        tma_q: cute.Tensor,
        tma_atom_kv: cute.CopyAtom,
        tma_kv: cute.Tensor,
        mPageTable: cute.Tensor,
        mSeqlens: cute.Tensor,
        mOPart: cute.Tensor,
        mLsePart: cute.Tensor,
        scale_log2: cutlass.Float32,
        sQ_layout: cute.ComposedLayout,
        sKV_layout: cute.ComposedLayout,
        sVt_layout: cute.ComposedLayout,
        sP_layout: cute.ComposedLayout,
        mma_qk: cute.TiledMma,
        mma_pv: cute.TiledMma,
        SharedStorage: cutlass.Constexpr,
    ):
        tidx, _, _ = cute.arch.thread_idx()
        warp_idx = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        mv_block, split, b = cute.arch.block_idx()
        num_splits = cute.arch.grid_dim()[1]
        m_block = mv_block // DV_PARTS
        dv_part = mv_block % DV_PARTS

        n = mSeqlens[b]
        t_begin, t_end = self.split_tiles(n, split, num_splits, BLOCK_N)
        row0 = m_block * BLOCK_M

        smem = cutlass.utils.SmemAllocator()
        storage = smem.allocate(SharedStorage)
        sQ = storage.sQ.get_tensor(sQ_layout.outer, swizzle=sQ_layout.inner)
        sKV = storage.sKV.get_tensor(sKV_layout.outer, swizzle=sKV_layout.inner)
        sP = storage.sP.get_tensor(sP_layout.outer, swizzle=sP_layout.inner)
        mma_bar = storage.mma_bar.data_ptr()
        kv_full = storage.kv_full.data_ptr()
        q_full = storage.q_full.data_ptr()
        kv_empty = storage.kv_empty.data_ptr()

        if warp_idx == 0:
            with cute.arch.elect_one():
                cute.arch.mbarrier_init(mma_bar, 1)
                for s in cutlass.range_constexpr(STAGES):
                    cute.arch.mbarrier_init(kv_full + s, 1)
                    cute.arch.mbarrier_init(kv_empty + s, 1)
                cute.arch.mbarrier_init(q_full, 1)
        cute.arch.mbarrier_init_fence()
        # the mbarriers are initialised before the load warp arms them or anyone waits on them
        cute.arch.sync_threads()

        if warp_idx == LOAD_WARP:
            # an empty split loads nothing, so no copy is ever in flight when the CTA exits
            if t_begin < t_end:
                self.produce(tma_atom_q, tma_q, tma_atom_kv, tma_kv, mPageTable, b, m_block, t_begin, t_end, sQ, sKV,
                             q_full, kv_full, kv_empty)
        else:
            # TMEM: warp 0 allocates, everyone reads the base address after a named barrier
            tmem = cutlass.utils.TmemAllocator(
                storage.tmem_holder.ptr,
                barrier_for_retrieve=pipeline.NamedBarrier(barrier_id=1, num_threads=MATH_THREADS),
            )
            tmem.allocate(TMEM_COLS)

            tmem.wait_for_alloc()
            tmem_ptr = tmem.retrieve_ptr(cutlass.Float32)
            # this CTA allocates nothing more: let a CTA waiting to allocate on this SM proceed
            tmem.relinquish_alloc_permit()

            # ---- MMA operands (smem descriptors) and accumulators (TMEM) ----
            thr_qk = mma_qk.get_slice(0)
            thr_pv = mma_pv.get_slice(0)
            tSrQ = mma_qk.make_fragment_A(thr_qk.partition_A(sQ))
            tOrP = mma_pv.make_fragment_A(thr_pv.partition_A(sP))
            tStS = thr_qk.make_fragment_C(thr_qk.partition_shape_C((BLOCK_M, BLOCK_N)))
            tStS = cute.make_tensor(tmem_ptr + self.tmem_s_col, tStS.layout)
            tOtO = thr_pv.make_fragment_C(thr_pv.partition_shape_C((BLOCK_M, self.dv_cta)))
            tOtO = cute.make_tensor(tmem_ptr + TMEM_O_COL, tOtO.layout)

            # ---- TMEM <-> register copies: thread t holds row t (32x32b: warp w = lanes 32w..) ----
            ld_s = tcgen05.make_tmem_copy(
                cute.make_copy_atom(tcgen05.Ld32x32bOp(tcgen05.Repetition(BLOCK_N)), cutlass.Float32), tStS)
            thr_ld_s = ld_s.get_slice(tidx)
            tTtS = thr_ld_s.partition_S(tStS)
            tTcS = thr_ld_s.partition_D(thr_qk.partition_C(cute.make_identity_tensor((BLOCK_M, BLOCK_N))))
            rS = cute.make_rmem_tensor(tTcS.shape, cutlass.Float32)

            # O in O_CHUNK-column slices: the copy of slice c is the copy of slice 0 moved c * O_CHUNK
            # columns along TMEM
            tOtO_c = cute.make_tensor(tOtO.iterator, cute.composition(tOtO.layout, cute.make_layout((BLOCK_M, O_CHUNK))))
            cO = thr_pv.partition_C(cute.make_identity_tensor((BLOCK_M, self.dv_cta)))
            cO_c = cute.make_tensor(cO.iterator, cute.composition(cO.layout, cute.make_layout((BLOCK_M, O_CHUNK))))
            ld_o = tcgen05.make_tmem_copy(
                cute.make_copy_atom(tcgen05.Ld32x32bOp(tcgen05.Repetition(O_CHUNK)), cutlass.Float32), tOtO_c)
            st_o = tcgen05.make_tmem_copy(
                cute.make_copy_atom(tcgen05.St32x32bOp(tcgen05.Repetition(O_CHUNK)), cutlass.Float32), tOtO_c)
            thr_ld_o = ld_o.get_slice(tidx)
            thr_st_o = st_o.get_slice(tidx)
            tTtO_ld = thr_ld_o.partition_S(tOtO_c)
            tTtO_st = thr_st_o.partition_D(tOtO_c)
            tTcO = thr_ld_o.partition_D(cO_c)
            rO = cute.make_rmem_tensor(tTcO.shape, cutlass.Float32)
            rO_part = cute.make_rmem_tensor((O_CHUNK,), mOPart.element_type)  # the partial's dtype
            n_chunks = self.dv_cta // O_CHUNK
            # P and O leave registers as contiguous row slices: that needs register i = column i
            _check_columns_in_order(tTcS, BLOCK_N)
            _check_columns_in_order(tTcO, O_CHUNK)

            # this thread's folded row and its last visible key position n - Q + qi
            row = tTcS[0][0]
            m_row = row0 + row
            row_limit = n - self.Q + cutlass.min(m_row, self.M - 1) // self.H
            stats = cute.make_rmem_tensor((2,), cutlass.Float32)  # running max (log2 domain), sum
            stats[0] = -cutlass.Float32.inf
            stats[1] = 0.0

            if t_begin < t_end:
                cute.arch.mbarrier_wait(q_full, 0)  # Q landed (completes once)
            for tile in cutlass.range(t_begin, t_end, 1, unroll=1):
                stage = (tile - t_begin) % STAGES
                # tile `tile` landed: slot `stage` completes once per use, its k-th use (tile
                # t_begin + stage + 2k) is phase k. TMA wrote it in the async proxy: no proxy fence
                cute.arch.mbarrier_wait(kv_full + stage, ((tile - t_begin) // STAGES) % 2)
                # V rows at or past n (the request's last tile) hold whatever the cache holds
                self.zero_stale_v(sKV, stage, n, tile, dv_part, tidx)
                nvvm.tcgen05_fence(nvvm.Tcgen05FenceKind.BEFORE_THREAD_SYNC)
                cute.arch.barrier(barrier_id=BAR_MATH, number_of_threads=MATH_THREADS)

                # ---- S = Q K^T into TMEM (one thread issues), commit to the barrier ----
                if warp_idx == 0:
                    nvvm.tcgen05_fence(nvvm.Tcgen05FenceKind.AFTER_THREAD_SYNC)
                    tSrK = mma_qk.make_fragment_B(thr_qk.partition_B(sKV[None, None, stage]))
                    for k in cutlass.range_constexpr(cute.size(tSrQ, mode=[2])):
                        mma_qk.set(tcgen05.Field.ACCUMULATE, k != 0)
                        cute.gemm(mma_qk, tStS, tSrQ[None, None, k], tSrK[None, None, k], tStS)
                    with cute.arch.elect_one():
                        tcgen05.commit(mma_bar)
                # completes once per tile: the phase is the tile's parity
                cute.arch.mbarrier_wait(mma_bar, stage)
                nvvm.tcgen05_fence(nvvm.Tcgen05FenceKind.AFTER_THREAD_SYNC)

                # ---- this thread's row of S: mask, scale, online softmax (log2 domain) ----
                cute.copy(ld_s, tTtS, rS)
                cute.arch.fence_view_async_tmem_load()
                pos0 = tile * BLOCK_N
                for c in cutlass.range_constexpr(cute.size(rS)):
                    if pos0 + tTcS[c][1] > row_limit:
                        rS[c] = -cutlass.Float32.inf
                    else:
                        rS[c] = rS[c] * scale_log2
                s_row = rS.load()
                row_max = stats[0]
                m_new = cute.arch.fmax(row_max, s_row.reduce(cute.ReductionOp.MAX, -cutlass.Float32.inf, 0))
                m_safe = 0.0 if m_new == -cutlass.Float32.inf else m_new
                p_row = cute.math.exp2(s_row - m_safe, fastmath=True)
                alpha = cute.math.exp2(row_max - m_safe, fastmath=True)
                stats[1] = stats[1] * alpha + p_row.reduce(cute.ReductionOp.ADD, cutlass.Float32.zero, 0)
                stats[0] = m_new

                # ---- P (16-bit) -> smem, in the K-major layout of the PV MMA's A operand: this
                # thread's row, register i = column i (32x32b), 16-byte stores (the swizzle moves
                # whole 16-byte chunks) ----
                rP = cute.make_rmem_tensor(rS.shape, self.dtype)
                rP.store(p_row.to(self.dtype))
                cute.autovec_copy(cute.make_tensor(rP.iterator, cute.make_layout(BLOCK_N)), sP[row, None])

                # ---- O *= alpha (TMEM round trip); warp-uniform skip when no row's max moved ----
                # (the first tile's PV overwrites O instead: it was never written)
                moved = cute.arch.vote_ballot_sync(alpha != 1.0)
                if tile > t_begin and moved != 0:
                    for j in cutlass.range_constexpr(n_chunks):
                        cute.copy(ld_o, cute.make_tensor(tTtO_ld.iterator + j * O_CHUNK, tTtO_ld.layout), rO)
                        cute.arch.fence_view_async_tmem_load()
                        rO.store(rO.load() * alpha)
                        cute.copy(st_o, rO, cute.make_tensor(tTtO_st.iterator + j * O_CHUNK, tTtO_st.layout))
                    cute.arch.fence_view_async_tmem_store()

                # P and O ready: publish P to the async proxy, order TMEM traffic before the MMA
                cute.arch.fence_view_async_shared()
                nvvm.tcgen05_fence(nvvm.Tcgen05FenceKind.BEFORE_THREAD_SYNC)
                cute.arch.barrier(barrier_id=BAR_MATH, number_of_threads=MATH_THREADS)

                # ---- O (+)= P V into TMEM; V^T = MN-major view of this ring slot, this CTA's Dv half ----
                if warp_idx == 0:
                    nvvm.tcgen05_fence(nvvm.Tcgen05FenceKind.AFTER_THREAD_SYNC)
                    sVt = cute.make_tensor(sKV[None, None, stage].iterator, sVt_layout.outer)
                    sVt_part = cute.local_tile(sVt, (self.dv_cta, BLOCK_N), (dv_part, 0))
                    tOrV = mma_pv.make_fragment_B(thr_pv.partition_B(sVt_part))
                    for k in cutlass.range_constexpr(cute.size(tOrP, mode=[2])):
                        if cutlass.const_expr(k == 0):
                            mma_pv.set(tcgen05.Field.ACCUMULATE, tile > t_begin)
                        else:
                            mma_pv.set(tcgen05.Field.ACCUMULATE, True)
                        cute.gemm(mma_pv, tOtO, tOrP[None, None, k], tOrV[None, None, k], tOtO)
                    # this slot's last reader: once the MMAs so far are done, the producer may refill it
                    with cute.arch.elect_one():
                        tcgen05.commit(kv_empty + stage)

            # ---- wait for the last PV MMA (every TMA load was waited for in the loop) ----
            if t_begin < t_end:
                if warp_idx == 0:
                    with cute.arch.elect_one():
                        tcgen05.commit(mma_bar)
                cute.arch.mbarrier_wait(mma_bar, (t_end - t_begin) % 2)
                nvvm.tcgen05_fence(nvvm.Tcgen05FenceKind.AFTER_THREAD_SYNC)

            # ---- epilogue: normalise, write this split's partial O (this Dv half) and LSE ----
            total = stats[1]
            empty = total == 0.0
            inv = 0.0 if empty else 1.0 / total
            lse = -cutlass.Float32.inf if empty else (stats[0] + cute.math.log2(total)) * 0.6931471805599453
            if dv_part == 0:
                if m_row < self.M:
                    mLsePart[b, split, m_row] = lse
            for j in cutlass.range_constexpr(n_chunks):
                if t_begin < t_end:
                    cute.copy(ld_o, cute.make_tensor(tTtO_ld.iterator + j * O_CHUNK, tTtO_ld.layout), rO)
                    cute.arch.fence_view_async_tmem_load()
                    rO.store(rO.load() * inv)
                else:
                    rO.fill(0.0)  # an empty split never wrote O: its weight is 0, its O must not be NaN
                # register i = column i of the chunk: 16-byte stores of this thread's row
                if m_row < self.M:
                    rO_part.store(cute.make_tensor(rO.iterator, cute.make_layout(O_CHUNK)).load().to(mOPart.element_type))
                    gO = cute.local_tile(mOPart[b, split, m_row, None], (O_CHUNK,), (dv_part * n_chunks + j,))
                    cute.autovec_copy(rO_part, gO)

            # ---- free TMEM once every warp is done reading it ----
            nvvm.tcgen05_fence(nvvm.Tcgen05FenceKind.BEFORE_THREAD_SYNC)
            cute.arch.barrier(barrier_id=BAR_MATH, number_of_threads=MATH_THREADS)
            tmem.free(tmem_ptr, TMEM_COLS)

    # -- loads ----------------------------------------------------------------------------------
    @cute.jit
    def produce(self, tma_atom_q, tma_q, tma_atom_kv, tma_kv, mPageTable, b, m_block, t_begin, t_end, sQ, sKV,
                q_full, kv_full, kv_empty):
        """The producer warp: Q, then every KV tile of the split into the ring, tile t into slot
        (t - t_begin) % 2 once the PV MMA of the tile before it in that slot is done (its
        ``kv_empty`` commit; phase = that tile's use of the slot). The page-table read of a tile
        goes out before that wait."""
        cpasync.prefetch_descriptor(tma_atom_q)
        cpasync.prefetch_descriptor(tma_atom_kv)
        self.load_q_tma(tma_atom_q, tma_q, sQ, m_block, b, q_full)
        for tile in cutlass.range(t_begin, t_end, 1, unroll=1):
            stage = (tile - t_begin) % STAGES
            row_tile = cache_row_tile(mPageTable, b, tile, BLOCK_N, self.page_size)
            if tile >= t_begin + STAGES:
                cute.arch.mbarrier_wait(kv_empty + stage, ((tile - t_begin) // STAGES - 1) % 2)
            self.load_kv_tile_tma(tma_atom_kv, tma_kv, sKV, stage, row_tile, kv_full)

    @cute.jit
    def load_kv_tile_tma(self, tma_atom, tma_kv, sKV, stage, row_tile, kv_full):
        """The load warp (all 32 lanes): arm ring slot ``stage``'s mbarrier with a tile's bytes,
        then TMA the 32 x 576 tile at ``row_tile`` into it, nine 32 x 64 boxes. Every row is
        loaded, also those at or past the request's length (see ``zero_stale_v``)."""
        if cute.arch.lane_idx() == 0:
            cute.arch.mbarrier_arrive_and_expect_tx(kv_full + stage, BLOCK_N * self.D * self.dtype.width // 8)
        cute.arch.sync_warp()
        gKV = cute.local_tile(tma_kv, (BLOCK_N, CHUNK), (row_tile, None))
        for c in cutlass.range_constexpr(self.D // CHUNK):
            tAs, tAg = chunk_box(tma_atom, sKV[None, None, stage], gKV, c)
            cute.copy(tma_atom, tAg, tAs, tma_bar_ptr=kv_full + stage)

    @cute.jit
    def load_q_tma(self, tma_atom_q, tma_q, sQ, m_block, b, q_full):
        """The load warp (all 32 lanes): this CTA's 128 folded query rows, nine 128 x 64 boxes on
        ``q_full`` (armed with the whole box bytes: TMA counts the zero-filled rows past M too)."""
        if cute.arch.lane_idx() == 0:
            cute.arch.mbarrier_arrive_and_expect_tx(q_full, BLOCK_M * self.D * self.dtype.width // 8)
        cute.arch.sync_warp()
        issue_q_boxes(tma_atom_q, tma_q, sQ, m_block, b, q_full)

    @cute.jit
    def zero_stale_v(self, sKV, stage, n, tile, dv_part, tidx):
        """In a request's last tile, zero this CTA's V columns of the rows at or past ``n`` (TMA
        loaded them as the cache holds them, maybe NaN: their P is 0, but 0 x NaN = NaN), 16
        bytes a store, then publish the writes to the tensor cores (generic -> async proxy; the
        caller's barrier orders them before the MMAs). Their S columns are masked anyway."""
        valid = n - tile * BLOCK_N
        if valid < BLOCK_N:
            vec = 128 // self.dtype.width  # elements per 16 bytes
            per_row = self.dv_cta // vec
            zeros = cute.make_rmem_tensor((vec,), self.dtype)
            zeros.fill(0.0)
            for i in cutlass.range(tidx, (BLOCK_N - valid) * per_row, MATH_THREADS, unroll=1):
                dst = cute.local_tile(sKV[valid + i // per_row, None, stage], (vec,),
                                      (dv_part * per_row + i % per_row,))
                cute.autovec_copy(zeros, dst)
            cute.arch.fence_view_async_shared()


def _check_columns_in_order(coords, width: int) -> None:
    """Trace-time check that a thread's TMEM load fragment holds one row, register i = column i
    (the 32x32b pattern), so that its registers may be stored as one contiguous row slice."""
    cols = [coords[i][1] for i in range(width)]
    if cute.size(coords) != width or cols != list(range(width)):
        raise ValueError(f"TMEM load fragment is not one row in column order: {cols}")


__all__ = ["BLOCK_M", "BLOCK_N", "DV_PARTS", "MlaDecodeSplitKVTcgen05", "ctas_per_split"]
