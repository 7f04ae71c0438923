"""CuTe DSL MLA decode, v5 for sm_90a and > 32 folded rows: two KV tiles per step, see-saw.

Imports cutlass at module level (only :mod:`.mla_decode` imports it, once the DSL is known to be
installed). Same interface, split-KV scheme and combine as v3/v4. v3 computed half of S per
warpgroup (reading Q from smem once per 32 KV rows) and ran the softmax with the tensor cores
idle (44-57% of the GEMM rate). v5 is the schedule FlashMLA's sm_90 kernel made known (its
design, our code). The measurements behind each choice, and what was tried and dropped, are in
docs/cute.md ("v5") and docs/perf/cute.md (runs 9-41).

- A step takes two 64-row KV tiles, K0 and K1. Warpgroup 0 computes the whole S0 = Q K0^T (m64
  n64, 36 k-steps), warpgroup 1 the whole S1 = Q K1^T; both accumulate O over their half of Dv
  (O_L: warpgroup 0, O_R: warpgroup 1; 64 x 256 fp32 each). Both S of the next step are computed
  at the end of a step, side by side; WG0 queues its S0 behind its last PV of the step, not
  after it (K0 landed long before).
- The see-saw: WG0 does the softmax of S0 against the running max (shared in smem) -> ``m0``,
  writes P0 to smem at once and runs O_L += P0 V0_L from registers. WG1 first brings O_R to
  ``m0`` and runs O_R += P0 V0_R, and under that MMA does the softmax of S1 -> ``m1 = max(m0,
  rowmax S1)``, writes P1 to smem, brings O_R to ``m1`` and runs O_R += P1 V1_R from registers;
  WG0 brings O_L to ``m1`` and runs O_L += P1 V1_L. One warpgroup's softmax overlaps the other's
  MMAs, and the columns of K0 that WG1 reads (256-575) are free early in the step, so the next K0
  loads under this step's remaining work (FlashMLA hands P0 over after WG1's softmax: 1.05-1.28x
  slower here).
- Loads: TMA boxes of 64 rows x 64 columns (8 KB, one SW128 atom column), issued by a producer
  warp (a third warpgroup whose registers go to the math warpgroups through setmaxnreg); Q first,
  before the pair's cluster barrier. A step's tiles are four column groups, each with a "landed"
  mbarrier (armed with its bytes) and a "freed" one: in K0, columns 0-255 (V0_L) are freed once
  WG0's first PV is done, 256-575 once WG1's O_R += P0 V0_R is; in K1, 256-511 (V1_R) after WG1's
  second PV, the rest after WG0's. The freeing warpgroup arms and signals without blocking; the
  producer waits for the signal and issues the group. The next S is computed in the order the
  columns were freed (WG0: columns 0-255 first; WG1: 256-511 first).
- An fp8 e4m3 cache: the producer warpgroup's four warps load each column group's fp8 bytes
  into registers, convert them into the group's place in the 16-bit tile and arrive on its
  "landed" mbarrier (:mod:`.mla_decode_kernel_v5_fp8`); no pairs, and the producer asks L2 for
  each step's tiles a step ahead.
- S reads Q's rope chunk (columns 512-575) from registers (an RS wgmma for its 4 k-steps, loaded
  by ldmatrix once Q has landed), the other 8 chunks from smem: an SS m64 n64 k16 wgmma reads
  4 KB of operands per 32 clocks, the SM's shared-memory bandwidth at the tensor rate, and the
  long compute-bound rows are power-capped, so fewer smem reads pay (0.4-0.9%, run 46).
- A pair of m-blocks: m-blocks 2k and 2k + 1 of a request (H x q_len >= 128 rows) read the same
  KV tiles, so they run as a 2-CTA cluster: CTA j of the pair issues the groups j of a slot once
  both CTAs have freed them (each signals the other's "freed" mbarrier), multicast into both
  CTAs' smem, so a tile is read from L2 once per pair (at 8 m-blocks a request the kernel was
  L2-bound without it). An odd number of m-blocks runs unpaired.
- Two tiles of smem is all there is (Q 72 KB + 2 x 72 KB), so a tile is loaded only a step
  before its use; at the top of each step one thread (of the pair's first CTA) asks L2 for the
  next step's two tiles (``cp.async.bulk.prefetch.L2``), whose TMA loads follow group by group as
  this step frees the columns (one step ahead; two was slower than none). With one m-block
  (33-64 rows) there is no prefetch (``l2_prefetch``): no other CTA shares the tiles.
- P of the other warpgroup lives in the 64 x 64 rope columns (512-575) of its own tile, dead once
  that tile's S is computed.
- Rows of a request's last tile past its length are loaded as they are (a stale cache may hold
  NaN): their scores are masked, and the V columns a warpgroup reads are zeroed in smem before its
  PV (0 x NaN is NaN).
- Running max starts at a finite -1e30 (not -inf), so fully masked rows and tiles need no
  special case: exp2(-inf - (-1e30)) = 0, exp2(-1e30 - (-1e30)) = 1.

Status: the default for > 32 folded rows (16-bit cache: full conformance grid on an H100, runs
9-41; graph replay == eager; fp8 cache: docs/perf/cute.md, run 49).
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass.cute.nvgpu import OperandMajorMode, cpasync, warp, warpgroup

from . import mla_decode_kernel as base
from .mla_decode_combine import QUAD, xor_max, xor_sum
from .mla_decode_kernel_v2 import (
    BLOCK_M,
    NUM_THREADS,
    MlaDecodeSplitKVWgmma,
    _acc_as_A_operand_sm90,
    _mn_view_sm90,
)
from .mla_decode_kernel_v5_fp8 import FP8_MATH_REGS, FP8_PRODUCER_REGS, SeesawFp8Loads, fp8_kv_copy
from .mla_decode_kernel_v5_loads import (
    CHUNK,
    K0_EARLY,
    K0_LATE,
    K1_EARLY,
    K1_LATE,
    ROPE_CHUNK,
    SeesawLoads,
)

MAX_INIT = -1.0e30  # running max before any score (finite: see the module docstring)
# Named barriers (id 0 is __syncthreads): WG0 -> WG1 "P0, m0 and its factor in smem", WG1 -> WG0
# "P1, m1 and its factor in smem"; then one per warpgroup (BAR_WG + wg) for its own smem writes
# (zeroed V rows) before its wgmma.
BAR_P0, BAR_P1, BAR_WG = 1, 2, 3
BAR_MATH = 5  # the two math warpgroups (the producer warpgroup is not in it)
MATH_THREADS = NUM_THREADS  # two math warpgroups; a third (the producer) issues the KV loads
# setmaxnreg: registers are allocated per warpgroup, so the producer's go to the math warpgroups
# (128 x 40 + 256 x 232 = 384 x 168, the launch allocation)
PRODUCER_REGS, MATH_REGS = 40, 232


class MlaDecodeSplitKVSeesaw(SeesawFp8Loads, SeesawLoads, MlaDecodeSplitKVWgmma):
    """v5: two 64-row KV tiles per step; each warpgroup computes one whole S, see-saw PV."""

    one_split_direct = True  # one split a request: out and lse written here, no combine

    def __init__(self, dtype, num_heads, q_len, head_dim, head_dim_v, page_size, block_n=64, stages=2,
                 combine_batch=16, kv_dtype=None):
        super().__init__(dtype, num_heads, q_len, head_dim, head_dim_v, page_size, 64, 2, combine_batch)
        if (head_dim, head_dim_v) != (576, 512):
            raise ValueError("v5 is laid out for D = 576, Dv = 512 (rope columns 512-575 hold P)")
        # an fp8 e4m3 cache is converted to the query's type by the producer warpgroup
        # (mla_decode_kernel_v5_fp8), the math warpgroups read the same 16-bit tiles
        self.kv_dtype = dtype if kv_dtype is None else kv_dtype
        self.kv_fp8 = self.kv_dtype.width == 8
        # m-blocks 2k and 2k + 1 of a request read the same KV tiles: as a 2-CTA cluster, each
        # column group is loaded once and multicast to both (half the L2 reads); an odd number of
        # m-blocks runs unpaired, and so does an fp8 cache (the multicast is TMA's)
        self.cluster = 2 if (-(-self.M // BLOCK_M)) % 2 == 0 and not self.kv_fp8 else 1
        # the L2 prefetch pays where a request's m-blocks share each tile; with one m-block the
        # prefetched tiles of every CTA only push each other out of L2 (run 28: 1-5% slower). The
        # fp8 producer asks L2 for every step's tiles itself (its register loads hold one group)
        self.l2_prefetch = self.M > BLOCK_M and not self.kv_fp8
        self.producer_regs, self.math_regs = ((FP8_PRODUCER_REGS, FP8_MATH_REGS) if self.kv_fp8
                                              else (PRODUCER_REGS, MATH_REGS))
        # setmaxnreg moves registers within the launch allocation (65536 / 384 threads, rounded
        # down to 8): asking for more hangs the increasing warpgroups
        threads = MATH_THREADS + 128
        if 128 * self.producer_regs + MATH_THREADS * self.math_regs > threads * (65536 // threads // 8 * 8):
            raise ValueError(f"setmaxnreg {self.producer_regs} / {self.math_regs} exceeds the launch allocation")

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
        sKV_layout = cute.tile_to_shape(k_atom, (self.block_n, self.D, 2), (0, 1, 2))
        sVt_layout = cute.tile_to_shape(mn_atom, (self.Dv, self.block_n), (1, 0))

        @cute.struct
        class SharedStorage:
            mbar: cute.struct.MemRange[cutlass.Int64, 4]  # "column group landed", [slot][j]
            free: cute.struct.MemRange[cutlass.Int64, 4]  # "column group freed" (by every CTA of the pair)
            q_landed: cute.struct.MemRange[cutlass.Int64, 1]  # this CTA's Q (TMA)
            # running row max (shared by both warpgroups), the two O scales of a step, row sums
            sM: cute.struct.Align[cute.struct.MemRange[cutlass.Float32, BLOCK_M], 16]
            sScale: cute.struct.Align[cute.struct.MemRange[cutlass.Float32, 2 * BLOCK_M], 16]
            sSum: cute.struct.Align[cute.struct.MemRange[cutlass.Float32, 2 * BLOCK_M], 16]
            sQ: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(sQ_layout)], 1024]
            sKV: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(sKV_layout)], 1024]

        mma_qk = sm90_utils.make_trivial_tiled_mma(
            dtype, dtype, OperandMajorMode.K, OperandMajorMode.K, cutlass.Float32, (1, 1, 1),
            (BLOCK_M, self.block_n),
        )
        # Q's rope chunk from registers (loaded once): 1/9 of S's A operand off shared memory, whose
        # bandwidth S's SS wgmmas (m64 n64: 4 KB of operands per 32 clocks) use up at the tensor rate
        mma_qk_rs = sm90_utils.make_trivial_tiled_mma(
            dtype, dtype, OperandMajorMode.K, OperandMajorMode.K, cutlass.Float32, (1, 1, 1),
            (BLOCK_M, self.block_n), warpgroup.OperandSource.RMEM,
        )
        q_copy = cute.make_tiled_copy_A(
            cute.make_copy_atom(warp.LdMatrix8x8x16bOp(transpose=False, num_matrices=4), dtype), mma_qk_rs)
        mma_pv_ss = sm90_utils.make_trivial_tiled_mma(
            dtype, dtype, OperandMajorMode.K, OperandMajorMode.MN, cutlass.Float32, (1, 1, 1),
            (BLOCK_M, self.dv_half),
        )
        mma_pv_rs = sm90_utils.make_trivial_tiled_mma(
            dtype, dtype, OperandMajorMode.K, OperandMajorMode.MN, cutlass.Float32, (1, 1, 1),
            (BLOCK_M, self.dv_half), warpgroup.OperandSource.RMEM,
        )

        # P (16-bit, S's accumulator layout) -> smem: stmatrix, four 8x8 matrices an instruction
        p_copy = cute.make_tiled_copy_C(
            cute.make_copy_atom(warp.StMatrix8x8x16bOp(transpose=False, num_matrices=4), dtype), mma_qk)

        # Q: 64 x 64 boxes (8 KB, the SW128 atom column) over (folded row, column, request); rows
        # past M are outside the tensor, so TMA fills the last m-block's padding with zeros
        chunk_layout = cute.tile_to_shape(k_atom, (self.block_n, CHUNK), (0, 1))
        mQ_mdb = cute.make_tensor(mQ.iterator, cute.select(mQ.layout, mode=[1, 2, 0]))
        tma_atom_q, tma_q = cpasync.make_tiled_tma_atom(cpasync.CopyBulkTensorTileG2SOp(), mQ_mdb, chunk_layout,
                                                        (BLOCK_M, CHUNK))
        # KV: one TMA box = one 64-row chunk; an fp8 cache goes through the producer's registers
        # (kv_copy) and has no descriptor (Q's stands in for the unused argument)
        kv_copy = fp8_kv_copy(self.kv_dtype)
        tma_atom, tma_kv = tma_atom_q, tma_q
        if cutlass.const_expr(not self.kv_fp8):
            tma_op = (cpasync.CopyBulkTensorTileG2SMulticastOp() if self.cluster > 1
                      else cpasync.CopyBulkTensorTileG2SOp())
            tma_atom, tma_kv = cpasync.make_tiled_tma_atom(tma_op, mKV, chunk_layout, (self.block_n, CHUNK))

        batch = mQ.shape[0]
        num_splits = mOPart.shape[1]
        m_blocks = (self.M + BLOCK_M - 1) // BLOCK_M
        self.attention_kernel_v5(
            tma_atom_q, tma_q, mKV, tma_atom, tma_kv, mPageTable, mSeqlens, mOPart, mLsePart, mOut, mLse,
            scale_log2, kv_scale, sQ_layout, sKV_layout, sVt_layout, p_copy, mma_qk, mma_qk_rs, q_copy, mma_pv_ss,
            mma_pv_rs, kv_copy, SharedStorage,
        ).launch(
            grid=[m_blocks, num_splits, batch],
            block=[MATH_THREADS + 128, 1, 1],
            cluster=[self.cluster, 1, 1],
            smem=SharedStorage.size_in_bytes(),
            stream=stream,
        )
        self.launch_combine(mOPart, mLsePart, mOut, mLse, kv_scale, stream)

    # -- pieces of the math warpgroups (the loads: SeesawLoads) --------------------------------
    @cute.jit
    def qk_chunks(self, mma_qk, acc_S, q, k, chunks: cutlass.Constexpr, first: cutlass.Constexpr):
        """Issue S (+)= Q K^T over the given chunks (4 k16 steps each) as one wgmma group. ``q`` =
        (Q's smem fragment, Q's rope chunk in registers, the RS mma), ``k`` = (K's fragment for the
        SS mma, for the RS one): the rope chunk's steps read Q from registers."""
        tSrQ, tSrQr, mma_qk_rs = q
        tSrK, tSrKr = k
        if cutlass.const_expr(first and chunks[0] == ROPE_CHUNK):
            raise ValueError("S starts on a smem chunk: the rope chunk's RS steps always accumulate")
        warpgroup.fence()
        atom = cute.make_mma_atom(mma_qk.op)
        atom.set(warpgroup.Field.ACCUMULATE, not first)
        atom_rs = cute.make_mma_atom(mma_qk_rs.op)
        atom_rs.set(warpgroup.Field.ACCUMULATE, True)
        for c in cutlass.range_constexpr(len(chunks)):
            for kk in cutlass.range_constexpr(CHUNK // 16):
                kb = chunks[c] * (CHUNK // 16) + kk
                if cutlass.const_expr(chunks[c] == ROPE_CHUNK):
                    cute.gemm(atom_rs, acc_S, tSrQr[None, None, kk], tSrKr[None, None, kb], acc_S)
                else:
                    cute.gemm(atom, acc_S, tSrQ[None, None, kb], tSrK[None, None, kb], acc_S)
                    atom.set(warpgroup.Field.ACCUMULATE, True)
        warpgroup.commit_group()

    @cute.jit
    def compute_s(self, mma_qk, acc_S, q, k, early: cutlass.Constexpr, late: cutlass.Constexpr,
                  mbar_early, mbar_late, phase, sums):
        """S = Q K^T of a tile whose column groups arrive on two mbarriers: the first group's
        MMAs run while the second is still landing."""
        self.timed(sums, base.WAIT_LANDED, cute.arch.mbarrier_wait, mbar_early, phase)  # TMA: no proxy fence
        self.qk_chunks(mma_qk, acc_S, q, k, early, True)
        self.timed(sums, base.WAIT_LANDED, cute.arch.mbarrier_wait, mbar_late, phase)
        self.qk_chunks(mma_qk, acc_S, q, k, late, False)
        self.timed(sums, base.WAIT_MMA, warpgroup.wait_group, 0)

    @cute.jit
    def pv(self, tiled_mma, acc_O, tA, tB):
        """Issue O += P V (4 k16 steps) as one wgmma group (not waited)."""
        warpgroup.fence()
        atom = cute.make_mma_atom(tiled_mma.op)
        atom.set(warpgroup.Field.ACCUMULATE, True)
        for k in cutlass.range_constexpr(cute.size(tA.shape[2])):
            cute.gemm(atom, acc_O, tA[None, None, k], tB[None, None, k], acc_O)
        warpgroup.commit_group()

    @cute.jit
    def zero_stale_v(self, sVt_half, n, tile, wg, wg_tidx):
        """Zero the V rows (columns of ``sVt_half``) of KV positions >= n in a request's last
        tile, then publish them to this warpgroup's tensor-core reads."""
        valid = n - tile * self.block_n
        if valid < self.block_n:
            for i in cutlass.range(wg_tidx, (self.block_n - valid) * self.dv_half, 128, unroll=1):
                sVt_half[i % self.dv_half, valid + i // self.dv_half] = sVt_half.element_type(0)
            cute.arch.fence_proxy("async.shared", space="cta")
            cute.arch.barrier(barrier_id=BAR_WG + wg, number_of_threads=128)

    @cute.jit
    def mask_max(self, acc_S_mn, tScS_mn, row_limit, pos0, n, tile_max):
        """The causal-by-position mask (-inf) and the row maxima of the raw scores: the scale is
        applied in the exponent's FFMA (``softmax_rows``; the launcher makes it > 0). Only a tile
        past the first query token's last position (n - q_len) holds masked positions (a branch
        uniform over the CTA)."""
        if pos0 + self.block_n - 1 > n - self.Q:
            for r in cutlass.range_constexpr(cute.size(tScS_mn, mode=[0])):
                for c in cutlass.range_constexpr(cute.size(tScS_mn, mode=[1])):
                    if pos0 + tScS_mn[0, c][1] > row_limit[r]:
                        acc_S_mn[r, c] = -cutlass.Float32.inf
        for r in cutlass.range_constexpr(cute.size(tScS_mn, mode=[0])):
            tile_max[r] = xor_max(acc_S_mn[r, None].load().reduce(cute.ReductionOp.MAX, -cutlass.Float32.inf, 0),
                                  QUAD)

    @cute.jit
    def softmax_rows(self, acc_S_mn, tile_max, rows, sM, sScale, which: cutlass.Constexpr, lane, scale_log2):
        """Online-softmax step of one warpgroup's S against the shared running max ``sM`` (log2
        units): m_new = max(sM, tile max x scale), the factor for older values exp2(sM - m_new)
        goes to ``sScale[:, which]`` and is returned per row; S becomes P = exp2(S x scale -
        m_new), one FFMA and one MUFU a score."""
        factor = cute.make_rmem_tensor((2,), cutlass.Float32)
        m_new = cute.make_rmem_tensor((2,), cutlass.Float32)
        for r in cutlass.range_constexpr(2):
            m_old = sM[rows[r]]
            m_new[r] = cute.arch.fmax(m_old, tile_max[r] * scale_log2)
            factor[r] = cute.math.exp2(m_old - m_new[r], fastmath=True)
        cute.arch.sync_warp()  # every lane has read sM before the quad leader overwrites it
        for r in cutlass.range_constexpr(2):
            if lane % 4 == 0:
                sM[rows[r]] = m_new[r]
                sScale[rows[r], which] = factor[r]
            acc_S_mn[r, None] = cute.math.exp2(acc_S_mn[r, None].load() * scale_log2 - m_new[r], fastmath=True)
        return factor

    @cute.jit
    def scale_o(self, acc_O_mn, f0, f1):
        """O rows *= their factor (this thread's two rows); skipped by a warp none of whose rows
        changed its max (after the first tiles, most steps: 128 multiplies saved). Measured
        (docs/perf/cute.md run 47): without the vote 0.5-2.7% slower here; in the prefill kernel,
        where the rescale runs after its P V has completed, the same vote cost 2-5%."""
        if not cute.arch.vote_all_sync((f0 == 1.0) & (f1 == 1.0)):
            acc_O_mn[0, None] = acc_O_mn[0, None].load() * f0
            acc_O_mn[1, None] = acc_O_mn[1, None].load() * f1

    @cute.jit
    def share_p(self, acc_S, rP, p_copy, tPrP, tPsP, barrier_id):
        """P (this warpgroup's softmax output) -> 16-bit -> its smem slot, published to the other
        warpgroup's tensor-core reads (the named barrier also carries the max and factor)."""
        rP.store(acc_S.load().to(self.dtype))
        cute.copy(p_copy, tPrP, tPsP)
        cute.arch.fence_proxy("async.shared", space="cta")
        cute.arch.barrier_arrive(barrier_id=barrier_id, number_of_threads=MATH_THREADS)

    @cute.jit
    def rescale(self, acc_O_mn, row_sum, factor, acc_S_mn):
        """O rows and their row sums to this warpgroup's new max (``factor`` per row, from its
        softmax), the row sums taking its new P too."""
        for r in cutlass.range_constexpr(2):
            row_sum[r] = row_sum[r] * factor[r] + acc_S_mn[r, None].load().reduce(
                cute.ReductionOp.ADD, cutlass.Float32.zero, 0)
        self.scale_o(acc_O_mn, factor[0], factor[1])

    @cute.jit
    def rescale_to_other(self, acc_O_mn, row_sum, factor, sScale, rows, which: cutlass.Constexpr):
        """O rows and their row sums to the other warpgroup's new max: its factors, published in
        ``sScale[:, which]``, land in ``factor``."""
        for r in cutlass.range_constexpr(2):
            factor[r] = sScale[rows[r], which]
            row_sum[r] = row_sum[r] * factor[r]
        self.scale_o(acc_O_mn, factor[0], factor[1])

    @cute.kernel
    def attention_kernel_v5(
        self,
        tma_atom_q: cute.CopyAtom,
        tma_q: cute.Tensor,
        mKV: cute.Tensor,
        tma_atom: cute.CopyAtom,
        tma_kv: cute.Tensor,
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
        p_copy: cute.TiledCopy,
        mma_qk: cute.TiledMma,
        mma_qk_rs: cute.TiledMma,
        q_copy: cute.TiledCopy,
        mma_pv_ss: cute.TiledMma,
        mma_pv_rs: cute.TiledMma,
        kv_copy: cute.TiledCopy,
        SharedStorage: cutlass.Constexpr,
    ):
        BN = self.block_n
        tidx, _, _ = cute.arch.thread_idx()
        m_block, split, b = cute.arch.block_idx()
        num_splits = cute.arch.grid_dim()[1]
        wg = tidx // 128
        wg_tidx = tidx % 128
        lane = tidx % 32
        self.stamp(base.STAMP_ENTRY, tidx, 0)

        n = mSeqlens[b]
        t_begin, t_end = self.split_tiles(n, split, num_splits, BN)
        row0 = m_block * BLOCK_M

        smem = cutlass.utils.SmemAllocator()
        storage = smem.allocate(SharedStorage)
        sQ = storage.sQ.get_tensor(sQ_layout.outer, swizzle=sQ_layout.inner)
        sKV = storage.sKV.get_tensor(sKV_layout.outer, swizzle=sKV_layout.inner)
        sM = storage.sM.get_tensor(cute.make_layout(BLOCK_M))
        sScale = storage.sScale.get_tensor(cute.make_layout((BLOCK_M, 2), stride=(1, BLOCK_M)))
        sSum = storage.sSum.get_tensor(cute.make_layout((BLOCK_M, 2), stride=(1, BLOCK_M)))
        mbar = storage.mbar.data_ptr()  # [K0 early, K0 late, K1 early, K1 late]
        mbar_free = storage.free.data_ptr()  # same order
        mbar_q = storage.q_landed.data_ptr()
        sK0 = sKV[None, None, 0]
        sK1 = sKV[None, None, 1]
        # P of a tile's warpgroup, for the other one: the tile's rope columns (dead after its S)
        sP0 = cute.local_tile(sK0, (BN, CHUNK), (0, ROPE_CHUNK))
        sP1 = cute.local_tile(sK1, (BN, CHUNK), (0, ROPE_CHUNK))
        sVt0 = cute.local_tile(cute.make_tensor(sK0.iterator, sVt_layout.outer), (self.dv_half, BN), (wg, 0))
        sVt1 = cute.local_tile(cute.make_tensor(sK1.iterator, sVt_layout.outer), (self.dv_half, BN), (wg, 0))

        if tidx >= MATH_THREADS and tidx < MATH_THREADS + 32:  # the producer warp, before anything else
            self.setup_and_load_q(tma_atom_q, tma_q, tma_atom, sQ, m_block, b, tidx - MATH_THREADS, mbar, mbar_free,
                                  mbar_q)
        if tidx < BLOCK_M:
            sM[tidx] = MAX_INIT
        # The mbarriers are initialised before any thread (of either CTA of a pair) uses them: the
        # producer's init fence (setup_and_load_q) releases them, so the arrive is relaxed (as
        # CUTLASS pairs fence_barrier_init with cluster_arrive_relaxed). A releasing arrive waited for
        # the CTA's loads in flight, i.e. for all of Q: 6.2-6.5 us at B 16 q 4 H 128, where the
        # wave loads 9.4 MB of Q, before the first KV tiles were asked for (1.0 us relaxed;
        # docs/perf/cute.md, runs 40-41). sM is published by the math threads' barrier below.
        if cutlass.const_expr(self.cluster > 1):
            cute.arch.cluster_arrive_relaxed()
            cute.arch.cluster_wait()
        else:
            cute.arch.sync_threads()
        self.stamp(base.STAMP_SETUP, tidx, 0)

        if tidx >= MATH_THREADS:  # the producer warpgroup: one warp issues the KV loads (fp8: all four convert)
            cute.arch.setmaxregister_decrease(self.producer_regs)
            if cutlass.const_expr(self.kv_fp8):  # all four warps convert the fp8 cache
                producer_waits = self.wait_sums()
                self.produce_fp8(mKV, kv_copy, mPageTable, b, t_begin, t_end, storage.sKV.data_ptr(),
                                 tidx - MATH_THREADS, mbar, mbar_free, producer_waits)
                self.store_waits(base.STAMP_WAITS + 2, producer_waits, tidx, MATH_THREADS)
            elif tidx < MATH_THREADS + 32:
                rank = cute.arch.block_idx_in_cluster() if cutlass.const_expr(self.cluster > 1) else 0
                self.stamp(base.STAMP_PRODUCER_START, tidx, MATH_THREADS)
                producer_waits = self.wait_sums()
                self.produce(mKV, tma_atom, tma_kv, mPageTable, b, t_begin, t_end, sK0, sK1, rank, mbar,
                             mbar_free, producer_waits)
                self.stamp(base.STAMP_PRODUCER_DONE, tidx, MATH_THREADS)
                self.store_waits(base.STAMP_WAITS + 2, producer_waits, tidx, MATH_THREADS)
        else:
            cute.arch.setmaxregister_increase(self.math_regs)
            # ---- the first two tiles' column groups released to the producer; Q landed ----
            if t_begin < t_end:
                if wg == 0:
                    self.release(0, 0, wg_tidx, mbar, mbar_free)
                else:
                    self.release(0, 1, wg_tidx, mbar, mbar_free)
            if t_begin + 1 < t_end:
                if wg == 0:
                    self.release(1, 1, wg_tidx, mbar, mbar_free)
                else:
                    self.release(1, 0, wg_tidx, mbar, mbar_free)
            cute.arch.mbarrier_wait(mbar_q, 0)  # Q landed
            cute.arch.barrier(barrier_id=BAR_MATH, number_of_threads=MATH_THREADS)  # sM visible to both
            self.stamp(base.STAMP_Q, tidx, 0)

            # ---- fragments: S of this warpgroup's tile (m64 n64); O over this warpgroup's Dv half ----
            thr_qk = mma_qk.get_slice(wg_tidx)
            thr_ss = mma_pv_ss.get_slice(wg_tidx)
            thr_rs = mma_pv_rs.get_slice(wg_tidx)
            tSrQ = mma_qk.make_fragment_A(thr_qk.partition_A(sQ))
            tSrK0 = mma_qk.make_fragment_B(thr_qk.partition_B(sK0))
            tSrK1 = mma_qk.make_fragment_B(thr_qk.partition_B(sK1))
            # Q's rope chunk in registers (A of the RS mma), loaded once Q has landed
            thr_qk_rs = mma_qk_rs.get_slice(wg_tidx)
            sQ_rope = cute.local_tile(sQ, (BLOCK_M, CHUNK), (0, ROPE_CHUNK))
            tSrQr = thr_qk_rs.make_fragment_A(thr_qk_rs.partition_A(sQ_rope))
            thr_q_copy = q_copy.get_slice(wg_tidx)
            cute.copy(q_copy, thr_q_copy.partition_S(sQ_rope), thr_q_copy.retile(tSrQr))
            q_frags = (tSrQ, tSrQr, mma_qk_rs)
            k0_frags = (tSrK0, mma_qk_rs.make_fragment_B(thr_qk_rs.partition_B(sK0)))
            k1_frags = (tSrK1, mma_qk_rs.make_fragment_B(thr_qk_rs.partition_B(sK1)))
            tOrV0 = mma_pv_ss.make_fragment_B(thr_ss.partition_B(sVt0))
            tOrV1 = mma_pv_ss.make_fragment_B(thr_ss.partition_B(sVt1))
            tOrV0_rs = mma_pv_rs.make_fragment_B(thr_rs.partition_B(sVt0))
            tOrV1_rs = mma_pv_rs.make_fragment_B(thr_rs.partition_B(sVt1))
            tOrP0 = mma_pv_ss.make_fragment_A(thr_ss.partition_A(sP0))  # WG1 reads P0 from smem
            tOrP1 = mma_pv_ss.make_fragment_A(thr_ss.partition_A(sP1))  # WG0 reads P1 from smem
            thr_p = p_copy.get_slice(wg_tidx)
            tPsP0 = thr_p.partition_D(sP0)  # where WG0 writes P0
            tPsP1 = thr_p.partition_D(sP1)  # where WG1 writes P1

            acc_S = cute.make_rmem_tensor(thr_qk.partition_shape_C((BLOCK_M, BN)), cutlass.Float32)
            acc_S_mn = _mn_view_sm90(acc_S)
            acc_O = cute.make_rmem_tensor(thr_rs.partition_shape_C((BLOCK_M, self.dv_half)), cutlass.Float32)
            acc_O.fill(0.0)
            acc_O_mn = _mn_view_sm90(acc_O)
            rP = cute.make_fragment_like(acc_S, self.dtype)
            tOrP_rs = cute.make_tensor(rP.iterator, _acc_as_A_operand_sm90(rP.layout))
            tPrP = thr_p.retile(rP)

            tScS_mn = _mn_view_sm90(thr_qk.partition_C(cute.make_identity_tensor((BLOCK_M, BN))))
            rows = cute.make_rmem_tensor((2,), cutlass.Int32)  # this thread's two rows of S and O
            row_limit = cute.make_rmem_tensor((2,), cutlass.Int32)
            row_sum = cute.make_rmem_tensor((2,), cutlass.Float32)  # this warpgroup's P, partial
            tile_max = cute.make_rmem_tensor((2,), cutlass.Float32)
            for r in cutlass.range_constexpr(2):
                rows[r] = tScS_mn[r, 0][0]
                row_limit[r] = n - self.Q + cutlass.min(row0 + rows[r], self.M - 1) // self.H
                row_sum[r] = 0.0

            # ---- prologue: S of the first step's tiles ----
            if wg == 0:
                if t_begin < t_end:
                    self.compute_s(mma_qk, acc_S, q_frags, k0_frags, K0_EARLY, K0_LATE, mbar + 0, mbar + 1, 0, None)
            else:
                if t_begin + 1 < t_end:
                    self.compute_s(mma_qk, acc_S, q_frags, k1_frags, K1_EARLY, K1_LATE, mbar + 2, mbar + 3, 0, None)
            self.stamp(base.STAMP_FIRST_S, tidx, 0)
            waits = self.wait_sums()  # the timing probe's wait records (None: not compiled)

            for t0 in cutlass.range(t_begin, t_end, 2, unroll=1):
                t1 = t0 + 1
                if cutlass.const_expr(self.l2_prefetch):
                    # the second step's tiles, once the first S is done; the producer asks for the rest
                    if tidx == 0 and m_block % self.cluster == 0 and t0 == t_begin:
                        self.prefetch_tiles(mKV, mPageTable, b, t0 + 2, t_end)
                has1 = t1 < t_end
                next_phase = ((t0 - t_begin) // 2 + 1) % 2
                if wg == 0:
                    # (a) softmax of S0 against the running max m1 of the last step -> m0; P0 (max m0)
                    # goes to smem at once, with m0 and the factor: WG1 starts O_R += P0 V0_R with it
                    self.mask_max(acc_S_mn, tScS_mn, row_limit, t0 * BN, n, tile_max)
                    fac0 = self.softmax_rows(acc_S_mn, tile_max, rows, sM, sScale, 0, lane, scale_log2)
                    self.share_p(acc_S, rP, p_copy, tPrP, tPsP0, BAR_P0)
                    self.rescale(acc_O_mn, row_sum, fac0, acc_S_mn)
                    # (b) O_L += P0 V0_L, P0 from registers; then K0's columns 0-255 are free
                    self.zero_stale_v(sVt0, n, t0, wg, wg_tidx)
                    self.pv(mma_pv_rs, acc_O, tOrP_rs, tOrV0_rs)
                    self.timed(waits, base.WAIT_MMA, warpgroup.wait_group, 0)
                    if t0 + 2 < t_end:
                        self.release(0, 0, wg_tidx, mbar, mbar_free)
                    # (c) O_L to WG1's max m1, O_L += P1 V1_L; then K1's columns 0-255, 512-575 are free.
                    # (d) the next step's S0 is queued behind that MMA: its columns were freed early in
                    # this step, and S0 writes acc_S, which the MMA does not read (P1 comes from smem)
                    if has1:
                        self.timed(waits, base.WAIT_HANDOVER, cute.arch.barrier, barrier_id=BAR_P1,
                                   number_of_threads=MATH_THREADS)
                        self.rescale_to_other(acc_O_mn, row_sum, tile_max, sScale, rows, 1)
                        self.zero_stale_v(sVt1, n, t1, wg, wg_tidx)
                        self.pv(mma_pv_ss, acc_O, tOrP1, tOrV1)
                        if t0 + 2 < t_end:
                            self.timed(waits, base.WAIT_LANDED, cute.arch.mbarrier_wait, mbar + 0, next_phase)
                            self.qk_chunks(mma_qk, acc_S, q_frags, k0_frags, K0_EARLY, True)
                            self.timed(waits, base.WAIT_MMA, warpgroup.wait_group, 1)  # O_L += P1 V1_L done
                            if t0 + 3 < t_end:
                                self.release(1, 1, wg_tidx, mbar, mbar_free)
                            self.timed(waits, base.WAIT_LANDED, cute.arch.mbarrier_wait, mbar + 1, next_phase)
                            self.qk_chunks(mma_qk, acc_S, q_frags, k0_frags, K0_LATE, False)
                            self.timed(waits, base.WAIT_MMA, warpgroup.wait_group, 0)
                        else:
                            self.timed(waits, base.WAIT_MMA, warpgroup.wait_group, 0)
                else:
                    # (a) O_R to m0, O_R += P0 V0_R; under it the softmax of S1 (m1 = max(m0, rowmax))
                    self.timed(waits, base.WAIT_HANDOVER, cute.arch.barrier, barrier_id=BAR_P0,
                               number_of_threads=MATH_THREADS)
                    self.rescale_to_other(acc_O_mn, row_sum, tile_max, sScale, rows, 0)
                    self.zero_stale_v(sVt0, n, t0, wg, wg_tidx)
                    self.pv(mma_pv_ss, acc_O, tOrP0, tOrV0)
                    if has1:
                        self.mask_max(acc_S_mn, tScS_mn, row_limit, t1 * BN, n, tile_max)
                        fac1 = self.softmax_rows(acc_S_mn, tile_max, rows, sM, sScale, 1, lane, scale_log2)
                        self.share_p(acc_S, rP, p_copy, tPrP, tPsP1, BAR_P1)
                        self.timed(waits, base.WAIT_MMA, warpgroup.wait_group, 0)  # O_R += P0 V0_R done: K0's 256-575 free
                        if t0 + 2 < t_end:
                            self.release(0, 1, wg_tidx, mbar, mbar_free)
                        # (b) O_R to m1, O_R += P1 V1_R from registers; then K1's 256-511 are free
                        self.rescale(acc_O_mn, row_sum, fac1, acc_S_mn)
                        self.zero_stale_v(sVt1, n, t1, wg, wg_tidx)
                        self.pv(mma_pv_rs, acc_O, tOrP_rs, tOrV1_rs)
                        self.timed(waits, base.WAIT_MMA, warpgroup.wait_group, 0)
                        if t0 + 3 < t_end:
                            self.release(1, 0, wg_tidx, mbar, mbar_free)
                            # (c) the next step's S1
                            self.compute_s(mma_qk, acc_S, q_frags, k1_frags, K1_EARLY, K1_LATE, mbar + 2, mbar + 3,
                                           next_phase, waits)
                    else:
                        self.timed(waits, base.WAIT_MMA, warpgroup.wait_group, 0)

            # ---- epilogue: add the two warpgroups' row sums, normalise, write the split's partials ----
            self.stamp(base.STAMP_LOOP_END, tidx, 0)
            self.store_waits(base.STAMP_WAITS, waits, tidx, 0)
            self.store_waits(base.STAMP_WAITS + 1, waits, tidx, 128)
            cute.arch.barrier(barrier_id=BAR_MATH, number_of_threads=MATH_THREADS)  # sM final; every load was waited for
            for r in cutlass.range_constexpr(2):
                row_sum[r] = xor_sum(row_sum[r], QUAD)
                if lane % 4 == 0:
                    sSum[rows[r], wg] = row_sum[r]
            cute.arch.barrier(barrier_id=BAR_MATH, number_of_threads=MATH_THREADS)
            self.stamp(base.STAMP_EPI_SYNC, tidx, 0)
            for r in cutlass.range_constexpr(2):
                total = sSum[rows[r], 0] + sSum[rows[r], 1]
                empty = total == 0.0
                inv = 0.0 if empty else 1.0 / total
                lse = -cutlass.Float32.inf if empty else (sM[rows[r]] + cute.math.log2(total)) * 0.6931471805599453
                acc_O_mn[r, None] = acc_O_mn[r, None].load() * inv
                m = row0 + rows[r]
                if wg == 0:
                    if lane % 4 == 0:
                        if m < self.M:
                            self.store_lse(mLsePart, mLse, b, split, num_splits, m, lse)

            cO = thr_rs.partition_C(cute.make_identity_tensor((BLOCK_M, self.dv_half)))
            # O through smem: WG0 stages its half in Q's space, WG1 in the first KV tile's (both free now)
            stage = storage.sQ.data_ptr()
            if wg == 1:
                stage = storage.sKV.data_ptr()
            self.store_result_staged(acc_O, cO, BLOCK_M, self.dv_half, row0, wg * self.dv_half, False, stage, mOPart,
                                     mOut, b, split, num_splits, kv_scale, wg_tidx, BAR_WG + wg)
            self.stamp(base.STAMP_STORED, tidx, 0)
        if cutlass.const_expr(self.cluster > 1):  # no CTA of a pair exits while the other may use it
            # relaxed: every remote arrive and multicast of the pair was waited for by its target
            # before this point, so nothing is left to order; a releasing arrive waited for this
            # CTA's epilogue stores (exit ~1.2 us paired against 0.06 unpaired, run 40; run 44)
            cute.arch.cluster_arrive_relaxed()
            cute.arch.cluster_wait()
        self.stamp(base.STAMP_EXIT, tidx, 0)


__all__ = ["MlaDecodeSplitKVSeesaw"]
