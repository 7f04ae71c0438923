"""CuTe DSL mla_decode, the see-saw kernel (v5 above 32 folded rows): its PTX for the 16-bit and
fp8 caches, and the fp8 producer's store offsets against the DSL's own layouts. Compiles run in
subprocesses with CUTE_DSL_ARCH set (tests/support/cute_decode_ptx.py); they skip without
nvidia-cutlass-dsl."""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
from cute_decode_ptx import COMPILE_SCRIPT, PKG_SRC, assert_one_split_writes_out, ptx_entries

SHAPES_V5 = [  # (dtype, H, q_len, page size, variant[, cache dtype]) -> the kernel v5 launches
    (("bfloat16", 128, 1, 64, "v5"), "v5"), (("float16", 16, 8, 128, "v5"), "v5"),
    (("bfloat16", 32, 3, 64, "v5"), "v5"),  # 96 folded rows: two m-blocks
    (("bfloat16", 32, 5, 64, "v5"), "v5"),  # 160 rows: three m-blocks, which run unpaired
    (("bfloat16", 16, 4, 64, "v5"), "v5"),  # 64 rows: one m-block, unpaired, no L2 prefetch
    (("float16", 16, 3, 64, "v5"), "v5"),  # 48 rows: one partial m-block
    (("bfloat16", 16, 1, 64, "v5"), "v4"),  # 16 rows: KV rows on M
    # an fp8 cache: the producer warpgroup converts (one m-block; four m-blocks, unpaired; fp16)
    (("bfloat16", 16, 4, 64, "v5", "float8_e4m3fn"), "v5"),
    (("bfloat16", 128, 2, 64, "v5", "float8_e4m3fn"), "v5"),
    (("float16", 32, 3, 64, "v5", "float8_e4m3fn"), "v5"),
]


