"""The see-saw kernel's fp8 e4m3 cache path (v5, :mod:`.mla_decode_kernel_v5`): the producer
warpgroup loads each column group's fp8 bytes into registers, converts them to the query's
16-bit type and stores them into the tile slot the math warpgroups read, in place of the 16-bit
path's TMA boxes.

Imports cutlass at module level (only the kernel modules import it). A mixin of
``MlaDecodeSplitKVSeesaw`` beside :class:`.mla_decode_kernel_v5_loads.SeesawLoads`; it uses
``block_n``, ``page_size``, ``dtype`` and ``kv_dtype``.

Why registers and not smem staging: Q (72 KB) and the two 16-bit tiles (144 KB) leave ~11 KB of
shared memory, and a step of two tiles needs 22-48 KB in flight an SM to hide the load latency
(docs/cute.md, "v5", fp8). The producer warpgroup's four warps (56 registers each, against 40
with a 16-bit cache: ``FP8_PRODUCER_REGS``) hold one column group of up to five 64 x 64
chunks (160 bytes a thread) at a time, so the next step's tiles are asked of L2 first
(``prefetch_tiles``) and the register loads find them there.

For each column group, in the order the math warpgroups free them (``SeesawLoads.produce``):
1. 16-byte global loads of the group's chunks into registers (before the wait: they fly under
   it). Not earlier: the publish below (4) is a ``MEMBAR.ALL.CTA``, which waits for every load
   the thread has in flight, so loads issued before a publish would stall it (two groups in
   registers, the next loaded before this one's publish, were 1.18-1.25x slower: run 49);
2. wait for the group's "freed" mbarrier (the math warpgroup's release, which arms no bytes here);
3. e4m3 -> 16-bit (exact: e4m3's 3 mantissa bits and exponent range fit fp16 and bf16) and
   16-byte stores into the swizzled tile slot, at the addresses the 16-bit TMA boxes would have
   written. A thread's two 16-byte units of a row are at the same swizzled offsets in every pass
   and chunk (``sw128_units``), so it computes them once: through the DSL's swizzled tensor each
   of the 72 store addresses a step was computed apart and hoisted, and spilled (264 bytes);
4. ``fence.proxy.async`` (the generic stores become visible to the wgmma reads), a named barrier
   over the producer warpgroup, and one arrival on the group's "landed" mbarrier (count 1).

Rows of a request's last tile past its length are converted as they are: the math warpgroups
mask their scores and zero their V rows (a stale cache may hold NaN encodings).
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute

from . import mla_decode_kernel as base
from .mla_decode_kernel_v5_loads import CHUNK, GROUPS, cache_row_tile

PRODUCER_THREADS = 128  # the whole producer warpgroup converts
ROWS_PER_PASS = PRODUCER_THREADS // 4  # four threads a 64-column row, 16 fp8 each
UNITS_PER_ROW = CHUNK * 2 // 16  # 16-byte units in a 64-column row of a 16-bit chunk (128 bytes)
BAR_PRODUCER = 6  # named barrier over the producer warpgroup (1-5 are the math warpgroups')
# setmaxnreg with an fp8 cache: the producer stages a column group (40 registers of fp8); the
# math warpgroups spill below 224, and setmaxnreg only moves registers within the CTA's launch
# allocation (384 x 168), so the producer gets 56 (128 x 56 + 256 x 224 = 384 x 168; with 64 the
# math warpgroups' setmaxnreg.inc waited forever for registers that were never freed)
FP8_PRODUCER_REGS, FP8_MATH_REGS = 56, 224


def sw128_units(ptidx, h):
    """Where producer thread ``ptidx`` stores its half ``h`` (16 bytes: 8 converted values) of a
    chunk row, in 16-byte units from the chunk's start, for its row of the first pass. A 16-bit
    chunk is 64 rows of 128 bytes, SW128-swizzled as the wgmma reads it: 16-byte unit ``u`` of row
    ``r`` sits at unit ``r * 8 + (u ^ (r % 8))``. The next pass is 32 rows (256 units) on, the
    next chunk 512 units (8 KB): neither changes ``r % 8``, so two offsets serve them all. Plain
    integer arithmetic: the kernel calls it on its thread index, the tests on Python ints."""
    r = ptidx // 4
    u = (ptidx % 4) * 2 + h
    return r * UNITS_PER_ROW + (u ^ (r % 8))


def fp8_kv_copy(kv_dtype):
    """The producer's global -> register copy of one 64 x 64 fp8 chunk: 16 bytes a load, four
    threads a 64-column row, 32 rows a pass (two passes a chunk)."""
    atom = cute.make_copy_atom(cute.nvgpu.CopyUniversalOp(), kv_dtype, num_bits_per_copy=128)
    return cute.make_tiled_copy_tv(atom, cute.make_layout((PRODUCER_THREADS // 4, 4), stride=(4, 1)),
                                   cute.make_layout((1, 128 // kv_dtype.width)))


class SeesawFp8Loads:
    """The fp8 producer (a mixin; see the module docstring)."""

    @cute.jit
    def produce_fp8(self, mKV, kv_copy, mPageTable, b, t_begin, t_end, kv_ptr, ptidx, mbar, mbar_free, sums):
        """The producer warpgroup's loop (all 128 threads): every KV tile of the split, column
        group by column group, in the order the math warpgroups free them. At the top of a step
        (its tiles are loaded as the math warpgroups finish the step before) it asks L2 for the
        next step's two tiles: the register loads then wait on L2, not HBM. ``kv_ptr``: the
        two tile slots' smem, unswizzled (16-bit elements; 1024-byte aligned)."""
        thr = kv_copy.get_slice(ptidx)
        tile_elems = self.block_n * self.D
        # the two tile slots, flat (a local_tile of 8 elements is one 16-byte unit), and this
        # thread's two store offsets
        sK0 = cute.make_tensor(kv_ptr, cute.make_layout(tile_elems))
        sK1 = cute.make_tensor(kv_ptr + tile_elems, cute.make_layout(tile_elems))
        units = (sw128_units(ptidx, 0), sw128_units(ptidx, 1))
        for t0 in cutlass.range(t_begin, t_end, 2, unroll=1):
            phase = ((t0 - t_begin) // 2) % 2
            if ptidx == 0:
                self.prefetch_tiles(mKV, mPageTable, b, t0 + 2, t_end)
            for j in cutlass.range_constexpr(2):
                self.convert_group(mKV, kv_copy, thr, mPageTable, b, t0, sK0, 0, j, mbar, mbar_free, phase, ptidx,
                                   units, sums)
            if t0 + 1 < t_end:
                for j in cutlass.range_constexpr(2):
                    self.convert_group(mKV, kv_copy, thr, mPageTable, b, t0 + 1, sK1, 1, j, mbar, mbar_free, phase,
                                       ptidx, units, sums)

    @cute.jit
    def convert_group(self, mKV, kv_copy, thr, mPageTable, b, tile, sTile, slot: cutlass.Constexpr,
                      j: cutlass.Constexpr, mbar, mbar_free, phase, ptidx, units, sums):
        """Column group ``GROUPS[slot][j]`` of KV tile ``tile``: fp8 to registers, wait until the
        math warpgroup has freed the group, convert into the tile slot ``sTile`` (flat, 16-bit
        elements) at this thread's ``units`` (``sw128_units``), publish."""
        g = slot * 2 + j
        chunks = GROUPS[slot][j]
        row_tile = cutlass.Int64(cache_row_tile(mPageTable, b, tile, self.block_n, self.page_size))
        gKV = cute.local_tile(mKV, (self.block_n, CHUNK), (row_tile, None))  # (rows, CHUNK, chunks)
        staged = []
        for c in cutlass.range_constexpr(len(chunks)):
            src = thr.partition_S(gKV[None, None, chunks[c]])
            regs = cute.make_rmem_tensor(src.shape, self.kv_dtype)
            cute.copy(kv_copy, src, regs)
            staged.append(regs)
        self.timed(sums, base.WAIT_FREED, cute.arch.mbarrier_wait, mbar_free + g, phase)
        chunk_units = self.block_n * UNITS_PER_ROW
        for c in cutlass.range_constexpr(len(chunks)):
            # (16 values, pass): pass p is row p * ROWS_PER_PASS + ptidx // 4
            r16 = cute.make_rmem_tensor(staged[c].shape, self.dtype)
            r16.store(staged[c].load().to(self.dtype))
            flat = cute.make_tensor(r16.iterator, cute.make_layout(cute.size(r16)))
            for k in cutlass.range_constexpr(cute.size(r16) // 8):  # (pass, half) = divmod(k, 2)
                unit = chunks[c] * chunk_units + (k // 2) * ROWS_PER_PASS * UNITS_PER_ROW + units[k % 2]
                cute.autovec_copy(cute.local_tile(flat, (8,), (k,)), cute.local_tile(sTile, (8,), (unit,)))
        cute.arch.fence_proxy("async.shared", space="cta")
        cute.arch.barrier(barrier_id=BAR_PRODUCER, number_of_threads=PRODUCER_THREADS)
        if ptidx == 0:
            cute.arch.mbarrier_arrive(mbar + g)


__all__ = ["BAR_PRODUCER", "FP8_MATH_REGS", "FP8_PRODUCER_REGS", "PRODUCER_THREADS", "SeesawFp8Loads", "fp8_kv_copy",
           "sw128_units"]
