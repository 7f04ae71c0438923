"""CuTe DSL ``mla_prefill`` for sm_90a: ragged causal extend attention, FlashAttention-3 style.

Checked and measured on an H200 (docs/cute.md, "mla_prefill (sm_90a)"; docs/perf/cute.md runs
P1-P2). Imports cutlass at module level: only :mod:`.mla_prefill` imports it, once the DSL is
known to be there.
The op's meaning is tokenspeed_core/ops/mla_prefill.py; dims Dqk = 192, Dv = 128, 16-bit.

Grid and work split
- One CTA = one head ``h`` (blockIdx.y) x one query tile of BLOCK_M = 128 consecutive query rows
  of one request. Query tiles are numbered as in the Triton kernel: request b's tiles start at
  ``cu_seqlens_q[b] // 128 + b`` (increasing in b, never overlapping, since a request adds at most
  one partial tile), so blockIdx.x finds its request by a binary search over ``cu_seqlens_q`` on
  the device (no host sync, no metadata) and the grid is ``T // 128 + B`` (at most B CTAs whose
  tile lies past their request's end: they exit at once, before any barrier). Tiles are taken
  latest first (the causal tail does the most work); heads slowest, so CTAs running together
  share one head's K/V in L2.
- Three warpgroups (384 threads): warpgroups 0 and 1 each own 64 query rows (wgmma M = 64); warp
  0 of warpgroup 2 is the producer: it TMA-loads Q once (three 128 x 64 boxes) and the K/V tiles
  (BLOCK_N = 128 kv rows: K three boxes, V two) into a 2-stage ring. The producer warpgroup's
  registers go to the math warpgroups (setmaxnreg 40 / 232, as the v5 decode kernel).
- Per kv tile each math warpgroup computes S = Q K^T (SS wgmma m64 n128, 12 k16 steps, Q and K
  K-major in smem), the online softmax in the log2 domain, and O += P V (RS wgmma m64 n128, 8 k16
  steps: P from registers, V read MN-major from the same smem bytes the K-major TMA wrote, as in
  the decode kernels). Software-pipelined by one tile inside a warpgroup (FlashAttention-3's
  intra-warpgroup overlap): S_j and P_{j-1} V_{j-1} are issued back to back, the softmax of S_j
  runs while P_{j-1} V_{j-1} is on the tensor cores, and O is rescaled once it has completed;
  the two warpgroups also overlap each other.
- Causal skipping: a query tile loops over kv tiles 0 .. ceil(min(kv_len, q_pos0 + 128) / 128)
  - 1 only (q_pos0 = prefix + the tile's first query index); tiles from n_full = (q_pos0 + 1) //
  128 on hold positions some row must not see and take the mask: score -> -inf where kv
  position > min(q_pos(row), kv_len - 1). That one bound covers causality, the next request's
  rows inside a tile near a request's end (real data: finite, times P = 0) and rows past the
  tensor end (zero-filled by TMA). Query rows past q_len (the next request's, or TMA zeros) are
  computed on and never stored.
- Running max starts at the finite -1e30: a row fully masked in a tile keeps its max and gets P
  = exp2(-inf - m) = 0; every row sees kv position 0 in tile 0, which is processed first, so
  every row's sum is >= 1 at the end (no division by zero, lse finite).

Ordering (who waits on which mbarrier, with which phase); tile j uses stage s = j % 2 of the K
ring and of the V ring, and is that stage's k-th fill, k = j // 2.
- ``q_full`` (count 1): the producer's lane 0 arms it with Q's bytes, then the whole producer
  warp issues Q's boxes (a DSL TMA copy elects one lane with elect.sync over the full warp: under
  ``if lane == 0`` it would hang). Math warpgroups wait phase 0 once.
- ``k_full[s]`` / ``v_full[s]`` (count 1 each): before fill k of the stage the producer's lane 0
  arms it with K's (V's) bytes, ``sync_warp``, then the warp issues K's three (V's two) boxes on
  it. Math warpgroups wait parity k % 2: on ``k_full`` before S_j, on ``v_full`` before
  P_j V_j (issued in iteration j + 1, or after the loop for the last tile). Neither runs two
  phases ahead: fill k + 1 waits on the matching ``empty`` phase k, which needs these
  warpgroups' arrivals for tile j.
- ``k_empty[s]`` (count 8: one arrival per math warp): once S_j has completed
  (``wgmma.wait_group 1`` with P_{j-1} V_{j-1} the one group allowed in flight; S_j was
  committed first), lane 0 of every math warp arrives. ``v_empty[s]`` (count 8): after P_j V_j
  has completed (``wait_group 0`` in iteration j + 1). The producer, before fill k >= 1 of a
  stage (tile j >= 2), waits parity (k - 1) % 2 on the matching one. K is freed a tile earlier
  than V, so K_{j+1}'s load is in flight while P_{j-1} V_{j-1} still holds its V stage. Every
  warp arrives (not one thread per warpgroup) because wgmma.wait_group speaks for the executing
  warp only. The producer issues K_j before V_j; V_j waits for P_{j-2} V_{j-2}, which the math
  warpgroups issue with S_{j-1}, whose K was loaded before: no wait cycle.
- ``P`` and ``O``: P_{j-1} is read by its RS wgmma from registers until ``wait_group 0``; only
  then are O rescaled by tile j's factor and P_j written (a ``wgmma.fence`` precedes each issue).
- The mbarriers are initialised by the producer's lane 0 and made visible (``fence.mbarrier_init``
  + the CTA barrier) before any other thread touches them; every TMA load is waited for by the
  math warpgroups before the CTA exits, so nothing is in flight at exit.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass.cute.nvgpu import OperandMajorMode, cpasync, warpgroup

from .mla_decode_combine import QUAD, xor_max, xor_sum
from .mla_decode_kernel_v2 import _mn_view_sm90
from .mla_decode_kernel_v5 import _acc_as_A_operand_sm90
from .mla_decode_kernel_v5_loads import CHUNK, chunk_box

BLOCK_M = 128  # query rows of a CTA: two math warpgroups of 64
WG_M = 64  # wgmma M: a math warpgroup's rows
BLOCK_N = 128  # kv rows of a tile
STAGES = 2  # Q 48 KB + 2 x (K 48 KB + V 32 KB) = 208 KB of smem
HEAD_DIM, HEAD_DIM_V = 192, 128
MATH_THREADS = 256
PRODUCER_WARP = MATH_THREADS // 32  # warp 8: the first warp of the third warpgroup
PRODUCER_REGS, MATH_REGS = 40, 232  # 128 x 40 + 256 x 232 <= 64K registers
MAX_INIT = -1.0e30  # running max before any score (finite: see the module docstring)
LN2 = 0.6931471805599453


class MlaPrefillSm90:
    """One compiled kernel per (dtype, number of heads); T, T_kv and B are run-time sizes."""

    def __init__(self, dtype, num_heads: int):
        self.dtype = dtype
        self.H = num_heads
        self.D = HEAD_DIM
        self.Dv = HEAD_DIM_V

    @cute.jit
    def __call__(self, mQ: cute.Tensor, mK: cute.Tensor, mV: cute.Tensor, mCuQ: cute.Tensor,
                 mCuKV: cute.Tensor, mOut: cute.Tensor, mLse: cute.Tensor, scale_log2: cutlass.Float32,
                 search_steps: cutlass.Int32, stream):
        dtype = self.dtype
        k_atom = warpgroup.make_smem_layout_atom(warpgroup.SmemLayoutAtomKind.K_SW128, dtype)
        mn_atom = warpgroup.make_smem_layout_atom(warpgroup.SmemLayoutAtomKind.MN_SW128, dtype)
        sQ_layout = cute.tile_to_shape(k_atom, (BLOCK_M, self.D), (0, 1))
        sK_layout = cute.tile_to_shape(k_atom, (BLOCK_N, self.D, STAGES), (0, 1, 2))
        # V lands K-major (rows = kv positions, as TMA writes it) and is read MN-major (Dv, kv):
        # both layouts put every element at the same byte (mla_decode_kernel_v2's docstring)
        sV_layout = cute.tile_to_shape(k_atom, (BLOCK_N, self.Dv, STAGES), (0, 1, 2))
        sVt_layout = cute.tile_to_shape(mn_atom, (self.Dv, BLOCK_N, STAGES), (1, 0, 2))

        @cute.struct
        class SharedStorage:
            k_full: cute.struct.MemRange[cutlass.Int64, STAGES]  # "K of the stage landed"
            v_full: cute.struct.MemRange[cutlass.Int64, STAGES]  # "V of the stage landed"
            k_empty: cute.struct.MemRange[cutlass.Int64, STAGES]  # "every math warp's S read it"
            v_empty: cute.struct.MemRange[cutlass.Int64, STAGES]  # "every math warp's P V read it"
            q_full: cute.struct.MemRange[cutlass.Int64, 1]
            sQ: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(sQ_layout)], 1024]
            sK: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(sK_layout)], 1024]
            sV: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(sV_layout)], 1024]

        mma_qk = sm90_utils.make_trivial_tiled_mma(
            dtype, dtype, OperandMajorMode.K, OperandMajorMode.K, cutlass.Float32, (1, 1, 1), (WG_M, BLOCK_N))
        mma_pv = sm90_utils.make_trivial_tiled_mma(
            dtype, dtype, OperandMajorMode.K, OperandMajorMode.MN, cutlass.Float32, (1, 1, 1), (WG_M, self.Dv),
            warpgroup.OperandSource.RMEM)

        # TMA boxes of (rows x 64 columns) for a fixed head: views with the head as the outermost
        # coordinate, (token, column, head)
        box_q = cute.tile_to_shape(k_atom, (BLOCK_M, CHUNK), (0, 1))
        box_kv = cute.tile_to_shape(k_atom, (BLOCK_N, CHUNK), (0, 1))
        op = cpasync.CopyBulkTensorTileG2SOp()
        tma_atom_q, tma_q = cpasync.make_tiled_tma_atom(op, self.head_outer(mQ), box_q, (BLOCK_M, CHUNK))
        tma_atom_k, tma_k = cpasync.make_tiled_tma_atom(op, self.head_outer(mK), box_kv, (BLOCK_N, CHUNK))
        tma_atom_v, tma_v = cpasync.make_tiled_tma_atom(op, self.head_outer(mV), box_kv, (BLOCK_N, CHUNK))

        batch = mCuQ.shape[0] - 1
        q_tiles = mQ.shape[0] // BLOCK_M + batch
        self.prefill_kernel(
            tma_atom_q, tma_q, tma_atom_k, tma_k, tma_atom_v, tma_v, mCuQ, mCuKV, mOut, mLse, scale_log2,
            search_steps, sQ_layout, sK_layout, sV_layout, sVt_layout, mma_qk, mma_pv, SharedStorage,
        ).launch(grid=[q_tiles, self.H, 1], block=[MATH_THREADS + 128, 1, 1],
                 smem=SharedStorage.size_in_bytes(), stream=stream)

    @staticmethod
    def head_outer(t: cute.Tensor) -> cute.Tensor:
        """(token, head, column) -> (token, column, head): a box of rows x columns of one head."""
        return cute.make_tensor(t.iterator, cute.select(t.layout, mode=[0, 2, 1]))

    @cute.jit
    def issue_tile(self, tma_atom, tma_t, sTile, row0, h, mbar):
        """A whole warp: the rows ``row0 .. row0 + rows(sTile) - 1`` of head ``h`` into ``sTile``,
        one box per 64 columns, completing on ``mbar``. Rows past the tensor end land as zeros."""
        rows = cute.size(sTile, mode=[0])
        g = cute.local_tile(cute.domain_offset((row0, 0, 0), tma_t), (rows, CHUNK), (0, None, h))
        for c in cutlass.range_constexpr(cute.size(sTile, mode=[1]) // CHUNK):
            tS, tG = chunk_box(tma_atom, sTile, g, c)
            cute.copy(tma_atom, tG, tS, tma_bar_ptr=mbar)

    @cute.jit
    def find_request(self, mCuQ, pid, search_steps):
        """The request owning query tile ``pid``: the largest b with cu_q[b] // 128 + b <= pid."""
        lo = cutlass.Int32(0)
        hi = mCuQ.shape[0] - 2
        for _ in cutlass.range(search_steps, unroll=1):
            mid = (lo + hi + 1) // 2
            if mCuQ[mid] // BLOCK_M + mid <= pid:
                lo = mid
            else:
                hi = mid - 1
        return lo

    @cute.kernel
    def prefill_kernel(self, tma_atom_q: cute.CopyAtom, tma_q: cute.Tensor, tma_atom_k: cute.CopyAtom,
                       tma_k: cute.Tensor, tma_atom_v: cute.CopyAtom, tma_v: cute.Tensor, mCuQ: cute.Tensor,
                       mCuKV: cute.Tensor, mOut: cute.Tensor, mLse: cute.Tensor, scale_log2: cutlass.Float32,
                       search_steps: cutlass.Int32, sQ_layout: cute.ComposedLayout,
                       sK_layout: cute.ComposedLayout, sV_layout: cute.ComposedLayout,
                       sVt_layout: cute.ComposedLayout, mma_qk: cute.TiledMma, mma_pv: cute.TiledMma,
                       SharedStorage: cutlass.Constexpr):
        tidx, _, _ = cute.arch.thread_idx()
        bx, h, _ = cute.arch.block_idx()
        pid = cute.arch.grid_dim()[0] - 1 - bx  # latest (heaviest) query tiles first
        warp = tidx // 32
        lane = tidx % 32

        b = self.find_request(mCuQ, pid, search_steps)
        q_start = mCuQ[b]
        q_len = mCuQ[b + 1] - q_start
        kv_start = mCuKV[b]
        kv_len = mCuKV[b + 1] - kv_start
        prefix = kv_len - q_len
        q_row0 = (pid - (q_start // BLOCK_M + b)) * BLOCK_M  # first query index of the tile

        smem = cutlass.utils.SmemAllocator()
        storage = smem.allocate(SharedStorage)
        sQ = storage.sQ.get_tensor(sQ_layout.outer, swizzle=sQ_layout.inner)
        sK = storage.sK.get_tensor(sK_layout.outer, swizzle=sK_layout.inner)
        sV = storage.sV.get_tensor(sV_layout.outer, swizzle=sV_layout.inner)
        sVt = cute.make_tensor(sV.iterator, sVt_layout.outer)  # the same bytes, read MN-major
        bars = (storage.k_full.data_ptr(), storage.v_full.data_ptr(), storage.k_empty.data_ptr(),
                storage.v_empty.data_ptr())
        q_full = storage.q_full.data_ptr()

        # a tile past its request's end (an empty request, or the spare tile numbers) exits here:
        # the condition is uniform over the CTA and precedes every barrier
        if q_row0 < q_len:
            q_pos0 = prefix + q_row0  # kv position of the tile's first query
            n_tiles = (cutlass.min(kv_len, q_pos0 + BLOCK_M) + BLOCK_N - 1) // BLOCK_N
            n_full = (q_pos0 + 1) // BLOCK_N  # tiles every row of the CTA sees whole: no mask

            if warp == PRODUCER_WARP:
                cpasync.prefetch_descriptor(tma_atom_q)
                cpasync.prefetch_descriptor(tma_atom_k)
                cpasync.prefetch_descriptor(tma_atom_v)
                if lane == 0:
                    for s in cutlass.range_constexpr(STAGES):
                        cute.arch.mbarrier_init(bars[0] + s, 1)
                        cute.arch.mbarrier_init(bars[1] + s, 1)
                        cute.arch.mbarrier_init(bars[2] + s, MATH_THREADS // 32)
                        cute.arch.mbarrier_init(bars[3] + s, MATH_THREADS // 32)
                    cute.arch.mbarrier_init(q_full, 1)
                    cute.arch.mbarrier_init_fence()
                    cute.arch.mbarrier_arrive_and_expect_tx(q_full, BLOCK_M * self.D * self.dtype.width // 8)
                cute.arch.sync_warp()
                self.issue_tile(tma_atom_q, tma_q, sQ, q_start + q_row0, h, q_full)
            cute.arch.sync_threads()  # the mbarriers are initialised before anyone else uses them

            if tidx >= MATH_THREADS:
                cute.arch.setmaxregister_decrease(PRODUCER_REGS)
                if warp == PRODUCER_WARP:
                    self.produce(tma_atom_k, tma_k, tma_atom_v, tma_v, sK, sV, kv_start, h, n_tiles, bars, lane)
            else:
                cute.arch.setmaxregister_increase(MATH_REGS)
                self.consume(sQ, sK, sVt, mma_qk, mma_pv, bars, q_full, mOut, mLse, scale_log2,
                             q_start, q_len, q_row0, prefix, kv_len, n_tiles, n_full, h, tidx)

    @cute.jit
    def produce(self, tma_atom_k, tma_k, tma_atom_v, tma_v, sK, sV, kv_start, h, n_tiles, bars, lane):
        """The producer warp: K and V of kv tiles 0 .. n_tiles - 1 of the request, in the order
        the math warpgroups use them, each into stage j % 2 once that stage's K (V) is free. K and
        V are freed separately: tile j's K after S_j, its V only after P_j V_j, which the math
        warpgroups issue one tile later (see the module docstring)."""
        k_full, v_full, k_empty, v_empty = bars
        for j in cutlass.range(n_tiles, unroll=1):
            s = j % STAGES
            row0 = kv_start + j * BLOCK_N
            for full, empty, bytes_, tma_atom, tma_t, sT in (
                    (k_full, k_empty, BLOCK_N * self.D * self.dtype.width // 8, tma_atom_k, tma_k, sK),
                    (v_full, v_empty, BLOCK_N * self.Dv * self.dtype.width // 8, tma_atom_v, tma_v, sV)):
                if j >= STAGES:
                    cute.arch.mbarrier_wait(empty + s, (j // STAGES - 1) % 2)
                if lane == 0:
                    cute.arch.mbarrier_arrive_and_expect_tx(full + s, bytes_)
                cute.arch.sync_warp()
                self.issue_tile(tma_atom, tma_t, sT[None, None, s], row0, h, full + s)

    @cute.jit
    def consume(self, sQ, sK, sVt, mma_qk, mma_pv, bars, q_full, mOut, mLse, scale_log2, q_start, q_len,
                q_row0, prefix, kv_len, n_tiles, n_full, h, tidx):
        """A math warpgroup: 64 query rows against every kv tile, then its rows of out and lse.

        Software-pipelined by one tile (FlashAttention-3's intra-warpgroup overlap): S_j and
        P_{j-1} V_{j-1} are issued together, and the softmax of S_j runs on the CUDA cores while
        P_{j-1} V_{j-1} is on the tensor cores; O is rescaled by tile j's factor once that P V has
        completed. P_{j-1} waits in registers (bf16), so one S accumulator suffices."""
        k_full, v_full, k_empty, v_empty = bars
        wg = tidx // 128
        wg_tidx = tidx % 128
        lane = tidx % 32
        thr_qk = mma_qk.get_slice(wg_tidx)
        thr_pv = mma_pv.get_slice(wg_tidx)
        tSrQ = mma_qk.make_fragment_A(thr_qk.partition_A(cute.local_tile(sQ, (WG_M, self.D), (wg, 0))))
        tSrK = mma_qk.make_fragment_B(thr_qk.partition_B(sK))  # (MMA, N, K, stage)
        tOrV = mma_pv.make_fragment_B(thr_pv.partition_B(sVt))  # (MMA, N, K, stage)

        acc_S = cute.make_rmem_tensor(thr_qk.partition_shape_C((WG_M, BLOCK_N)), cutlass.Float32)
        acc_S_mn = _mn_view_sm90(acc_S)
        acc_O = cute.make_rmem_tensor(thr_pv.partition_shape_C((WG_M, self.Dv)), cutlass.Float32)
        acc_O.fill(0.0)
        acc_O_mn = _mn_view_sm90(acc_O)
        rP = cute.make_fragment_like(acc_S, self.dtype)
        tOrP = cute.make_tensor(rP.iterator, _acc_as_A_operand_sm90(rP.layout))
        tScS_mn = _mn_view_sm90(thr_qk.partition_C(cute.make_identity_tensor((WG_M, BLOCK_N))))

        # this thread's two rows: query index within the request, the last kv position each sees
        qi = cute.make_rmem_tensor((2,), cutlass.Int32)
        limit = cute.make_rmem_tensor((2,), cutlass.Int32)
        row_max = cute.make_rmem_tensor((2,), cutlass.Float32)
        row_sum = cute.make_rmem_tensor((2,), cutlass.Float32)  # this thread's columns only
        for r in cutlass.range_constexpr(2):
            qi[r] = q_row0 + wg * WG_M + tScS_mn[r, 0][0]
            limit[r] = cutlass.min(prefix + qi[r], kv_len - 1)
            row_max[r] = MAX_INIT
            row_sum[r] = 0.0

        factor = cute.make_rmem_tensor((2,), cutlass.Float32)
        cute.arch.mbarrier_wait(q_full, 0)
        # tile 0: S_0 and its softmax (O is still zero: nothing to rescale)
        cute.arch.mbarrier_wait(k_full, 0)  # TMA writes: no proxy fence
        self.issue_s(mma_qk, acc_S, tSrQ, tSrK, 0)
        warpgroup.wait_group(0)
        if lane == 0:  # this warp's reads of K_0 are done (see the module docstring)
            cute.arch.mbarrier_arrive(k_empty)
        self.softmax(acc_S_mn, tScS_mn, 0, n_full, limit, row_max, row_sum, factor, scale_log2)
        rP.store(acc_S.load().to(self.dtype))
        for j in cutlass.range(1, n_tiles, unroll=1):
            s = j % STAGES
            sp = (j - 1) % STAGES
            cute.arch.mbarrier_wait(k_full + s, (j // STAGES) % 2)
            self.issue_s(mma_qk, acc_S, tSrQ, tSrK, s)
            cute.arch.mbarrier_wait(v_full + sp, ((j - 1) // STAGES) % 2)
            self.issue_pv(mma_pv, acc_O, tOrP, tOrV, sp)
            warpgroup.wait_group(1)  # S_j (the older group) is done; P_{j-1} V_{j-1} may run on
            if lane == 0:
                cute.arch.mbarrier_arrive(k_empty + s)
            self.softmax(acc_S_mn, tScS_mn, j, n_full, limit, row_max, row_sum, factor, scale_log2)
            warpgroup.wait_group(0)  # P_{j-1} V_{j-1} is done: O may be rescaled, V_{j-1} freed, P reused
            if lane == 0:
                cute.arch.mbarrier_arrive(v_empty + sp)
            # unconditionally: skipping it by a warp vote when no row's max moved (as the decode
            # kernel does) made this kernel 2-5% slower (docs/perf/cute.md, run P5)
            for r in cutlass.range_constexpr(2):
                acc_O_mn[r, None] = acc_O_mn[r, None].load() * factor[r]
            rP.store(acc_S.load().to(self.dtype))
        # the last tile's P V
        sl = (n_tiles - 1) % STAGES
        cute.arch.mbarrier_wait(v_full + sl, ((n_tiles - 1) // STAGES) % 2)
        self.issue_pv(mma_pv, acc_O, tOrP, tOrV, sl)
        warpgroup.wait_group(0)

        self.store_rows(acc_O_mn, thr_pv, row_max, row_sum, qi, q_start, q_len, mOut, mLse, h, lane)

    @cute.jit
    def issue_s(self, mma_qk, acc_S, tSrQ, tSrK, s):
        """S = Q K^T over stage ``s``'s K (12 k16 steps), one commit group."""
        warpgroup.fence()  # orders this thread's register writes (acc_O's rescale, P) before the MMAs
        atom = cute.make_mma_atom(mma_qk.op)
        atom.set(warpgroup.Field.ACCUMULATE, False)
        for k in cutlass.range_constexpr(self.D // 16):
            cute.gemm(atom, acc_S, tSrQ[None, None, k], tSrK[None, None, k, s], acc_S)
            atom.set(warpgroup.Field.ACCUMULATE, True)
        warpgroup.commit_group()

    @cute.jit
    def issue_pv(self, mma_pv, acc_O, tOrP, tOrV, s):
        """O += P V over stage ``s``'s V, P from registers, one commit group."""
        warpgroup.fence()
        atom = cute.make_mma_atom(mma_pv.op)
        atom.set(warpgroup.Field.ACCUMULATE, True)
        for k in cutlass.range_constexpr(cute.size(tOrP.shape[2])):
            cute.gemm(atom, acc_O, tOrP[None, None, k], tOrV[None, None, k, s], acc_O)
        warpgroup.commit_group()

    @cute.jit
    def softmax(self, acc_S_mn, tScS_mn, j, n_full, limit, row_max, row_sum, factor, scale_log2):
        """Tile j's scores -> exp2(score x scale - running max) in place (the mask only on tiles
        that cross a row's last position); updates the running max (log2 units) and this
        thread's part of the row sums, and leaves in ``factor`` what O must be rescaled by.
        The max is taken over the raw scores (the launcher makes ``scale_log2`` > 0), so the
        scaling and the subtraction are one FFMA a score instead of an FMUL and an FADD."""
        if j >= n_full:
            for r in cutlass.range_constexpr(2):
                for c in cutlass.range_constexpr(cute.size(tScS_mn, mode=[1])):
                    if j * BLOCK_N + tScS_mn[0, c][1] > limit[r]:
                        acc_S_mn[r, c] = -cutlass.Float32.inf
        # a row's max over the 4 lanes of its quad
        for r in cutlass.range_constexpr(2):
            tile_max = xor_max(acc_S_mn[r, None].load().reduce(cute.ReductionOp.MAX, -cutlass.Float32.inf, 0), QUAD)
            m_new = cute.arch.fmax(row_max[r], tile_max * scale_log2)
            factor[r] = cute.math.exp2(row_max[r] - m_new, fastmath=True)
            row_max[r] = m_new
            acc_S_mn[r, None] = cute.math.exp2(acc_S_mn[r, None].load() * scale_log2 - m_new, fastmath=True)
            row_sum[r] = row_sum[r] * factor[r] + acc_S_mn[r, None].load().reduce(
                cute.ReductionOp.ADD, cutlass.Float32.zero, 0)

    @cute.jit
    def store_rows(self, acc_O_mn, thr_pv, row_max, row_sum, qi, q_start, q_len, mOut, mLse, h, lane):
        """Normalise this thread's two rows and store them (valid query rows only): O two
        columns a store, lse by the quad's first lane (natural log)."""
        tOcO_mn = _mn_view_sm90(thr_pv.partition_C(cute.make_identity_tensor((WG_M, self.Dv))))
        pair = cute.make_rmem_tensor((2,), self.dtype)
        for r in cutlass.range_constexpr(2):
            total = xor_sum(row_sum[r], QUAD)  # >= 1: the row's max contributes exp2(0)
            inv = 1.0 / total
            if qi[r] < q_len:
                # 64-bit: row * H * 128 passes 2^31 at 128K tokens x 128 heads (32-bit coordinates
                # would compute the offset in 32 bits)
                row = cutlass.Int64(q_start) + qi[r]
                if lane % 4 == 0:
                    mLse[row, h] = (row_max[r] + cute.math.log2(total)) * LN2
                gO = mOut[row, h, None]
                for c in cutlass.range_constexpr(0, cute.size(tOcO_mn, mode=[1]), 2):
                    for i in cutlass.range_constexpr(2):
                        pair[i] = (acc_O_mn[r, c + i] * inv).to(self.dtype)
                    cute.autovec_copy(pair, cute.local_tile(gO, (2,), (tOcO_mn[0, c][1] // 2,)))


__all__ = ["BLOCK_M", "BLOCK_N", "HEAD_DIM", "HEAD_DIM_V", "MlaPrefillSm90"]
