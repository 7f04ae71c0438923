"""Shared base of the CuTe DSL MLA decode kernels: the shape-class configuration, constants,
and the score scale.

Imports cutlass at module level: only the kernel modules import this one, and only once
nvidia-cutlass-dsl is known to be installed. The kernels (docs/cute.md) extend
``MlaDecodeSplitKV``: the wgmma base :class:`.mla_decode_kernel_v2.MlaDecodeSplitKVWgmma`, v3
(:mod:`.mla_decode_kernel_v3`), v4 (:mod:`.mla_decode_kernel_v4`) and the sm_100a kernel
(:mod:`.mla_decode_kernel_sm100`). The first kernel of this module (v1: mma.sync, 64-row
tiles) was removed once v3/v4 beat it on every measured row; its design and numbers are in
docs/cute.md and docs/perf/cute.md (runs 1-3), its code in git history (before 2026-11-27 16:40).

What every kernel shares:
- The query axis is folded into the head axis: row ``m = qi * H + h`` of an M = q_len * H
  tall tile (``q[b]`` is ``[Q, H, D]`` contiguous, so the fold is a free view). All rows share
  the one latent row per KV position; key position p is visible to row qi iff
  ``p <= n - Q + qi``.
- Split-KV: split ``s`` of request ``b`` takes an equal share of that request's KV tiles,
  computed on the device from ``cache_seqlens`` (no host sync, graph-capturable). It writes its
  normalised partial O (in the output dtype) and fp32 partial LSE; the combine kernel
  (:mod:`.mla_decode_combine`) merges splits and applies ``kv_scale`` to O. With one split a request the sm_90a kernels
  write ``out`` and ``lse`` themselves and the combine is not launched (``store_result_staged``).
  ``softmax_scale * kv_scale * log2(e)`` is folded into the scores.
- Rows past a request's length are zero-filled in smem instead of loaded (a stale cache may hold
  NaN, and 0 * NaN is NaN).
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass._mlir.dialects import llvm
from cutlass.cutlass_dsl import dsl_user_op

from .mla_decode_combine import SplitKVCombine

BLOCK_M = 64  # folded (q_len x heads) rows per CTA (the wgmma M)
PAGE_TILE = 64  # a KV tile never crosses a page: page sizes are multiples of this

# The timing probe (bench/gpu_cute_stamps.py): each CTA writes STAMP_SLOTS 16-byte records
# (%globaltimer ns, %clock64) at named points of its life to a buffer whose address is fixed at
# compile time (``stamp_addr``); record STAMP_SMID holds the SM id. Off (address 0) it compiles
# to nothing. The points, shared by the kernels that have them:
STAMP_SLOTS = 16
STAMP_ENTRY, STAMP_SETUP, STAMP_Q, STAMP_FIRST_S, STAMP_LOOP_END = 0, 1, 2, 3, 4
STAMP_EPI_SYNC, STAMP_STORED, STAMP_EXIT, STAMP_PRODUCER_START, STAMP_PRODUCER_DONE = 5, 6, 7, 8, 9
STAMP_SMID = 15
STAMP_NAMES = {STAMP_ENTRY: "entry", STAMP_SETUP: "setup", STAMP_Q: "q landed", STAMP_FIRST_S: "first S",
               STAMP_LOOP_END: "loop end", STAMP_EPI_SYNC: "epilogue sums", STAMP_STORED: "stored",
               STAMP_EXIT: "exit", STAMP_PRODUCER_START: "producer start",
               STAMP_PRODUCER_DONE: "producer done"}
# Wait records (the see-saw kernel): clock cycles one thread of a warpgroup spent in each kind of
# wait over the KV loop (after the first S), four u32 sums in a 16-byte record: warpgroup 0's in
# STAMP_WAITS, warpgroup 1's in the next slot, the producer warp's in the one after.
STAMP_WAITS = 10
WAIT_LANDED, WAIT_HANDOVER, WAIT_MMA = 0, 1, 2  # KV "landed" mbarrier / the other warpgroup / own wgmma
WAIT_NAMES = {WAIT_LANDED: "KV landed", WAIT_HANDOVER: "other warpgroup", WAIT_MMA: "own MMAs"}
WAIT_FREED = 0  # the producer's record: its waits for KV columns to be freed


@dsl_user_op
def _store_stamp(addr, *, loc=None, ip=None):
    """(%globaltimer, %clock64) -> the 16 bytes at global address ``addr``."""
    llvm.inline_asm(
        None, [cutlass.Int64(addr).ir_value(loc=loc, ip=ip)],
        "{\n.reg .u64 ts, ck;\nmov.u64 ts, %globaltimer;\nmov.u64 ck, %clock64;\n"
        "st.global.v2.u64 [$0], {ts, ck};\n}",
        "l", has_side_effects=True, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT, loc=loc, ip=ip)


@dsl_user_op
def _store_smid(addr, *, loc=None, ip=None):
    """%smid -> the 4 bytes at global address ``addr``."""
    llvm.inline_asm(
        None, [cutlass.Int64(addr).ir_value(loc=loc, ip=ip)],
        "{\n.reg .u32 sm;\nmov.u32 sm, %smid;\nst.global.u32 [$0], sm;\n}",
        "l", has_side_effects=True, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT, loc=loc, ip=ip)


@dsl_user_op
def _read_clock(*, loc=None, ip=None):
    """%clock (u32), read where it stands: a side effect, so never moved across the waits it brackets."""
    return cutlass.Int32(llvm.inline_asm(
        cutlass.Int32.mlir_type, [], "mov.u32 $0, %clock;", "=r", has_side_effects=True, is_align_stack=False,
        asm_dialect=llvm.AsmDialect.AD_ATT, loc=loc, ip=ip))


@dsl_user_op
def _store_u32x4(addr, a, b, c, d, *, loc=None, ip=None):
    """Four 32-bit values -> the 16 bytes at global address ``addr``."""
    llvm.inline_asm(
        None, [cutlass.Int64(addr).ir_value(loc=loc, ip=ip)] + [cutlass.Int32(v).ir_value(loc=loc, ip=ip)
                                                                for v in (a, b, c, d)],
        "st.global.v4.u32 [$0], {$1, $2, $3, $4};", "l,r,r,r,r", has_side_effects=True, is_align_stack=False,
        asm_dialect=llvm.AsmDialect.AD_ATT, loc=loc, ip=ip)


class MlaDecodeSplitKV(SplitKVCombine):
    """Static configuration of one compiled kernel (one shape class)."""

    def __init__(self, dtype, num_heads: int, q_len: int, head_dim: int, head_dim_v: int, page_size: int):
        if page_size % PAGE_TILE:
            raise ValueError(f"page_size must be a multiple of {PAGE_TILE}, got {page_size}")
        if head_dim % 64 or head_dim_v % 128 or head_dim_v > head_dim:
            raise ValueError(f"unsupported head dims D={head_dim} Dv={head_dim_v}")
        self.dtype = dtype
        self.H = num_heads
        self.Q = q_len
        self.M = num_heads * q_len
        self.D = head_dim
        self.Dv = head_dim_v
        self.page_size = page_size

    stamp_addr = 0  # the timing probe's buffer (a device address), 0: no probe compiled

    @cute.jit
    def stamp(self, slot: cutlass.Constexpr, tidx, who: cutlass.Constexpr):
        """Timing probe: thread ``who`` writes this CTA's record ``slot`` (see STAMP_SLOTS), and
        at ``STAMP_ENTRY`` its SM id. Nothing is compiled unless ``stamp_addr`` is set."""
        if cutlass.const_expr(self.stamp_addr != 0):
            if tidx == who:
                base = self.stamp_record()
                _store_stamp(base + slot * 16)
                if cutlass.const_expr(slot == STAMP_ENTRY):
                    _store_smid(base + STAMP_SMID * 16)

    def stamp_record(self):
        """Global address of this CTA's STAMP_SLOTS records in the probe's buffer."""
        bx, by, bz = cute.arch.block_idx()
        gx, gy, _ = cute.arch.grid_dim()
        return cutlass.Int64(self.stamp_addr) + cutlass.Int64((bz * gy + by) * gx + bx) * (STAMP_SLOTS * 16)

    # -- the wait records (only with the probe on; otherwise these compile to the bare wait) --
    def wait_sums(self):
        """This thread's cycle sums per kind of wait (WAIT_*), or None without the probe."""
        if self.stamp_addr == 0:
            return None
        sums = cute.make_rmem_tensor((4,), cutlass.Int32)
        sums.fill(0)
        return sums

    @staticmethod
    def timed(sums, kind: int, wait, *args, **kwargs):
        """``wait(*args, **kwargs)``, its cycles added to ``sums[kind]`` when probing (plain
        Python: it runs while the kernel is traced, and ``sums`` is None or not at trace time)."""
        if sums is None:
            wait(*args, **kwargs)
        else:
            t0 = _read_clock()
            wait(*args, **kwargs)
            sums[kind] = sums[kind] + (_read_clock() - t0)

    @cute.jit
    def store_waits(self, slot: cutlass.Constexpr, sums, tidx, who: cutlass.Constexpr):
        """Thread ``who`` writes its wait sums to this CTA's record ``slot`` (probe only)."""
        if cutlass.const_expr(sums is not None):
            if tidx == who:
                _store_u32x4(self.stamp_record() + slot * 16, sums[0], sums[1], sums[2], sums[3])

    @cute.jit
    def split_tiles(self, n, split, num_splits, block_n: cutlass.Constexpr):
        """KV tiles [t_begin, t_end) of split ``split``: an equal share of the request's
        ceil(n / block_n) tiles, from ``cache_seqlens`` on the device (empty past the last)."""
        n_tiles = (n + block_n - 1) // block_n
        per_split = (n_tiles + num_splits - 1) // num_splits
        t_begin = split * per_split
        return t_begin, cutlass.min(t_begin + per_split, n_tiles)


__all__ = ["BLOCK_M", "MlaDecodeSplitKV"]