def test_v5_is_the_seesaw_kernel_above_32_rows(tmp_path):
    pytest.importorskip("cutlass", reason="nvidia-cutlass-dsl not installed")
    pytest.importorskip("tvm_ffi", reason="apache-tvm-ffi not installed")
    env = dict(os.environ, CUTE_DSL_ARCH="sm_90a", CUTE_DSL_KEEP="ptx", TOKENSPEED_CUTE_CACHE="0",
               PYTHONPATH=os.pathsep.join([os.path.abspath(PKG_SRC), os.environ.get("PYTHONPATH", "")]))
    for i, (shape, kernel) in enumerate(SHAPES_V5):
        d = tmp_path / str(i)
        d.mkdir()
        proc = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT, json.dumps([shape])], cwd=d, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        (p,) = glob.glob(str(d / "*.ptx"))
        text = open(p).read()
        split, _ = ptx_entries(text)
        assert f"attention_kernel_{kernel}" in split[:80], (shape, split[:80])
        if kernel != "v5":
            continue
        # four S sites (prologue and loop, one per warpgroup), each m64 n64 over D / 16 = 36
        # k-steps; four P V sites, each m64 n256 (a warpgroup's half of Dv) over 64 / 16 k-steps
        assert split.count("wgmma.mma_async.sync.aligned.m64n64k16") == 4 * 576 // 16, shape
        assert split.count("wgmma.mma_async.sync.aligned.m64n256k16") == 4 * 64 // 16, shape
        # each warpgroup's own P from registers (RS: A in braces) once per step, 4 k-steps each
        rs = re.findall(r"wgmma\.mma_async\.sync\.aligned\.m64n256k16\.f32\.\w+\.\w+ \{[^}]*\}, \{", split)
        assert len(rs) == 2 * 64 // 16, shape
        assert re.search(r"\.reqntid 384", text), shape
        fp8 = len(shape) > 5
        boxes = re.findall(r"cp\.async\.bulk\.tensor\.2d\.[^ ]*", split)
        paired = (-(-shape[1] * shape[2] // 64)) % 2 == 0 and not fp8
        if fp8:
            # the producer warpgroup (56 registers: 128 x 56 + 256 x 224 is the launch allocation,
            # which setmaxnreg cannot exceed) converts: per step 18 chunks x 2 passes of 16-byte
            # loads, 288 e4m3x2 conversions, one 16-byte store per 8 values at precomputed
            # swizzled offsets (no spills), and per column group a barrier over the producer
            # warpgroup; no KV TMA, and only Q's "landed" mbarrier is armed with bytes
            assert re.search(r"setmaxnreg\.dec\.sync\.aligned\.u32\s+56;", split), shape
            assert re.search(r"setmaxnreg\.inc\.sync\.aligned\.u32\s+224;", split), shape
            assert not boxes and split.count("mbarrier.arrive.expect_tx") == 1, shape
            assert split.count("ld.global.v4") == 2 * 9 * 2, shape
            assert split.count("cvt.rn.f16x2.e4m3x2") == 2 * 9 * 2 * 16 // 2, shape
            assert split.count("st.shared.v4") == 2 * 9 * 2 * 2, shape
            assert len(re.findall(r"bar\.sync\s+6, 128;", split)) == 4, shape
            # the producer asks L2 for the next step's two tiles (one site each), whatever the rows
            assert split.count("cp.async.bulk.prefetch.L2.global") == 2, shape
        else:
            # a producer warpgroup (its registers given to the two math warpgroups) TMAs each
            # 64 x 64 chunk of the two tile slots from one place in the code: 2 x 9 boxes
            assert re.search(r"setmaxnreg\.dec\.sync\.aligned\.u32\s+40;", split), shape
            assert re.search(r"setmaxnreg\.inc\.sync\.aligned\.u32\s+232;", split), shape
            assert len(boxes) == 2 * 576 // 64, (shape, boxes)
            assert "cvt.rn.f16x2.e4m3x2" not in split and not re.search(r"bar\.sync\s+6,", split), shape
            # the L2 prefetch only where a request's m-blocks share each tile (more than 64 rows)
            assert ("cp.async.bulk.prefetch.L2.global" in split) == (shape[1] * shape[2] > 64), shape
        # an even number of m-blocks runs as CTA pairs (16-bit cache): each box multicast to both,
        # each freed column group signalled to the issuing CTA's mbarrier, the pair leaving together
        assert all((".multicast::cluster" in b_) == paired for b_ in boxes), shape
        assert ("mbarrier.arrive.shared::cluster" in split) == paired, shape
        assert ("barrier.cluster.wait" in split) == paired, shape
        # the setup barrier of a pair arrives relaxed (a releasing arrive waited for all of Q)
        assert ("barrier.cluster.arrive.relaxed" in split) == paired, shape
        # Q by TMA too: nine 64 x 64 boxes of a (row, column, request) view, into this CTA only
        q_boxes = re.findall(r"cp\.async\.bulk\.tensor\.3d\.[^ ]*", split)
        assert len(q_boxes) == 576 // 64 and not any("multicast" in b_ for b_ in q_boxes), (shape, q_boxes)
        # no cp.async at all (Q by TMA; KV by TMA or the fp8 producer's loads), and every load
        # completes on an mbarrier
        assert not re.search(r"cp\.async\.c[ag]\.", split) and "mbarrier.try_wait.parity" in split
        # the warpgroups hand P over through named barriers
        assert re.search(r"bar\.arrive\s+1, 256", split) and re.search(r"bar\.arrive\s+2, 256", split)
        # each warpgroup's P goes to smem with stmatrix (4 x4 instructions per 64 x 64 P)
        assert split.count("stmatrix.sync.aligned.m8n8.x4.shared.b16") == 2 * 4, shape
        assert "fence.proxy.async.shared::cta" in split
        # a split CTA (~217 KB of smem) leaves no room for a combine CTA: no early trigger
        assert "griddepcontrol.launch_dependents" not in split
        assert_one_split_writes_out(split)


SW128_SCRIPT = textwrap.dedent("""
    import json
    import cutlass, cutlass.cute as cute
    from cutlass.cute.nvgpu import warpgroup
    from tokenspeed_kernels_blackwell.mla_decode_kernel_v5_fp8 import (CHUNK, PRODUCER_THREADS, ROWS_PER_PASS,
                                                                        fp8_kv_copy, sw128_units)
    tv_idx, tile_idx, swz = {}, {}, {}
    @cute.jit
    def probe():  # static layouts evaluated at trace time; no control flow on their values here
        lay = cute.tile_to_shape(warpgroup.make_smem_layout_atom(warpgroup.SmemLayoutAtomKind.K_SW128,
                                                                 cutlass.BFloat16), (64, 576), (0, 1))
        swz.update(bits=lay.inner.num_bits, base=lay.inner.num_base, shift=lay.inner.num_shift)
        tv = fp8_kv_copy(cutlass.Float8E4M3FN).layout_tv_tiled
        for t in cutlass.range_constexpr(PRODUCER_THREADS):
            for v in cutlass.range_constexpr(16):
                tv_idx[t, v] = int(cute.crd2idx((t, v), tv))
        for r in cutlass.range_constexpr(64):
            for col in cutlass.range_constexpr(0, 576, 8):
                tile_idx[r, col] = int(cute.crd2idx((r, col), lay.outer))
    cute.compile(probe)
    mask = ((1 << swz["bits"]) - 1) << swz["base"]
    bad, checked = [], 0
    for t in range(PRODUCER_THREADS):
        for h in range(2):
            first = tv_idx[t, 8 * h]
            r0, col = first % ROWS_PER_PASS, first // ROWS_PER_PASS  # (32, 64) tile, column-major
            bad += [("not one row", t, h, v) for v in range(8) if tv_idx[t, 8 * h + v] != first + ROWS_PER_PASS * v]
            for p in range(64 // ROWS_PER_PASS):
                for c in range(576 // CHUNK):
                    x = tile_idx[r0 + ROWS_PER_PASS * p, col + CHUNK * c] * 2  # bytes, before the swizzle
                    want = x ^ ((x >> swz["shift"]) & mask)
                    got = (c * 512 + p * 256 + sw128_units(t, h)) * 16
                    checked += 1
                    if want != got:
                        bad.append((t, h, p, c, want, got))
    print(json.dumps({"checked": checked, "bad": bad[:5], "swz": swz}))
""")


def test_fp8_producer_stores_where_the_tma_boxes_would(tmp_path):
    """The see-saw kernel's fp8 producer stores each thread's 16-byte units at offsets it computes
    once (``sw128_units``) instead of through the DSL's swizzled tensor (which spilled). Checked
    here against the DSL's own layouts: the producer copy's (thread, value) -> tile coordinate, and
    the SW128 tile layout the wgmma reads (its outer layout, then its swizzle on byte addresses),
    for every thread, half, pass and chunk."""
    pytest.importorskip("cutlass", reason="nvidia-cutlass-dsl not installed")
    env = dict(os.environ, CUTE_DSL_ARCH="sm_90a",
               PYTHONPATH=os.pathsep.join([os.path.abspath(PKG_SRC), os.environ.get("PYTHONPATH", "")]))
    script = tmp_path / "sw128_probe.py"  # a file: the DSL reads a jit function's source
    script.write_text(SW128_SCRIPT)
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["checked"] == 128 * 2 * 2 * 9 and not res["bad"], res
    assert res["swz"] == {"bits": 3, "base": 4, "shift": 3}  # SW128: 16-byte units, 8 a row, XOR row % 8
