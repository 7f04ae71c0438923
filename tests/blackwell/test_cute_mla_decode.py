"""CuTe DSL mla_decode: registration without a GPU, and compilation for both targets on CPU.

CI installs the DSL for these (the rest of the suite does not need it):
    pip install nvidia-cutlass-dsl==4.8.1 apache-tvm-ffi==0.1.15.post2
Without it, the compile tests skip and the registration tests still run.
Each compile runs in a subprocess with CUTE_DSL_ARCH set explicitly (the DSL reads it once per
process; unset, it silently targets sm_100a) and also passes --gpu-arch; the test then checks the
target line of the PTX that the compile dumped, so a wrong-target build cannot pass.
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from cute_decode_ptx import COMPILE_SCRIPT, PKG_SRC, assert_one_split_writes_out, ptx_entries

import tokenspeed_core
from tokenspeed_core import Priority
from tokenspeed_kernels_blackwell import mla_decode as cute_mla
from tokenspeed_kernels_blackwell import plugin


def _registry():
    reg = tokenspeed_core.build_registry(entry_points=False)
    with reg.registering_as("cute"):
        plugin.tokenspeed_register_kernels(registry=reg)
    return reg


def _sig(reg, **case):
    spec = reg.spec("mla_decode")
    base = dict(B=2, q_len=1, H=16, page_size=64, seqlens=[70, 3], dtype=torch.bfloat16)
    args = spec.make_inputs({**base, **case}, torch.Generator().manual_seed(0), "cpu")
    call = spec.bind(args)
    return spec.signature(call, (9, 0))


def test_registration_without_gpu():
    reg = _registry()
    impls = {i.backend: i for i in reg.implementations("mla_decode")}
    sm90, sm100 = impls["cute"], impls["cute_sm100"]
    # below Triton where it is slower (docs/perf/cute.md, run 2): selected there only when forced
    assert sm90.priority < Priority.PORTABLE and sm90.capability == ((9, 0), (9, 0))
    assert sm90.unavailable == cute_mla.missing_dependency()
    assert sm100.unavailable and "compiled, not run on hardware" in sm100.status
    # on this CPU the reference is selected, and the cute entries say why they are not
    text = reg.explain("mla_decode", **reg.spec("mla_decode").make_inputs(
        dict(B=1, q_len=1, H=16, page_size=64, seqlens=[5], dtype=torch.bfloat16),
        torch.Generator().manual_seed(0), "cpu"))
    assert "cute" in text and "device cpu not in" in text


@pytest.mark.parametrize("case, needle", [
    (dict(), None),
    (dict(q_len=8, H=32, page_size=128), None),
    (dict(dtype=torch.float32), "q dtype"),
    (dict(cache_dtype=torch.float8_e4m3fn), None),  # v3 has an fp8 path
    (dict(page_size=32), "page size 32"),
    (dict(page_size=96), "page size 96"),
    (dict(D=128, Dv=64), "head dims"),
    (dict(q_len=9, seqlens=[70, 9]), "q_len 9"),
    (dict(H=256), "256 heads"),
])
def test_supports_explains_every_rejection(case, needle):
    reason = cute_mla.supports(_sig(_registry(), **case))
    if needle is None:
        assert reason is None
    else:
        assert reason and needle in reason, reason


def test_fp8_cache_only_where_the_variant_has_a_path():
    sig = _sig(_registry(), cache_dtype=torch.float8_e4m3fn)
    assert cute_mla.supports_for("v3")(sig) is None and cute_mla.supports_for("v4")(sig) is None
    reason = cute_mla.supports_for(cute_mla.SM100_VARIANT)(sig)
    assert reason and "fp8" in reason and cute_mla.SM100_VARIANT in reason, reason
    with pytest.raises(ValueError, match="no fp8 cache path"):
        cute_mla.compile_kernel("sm_100a", torch.bfloat16, 16, 1, 64, variant=cute_mla.SM100_VARIANT,
                                kv_dtype=torch.float8_e4m3fn)


def test_num_splits_v2_fills_whole_waves():
    sms = 132
    for batch, m_blocks in [(1, 1), (4, 1), (8, 1), (16, 1), (16, 2), (64, 1), (128, 1), (64, 8), (3, 1)]:
        s = cute_mla.num_splits_v2(batch, m_blocks, 65536, sms)
        ctas = batch * m_blocks * s
        waves = -(-ctas // sms)
        # >= 90% of the last wave busy, and at least ~one wave of CTAs
        assert ctas / (waves * sms) >= 0.9 and ctas >= 0.9 * sms, (batch, m_blocks, s)
    assert cute_mla.num_splits_v2(64, 1, 65536, sms) == 2  # ceil(sms / ctas) gives 3: 1.45 waves
    assert cute_mla.num_splits_v2(1, 1, 32 * 3, sms) == 3  # never more splits than 32-row tiles
    assert cute_mla.num_splits_v2(512, 1, 65536, sms) == 1


def test_num_splits_one_wave_fills_the_wave_with_equal_splits():
    sms = 132
    for batch in (1, 2, 3, 4, 8, 16, 33, 64, 70, 128, 300):
        for m_blocks in (1, 2, 8):
            for rows in (64, 64 * 3, 100, 16384, 65536, 81920, 131072):
                s = cute_mla.num_splits_one_wave(batch, m_blocks, rows, sms)
                v2 = cute_mla.num_splits_v2(batch, m_blocks, rows, sms, 64)
                tiles = -(-rows // 64)
                per = -(-tiles // s)
                assert 1 <= s <= min(tiles, cute_mla.MAX_KV_SPLITS)
                assert per * (s - 1) < tiles, "a split of the longest request would be empty"
                if batch * m_blocks * v2 <= sms:  # one wave: fill it, never pass it
                    assert v2 <= s and batch * m_blocks * s <= sms, (batch, m_blocks, rows, s, v2)
                    # no more splits than the longest split needs
                    assert -(-tiles // (s - 1 or 1)) > per or s == 1
                else:
                    assert s == v2
    assert cute_mla.num_splits_one_wave(1, 1, 16384, sms) == 128  # 2 tiles each; v2's rule: 119
    assert cute_mla.num_splits_one_wave(1, 2, 65536, sms) == 64


def test_seesaw_splits_keep_two_steps_while_half_the_wave_is_busy():
    pytest.importorskip("cutlass", reason="nvidia-cutlass-dsl not installed")
    sms, bf16, fp8 = 132, torch.bfloat16, torch.float8_e4m3fn
    # b = 1, H 128: 64 splits of 4 tiles (two 2-tile steps) 26.3 µs, 32 of 8 29.0 µs at 16K (H100,
    # run 39); at 64K 16 tiles each fill the wave; at 4K not below half the wave
    assert cute_mla.split_count("v5", 1, 128, 16384, sms, bf16) == 64
    assert cute_mla.split_count("v5", 1, 128, 65536, sms, bf16) == 64
    assert cute_mla.split_count("v5", 1, 128, 4096, sms, bf16) == 32
    assert cute_mla.split_count("v5", 1, 512, 4096, sms, bf16) == 16  # 8 m-blocks: 16 splits of 4 tiles
    # 33-64 rows run the see-saw kernel too (one m-block): never under two steps a split; an fp8
    # cache runs the see-saw kernel as well (its producer converts) and splits the same way
    assert cute_mla.split_count("v5", 1, 64, 16384, sms, bf16) == 64
    assert cute_mla.split_count("v5", 1, 64, 16384, sms, fp8) == 64
    assert cute_mla.split_count("v5", 1, 128, 4096, sms, fp8) == 32
    # elsewhere the wave-filling rule as before: <= 32 rows (v4), v3
    assert cute_mla.split_count("v5", 1, 16, 16384, sms, bf16) == 128
    assert cute_mla.split_count("v3", 1, 64, 16384, sms, bf16) == 128
    assert cute_mla.split_count("v3", 1, 128, 4096, sms, fp8) == 64
    for b, m, rows in ((16, 128, 16384), (4, 128, 81920), (64, 512, 16384), (16, 64, 4096)):  # past one wave
        assert cute_mla.split_count("v5", b, m, rows, sms, bf16) == cute_mla.split_count("v3", b, m, rows, sms, bf16)


def test_fp8_rows_on_m_splits_count_two_ctas_an_sm_where_splits_are_long():
    pytest.importorskip("cutlass", reason="nvidia-cutlass-dsl not installed")
    sms, bf16, fp8 = 132, torch.bfloat16, torch.float8_e4m3fn
    # v4 with an fp8 cache fits two CTAs an SM: where one-an-SM splits would stream >= 16 tiles,
    # twice the CTAs (H200, run 48: 1.09-1.24x faster); a 16-bit cache (two tile slots) keeps one
    for b, m, rows, one, two in ((64, 16, 16384, 2, 4), (16, 16, 65536, 8, 16), (128, 16, 65536, 1, 2),
                                 (4, 16, 81920, 33, 64), (64, 32, 16384, 2, 4), (128, 32, 4096, 1, 2)):
        for variant in ("v4", "v5"):
            assert cute_mla.split_count(variant, b, m, rows, sms, bf16) == one, (b, m, rows)
            assert cute_mla.split_count(variant, b, m, rows, sms, fp8) == two, (b, m, rows)
    # shorter splits stay at one CTA an SM (b = 1: 128 splits of 8 tiles beat 256 of 4)
    for rows in (4096, 16384, 65536):
        assert cute_mla.split_count("v5", 1, 16, rows, sms, fp8) == cute_mla.split_count("v5", 1, 16, rows, sms, bf16)
    # above 32 rows an fp8 cache runs the see-saw kernel: one CTA an SM, as a 16-bit cache
    assert cute_mla.split_count("v5", 64, 64, 16384, sms, fp8) == cute_mla.split_count("v5", 64, 64, 16384, sms, bf16)


def test_split_bound_matches_the_combine():
    pytest.importorskip("cutlass", reason="nvidia-cutlass-dsl not installed")
    from tokenspeed_kernels_blackwell import mla_decode_combine

    assert cute_mla.MAX_KV_SPLITS == mla_decode_combine.MAX_SPLITS


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_partials_are_in_the_output_dtype_and_absent_with_one_split(dtype):
    # several splits: a partial O per (request, split, folded row) in the output's dtype, fp32 LSE
    o_part, lse_part = cute_mla.partial_buffers(3, 5, 64, 512, dtype, "cpu", "v5")
    assert (o_part.shape, o_part.dtype) == ((3, 5, 64, 512), dtype)
    assert (lse_part.shape, lse_part.dtype) == ((3, 5, 64), torch.float32)
    # one split: the sm_90a kernels write out / lse themselves, so a one-request placeholder
    # stands in for a batch of any size, made once
    for variant in cute_mla.VARIANTS:
        o1, l1 = cute_mla.partial_buffers(128, 1, 512, 512, dtype, "cpu", variant)
        assert o1.shape == (1, 1, 512, 512) and l1.shape == (1, 1, 512) and o1.dtype == dtype
        assert cute_mla.partial_buffers(7, 1, 512, 512, dtype, "cpu", variant)[0] is o1
    # the sm_100a kernel always leaves out and lse to the combine: its partials are real
    o_sm100, _ = cute_mla.partial_buffers(4, 1, 128, 512, dtype, "cpu", cute_mla.SM100_VARIANT)
    assert o_sm100.shape == (4, 1, 128, 512)


def test_a_misaligned_cache_is_refused_by_name():
    """The kernels move the cache 16 bytes at a time (TMA boxes, cp.async): a cache view at an odd
    element offset is refused with its name before anything is launched (q and out at such
    offsets go through aligned copies instead)."""
    flat = torch.randn(2 * 64 * 576 + 1, dtype=torch.bfloat16)
    cache = flat[1:].view(2, 64, 576)  # data pointer 2 bytes past an aligned one
    assert cache.data_ptr() % cute_mla.ALIGN != 0
    q = torch.randn(1, 1, 16, 576, dtype=torch.bfloat16)
    table = torch.zeros(1, 2, dtype=torch.int32)
    lens = torch.tensor([100], dtype=torch.int32)
    out, lse = torch.empty(1, 1, 16, 512, dtype=torch.bfloat16), torch.empty(1, 1, 16)
    with pytest.raises(ValueError, match="kv_cache.*16-byte aligned"):
        cute_mla.mla_decode(q, cache, table, lens, out, lse, 0.07)


@pytest.mark.parametrize("scale", [0.07, 2.5, -0.07, -3.0, 0.0])
def test_positive_scale_log2_keeps_the_softmax_of_the_ffma_form(scale):
    """The see-saw and prefill kernels take the row max over the raw scores and compute
    exp2(score x s - max x s), right only for s > 0; ``positive_scale_log2`` must hand them an
    (q', s) whose softmax (in that form, with masked scores at -inf) equals the op's for any scale,
    zero included (uniform weights; 0 x -inf would be NaN)."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(4, 64, dtype=torch.float64, generator=gen)
    k = torch.randn(37, 64, dtype=torch.float64, generator=gen)
    mask = torch.arange(37)[None, :] > torch.tensor([36, 20, 5, 0])[:, None]  # causal-like, row 3 sees one key
    ref = torch.softmax((q @ k.T * scale).masked_fill(mask, float("-inf")), dim=-1)
    q2, s = cute_mla.positive_scale_log2(q, scale)
    assert s > 0
    raw = (q2 @ k.T).float().masked_fill(mask, float("-inf"))  # fp32, as the kernels hold S
    m = raw.max(dim=-1, keepdim=True).values * s
    p = torch.exp2(torch.addcmul(-m, raw, torch.tensor(s, dtype=torch.float32)))  # one FFMA a score
    got = p / p.sum(dim=-1, keepdim=True)
    assert not got.isnan().any()
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif("TOKENSPEED_CUTE_MLA_VARIANT" in os.environ, reason="variant forced")
def test_default_variant_ranks_above_triton_where_it_measured_faster():
    reg = _registry()
    spec = reg.spec("mla_decode")
    sm90 = reg.backend("mla_decode", "cute")
    assert cute_mla.DEFAULT_VARIANT == "v5" and "v5" in sm90.status
    # v3/v4/v5 beat Triton on every measured row (docs/perf/cute.md, runs 3-11): preferred everywhere
    for case in [dict(q_len=1, H=16), dict(q_len=2, H=16), dict(q_len=4, H=16), dict(q_len=1, H=128),
                 dict(q_len=1, H=64), dict(q_len=8, H=128)]:
        assert sm90.priority_for(_sig(reg, **case)) == Priority.SPECIALISED, case
    # on a CUDA device of capability 9.0 this is what selection would pick
    sig = _sig(reg, q_len=4, H=16)
    assert spec is not None and sm90.reject_reason(sig, spec.primary) in (None, "device cpu not in ['cuda']")


def test_rank_follows_the_measured_win_threshold(monkeypatch):
    reg = _registry()
    # a variant that lost the rows with 16 folded rows (as v2 did, docs/perf/cute.md run 2)
    monkeypatch.setitem(cute_mla.WINS_FROM_ROWS, cute_mla.DEFAULT_VARIANT, 64)
    rank = cute_mla.rank_for(Priority.PORTABLE - 10, Priority.SPECIALISED)
    for case, faster in [(dict(q_len=1, H=16), False), (dict(q_len=2, H=16), False),
                         (dict(q_len=4, H=16), True), (dict(q_len=1, H=128), True)]:
        assert (rank(_sig(reg, **case)) == Priority.SPECIALISED) == faster, case
    monkeypatch.setitem(cute_mla.WINS_FROM_ROWS, cute_mla.DEFAULT_VARIANT, None)  # slower everywhere: no rank
    assert cute_mla.rank_for(Priority.PORTABLE - 10, Priority.SPECIALISED) is None


def test_variant_switch():
    # every wgmma variant passed the full conformance grid on hardware; v5 is the fastest
    assert cute_mla.DEFAULT_VARIANT == os.environ.get("TOKENSPEED_CUTE_MLA_VARIANT", "v5")
    assert set(cute_mla.VARIANTS) == set(cute_mla.WINS_FROM_ROWS)
    assert set(cute_mla.VARIANTS) == {"v3", "v4", "v5"}
    assert cute_mla.make_mla_decode("v3").__name__ == "mla_decode_v3"
    with pytest.raises(ValueError, match="unknown variant"):
        cute_mla.make_mla_decode("v9")
    with pytest.raises(ValueError, match="unknown variant"):
        cute_mla.compile_kernel("sm_90a", torch.bfloat16, 16, 1, 64, variant="nope")
    with pytest.raises(ValueError, match="wgmma, which sm_100a does not have"):
        cute_mla.compile_kernel("sm_100a", torch.bfloat16, 16, 1, 64, variant="v4")
    with pytest.raises(ValueError, match="tcgen05, which sm_90a does not have"):
        cute_mla.compile_kernel("sm_90a", torch.bfloat16, 16, 1, 64, variant=cute_mla.SM100_VARIANT)


# -- compilation without a GPU -------------------------------------------------------------------
# sm_90a (wgmma): the classes that matter (H 16 / 128, q_len 1 / 4, page 64 / 128), fp16 and fp8
# once each. sm_100a/sm_103a: tests/blackwell/test_cute_sm100.py.
SHAPES_V3 = [
    ("bfloat16", 16, 1, 64, "v3"), ("bfloat16", 128, 4, 128, "v3"), ("float16", 32, 3, 64, "v3"),
    ("bfloat16", 16, 4, 64, "v3", "float8_e4m3fn"), ("float16", 32, 1, 64, "v3", "float8_e4m3fn"),
]

SHAPES_V4 = [  # (dtype, H, q_len, page size, variant, cache dtype): the few-rows kernel's classes
    ("bfloat16", 16, 1, 64, "v4"), ("float16", 32, 1, 128, "v4"), ("bfloat16", 8, 3, 64, "v4"),
    ("bfloat16", 16, 1, 64, "v4", "float8_e4m3fn"),
    # the larger fp8 class: its compile checks that two CTAs still fit an SM (the split rule's premise)
    ("bfloat16", 32, 1, 64, "v4", "float8_e4m3fn"),
]


def test_v4_puts_kv_rows_on_the_mma_m_axis(tmp_path):
    pytest.importorskip("cutlass", reason="nvidia-cutlass-dsl not installed")
    pytest.importorskip("tvm_ffi", reason="apache-tvm-ffi not installed")
    env = dict(os.environ, CUTE_DSL_ARCH="sm_90a", CUTE_DSL_KEEP="ptx",
               PYTHONPATH=os.pathsep.join([os.path.abspath(PKG_SRC), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT, json.dumps(SHAPES_V4)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ptx = sorted(glob.glob(str(tmp_path / "*.ptx")))
    assert len(ptx) == len(SHAPES_V4), [os.path.basename(p)[-40:] for p in ptx]
    widths = set()
    for p in ptx:
        text = open(p).read()
        split, combine = ptx_entries(text)
        assert "attention_kernel_v4" in split[:80], p
        mmas = re.findall(r"wgmma\.mma_async\.sync\.aligned\.m64n(\d+)k16[^;]*p, 1,  1, ([01]), ([01]);", split)
        assert mmas, p
        assert len({w for w, _, _ in mmas}) == 1, "one N for both products"
        widths.add(int(mmas[0][0]))
        # S^T = K Q^T: 36 k-steps, nothing transposed; O^T += V^T P^T: 8 Dv blocks x 4 k-steps,
        # V^T read MN-major from the KV tile (the A-transpose bit)
        assert sum(1 for _, ta, tb in mmas if (ta, tb) == ("0", "0")) == 576 // 16, p
        assert sum(1 for _, ta, tb in mmas if (ta, tb) == ("1", "0")) == 8 * 4, p
        fp8 = "Float8E4M3FN" in os.path.basename(p)
        assert ("cvt.rn.f16x2.e4m3x2" in text) == fp8, p
        # fp8: one thread asks L2 for the tile after the one in flight to registers, in the loop
        assert split.count("cp.async.bulk.prefetch.L2.global") == (1 if fp8 else 0), p
        # the combine may be scheduled once the split loop is done (a combine CTA fits beside)
        assert "griddepcontrol.launch_dependents" in split and all("griddepcontrol.wait" in c for c in combine)
        # O^T leaves through smem as O's rows (the epilogue of v3 / v5, over all of Dv): 16-byte
        # stores for the M real rows only (the row of each store is known at compile time
        # here: padding rows have none), 2 + 2 bytes a column
        n_rows = int(mmas[0][0])
        v4_stores = split.count("st.global.v4.b32")
        assert v4_stores % 2 == 0 and 8 <= v4_stores <= n_rows, (p, v4_stores)
        assert_one_split_writes_out(split, rows=v4_stores, cols=512, lse_stores=v4_stores // 2)
    assert widths == {16, 32}  # no padding of the query rows to 64


def test_v3_compiles_for_sm90a_with_wgmma(tmp_path):
    pytest.importorskip("cutlass", reason="nvidia-cutlass-dsl not installed")
    pytest.importorskip("tvm_ffi", reason="apache-tvm-ffi not installed")
    variant, shapes = "v3", SHAPES_V3
    env = dict(os.environ, CUTE_DSL_ARCH="sm_90a", CUTE_DSL_KEEP="ptx",
               PYTHONPATH=os.pathsep.join([os.path.abspath(PKG_SRC), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT, json.dumps(shapes)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ptx = glob.glob(str(tmp_path / "*.ptx"))
    assert len(ptx) == len(shapes), [os.path.basename(p)[-40:] for p in ptx]
    n = cute_mla.VARIANTS[variant]["block_n"]
    s_n = n // 2  # v3: each warpgroup computes half of S's columns
    for p in ptx:
        text = open(p).read()
        assert ".target sm_90a" in text, p
        assert "mma.sync" not in text, "must not fall back to warp-level MMA"
        # S = Q K^T: D / 16 = 36 k-steps of m64 n<block_n>; O += P V: m64 n256 (half of Dv per
        # warpgroup), block_n / 16 k-steps
        assert text.count(f"wgmma.mma_async.sync.aligned.m64n{s_n}k16") == 576 // 16, p
        assert text.count("wgmma.mma_async.sync.aligned.m64n256k16") == n // 16, p
        # cp.async writes must be made visible to the tensor cores' async proxy
        assert "fence.proxy.async.shared::cta" in text, p
        # an fp8 cache is staged as fp8 and converted once per tile (e4m3 pairs -> 16-bit)
        assert ("cvt.rn.f16x2.e4m3x2" in text) == ("Float8E4M3FN" in os.path.basename(p)), p
        # the combine's builds, over 16-bit partials. Many splits: a CTA per (row, 128 columns),
        # per split one 8-byte O load (4 columns) and one LSE load, in batches of 4, 8 splits a
        # warp and rounds of `combine_batch`, warps merged through smem. Up to 8 / 4 / 2 splits:
        # a warp per row, all of Dv (2 x 16 bytes a lane) of every split loaded at once, one LSE
        # load a lane, 16-bit results 8 to a store, no smem.
        split, (batched, *rows) = ptx_entries(text)
        loads = 4 + 8 + cute_mla.VARIANTS[variant]["combine_batch"]
        o_loads = batched.count("ld.global.v2.b32") + batched.count("ld.global.v4.b16")
        assert o_loads == loads and batched.count("ld.global.b32") == loads, variant
        assert "ld.global.v4.b32" not in batched and "ld.global.f32" not in batched, variant  # no fp32 partials
        assert "st.shared" in batched and "bar.sync" in batched, variant
        for combine, n_splits in zip(rows, (8, 4, 2), strict=True):
            assert combine.count("ld.global.v4.b32") == 2 * n_splits and combine.count("ld.global.b32") == 1, variant
            assert combine.count("st.global.v4.b32") == 2 and "st.shared" not in combine, variant
        # the combine is a programmatic dependent launch: it must wait for the split grid
        assert all("griddepcontrol.wait" in c for c in [batched, *rows]), variant
        # v3's split CTAs leave no room for a combine CTA: an early trigger would crowd it
        assert "griddepcontrol.launch_dependents" not in split, variant
        assert_one_split_writes_out(split)


PROBE_SCRIPT = textwrap.dedent("""
    import torch
    from tokenspeed_kernels_blackwell import mla_decode as cm
    from tokenspeed_kernels_blackwell import mla_decode_kernel as mk
    mk.MlaDecodeSplitKV.stamp_addr = 0x7F0000000000  # any device address: nothing runs here
    for h, q, variant in ((128, 1, "v5"), (16, 4, "v3"), (16, 1, "v5")):  # see-saw kernel, v3, v4
        cm._compile("sm_90a", torch.bfloat16, h, q, 576, 512, 64, variant, torch.bfloat16)
""")


def test_timing_probe_is_compiled_only_when_asked(tmp_path):
    """bench/gpu_cute_stamps.py's probe (``stamp_addr``): every stamp point of v5 (10: entry,
    setup, producer start / done, Q, first S, loop end, epilogue sums, stored, exit), v3 and v4
    (7 each) writes %globaltimer once, the entry stamp the SM id too, and v5 its wait records; the
    production builds (the other PTX tests, ``assert_one_split_writes_out``) have none of it."""
    pytest.importorskip("cutlass", reason="nvidia-cutlass-dsl not installed")
    pytest.importorskip("tvm_ffi", reason="apache-tvm-ffi not installed")
    env = dict(os.environ, CUTE_DSL_ARCH="sm_90a", CUTE_DSL_KEEP="ptx", TOKENSPEED_CUTE_CACHE="0",
               PYTHONPATH=os.pathsep.join([os.path.abspath(PKG_SRC), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", PROBE_SCRIPT], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    stamps = {}
    for p in glob.glob(str(tmp_path / "*.ptx")):
        split, _ = ptx_entries(open(p).read())
        kernel = re.search(r"attention_kernel_(v\d)", split[:80]).group(1)
        stamps[kernel] = (split.count("mov.u64 ts, %globaltimer"), split.count("mov.u32 sm, %smid"),
                          split.count("st.global.v4.u32"), "%clock;" in split)
    # v5 also writes three wait records (each math warpgroup's, the producer's), timed by %clock
    assert stamps == {"v5": (10, 1, 3, True), "v3": (7, 1, 0, False), "v4": (7, 1, 0, False)}, stamps


def test_stamps_script_reads_the_records_back():
    """bench/gpu_cute_stamps.py's analysis of a probed call (CPU, synthetic records): phases from
    the stamps at the SM clock their (globaltimer, clock) pairs imply, and the wait records' four
    32-bit sums unpacked per warpgroup and for the producer."""
    pytest.importorskip("cutlass", reason="nvidia-cutlass-dsl not installed")
    import importlib.util

    from tokenspeed_kernels_blackwell import mla_decode_kernel as mk

    path = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "gpu_cute_stamps.py")
    spec = importlib.util.spec_from_file_location("gpu_cute_stamps", path)
    stamps = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stamps)
    n = 3
    rec = torch.zeros((n, mk.STAMP_SLOTS, 2), dtype=torch.int64)
    for c in range(n):
        for k, slot in enumerate((mk.STAMP_ENTRY, mk.STAMP_SETUP, mk.STAMP_Q, mk.STAMP_FIRST_S,
                                  mk.STAMP_LOOP_END, mk.STAMP_EPI_SYNC, mk.STAMP_STORED, mk.STAMP_EXIT)):
            rec[c, slot] = torch.tensor([10_000 + 1000 * k, 50_000 + 2000 * k])  # ns, cycles: 2 GHz
        rec[c, mk.STAMP_WAITS] = torch.tensor([100 + (200 << 32), 300])  # WG0: landed, other, MMAs
        rec[c, mk.STAMP_WAITS + 1] = torch.tensor([400, 0])
        rec[c, mk.STAMP_WAITS + 2] = torch.tensor([4000, 0])  # the producer's waits for "freed"
    out = stamps.analyse(rec, torch.tensor([[9_000, 0], [20_000, 0]]), n)
    assert out["sm_clock_mhz"] == 2000.0 and out["launch_gap_us"] == 1.0
    assert out["phases_us"]["first S -> loop end"] == {"p50": 1.0, "p90": 1.0}
    waits = out["loop_waits_us"]
    assert waits["WG0 waits for KV landed"]["p50"] == 0.05  # 100 cycles at 2 GHz
    assert waits["WG0 waits for other warpgroup"]["p50"] == 0.1
    assert waits["WG0 waits for own MMAs"]["p50"] == 0.15
    assert waits["WG1 waits for KV landed"]["p50"] == 0.2 and waits["WG1 waits for own MMAs"]["p50"] == 0.0
    assert waits["producer waits for KV freed"]["p50"] == 2.0


ALL_CLASSES_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from tokenspeed_kernels_blackwell import mla_decode as cm
    n = 0
    for arch, dtype, h, q_len, ps, cache in json.loads(sys.argv[1]):
        variant = cm.DEFAULT_VARIANT if arch == "sm_90a" else cm.SM100_VARIANT
        kv = getattr(torch, cache or dtype)
        # compile_kernel sets CUTE_DSL_ARCH and --gpu-arch per compile: one process serves both
        cm.compile_kernel(arch, getattr(torch, dtype), h, q_len, ps, variant=variant, kv_dtype=kv)
        n += 1
    print(n)
""")


def _compile_cost(arch: str, h: int, q_len: int, cache) -> float:
    """Rough seconds a compile of this class takes on a CI core (measured on a 2-core machine):
    the see-saw kernel (> 32 rows) ~6, v4 ~3, sm_100a ~2."""
    if arch != "sm_90a":
        return 2.0
    if h * q_len <= cute_mla.SEESAW_FROM_ROWS:  # v4 below the see-saw kernel's rows
        return 3.0
    return 6.0


def test_every_advertised_shape_class_compiles_for_both_targets(tmp_path):
    """Issue 5: every shape class the registry advertises compiles for both targets in CI, so a
    compile break of any of them fails CI: sm_90a (the registered variant, 16-bit and fp8 caches:
    128 kernels) and sm_100a (tcgen05, 16-bit caches: 64). The 192 compiles are shared between two
    processes by their expected cost (one process per target left a core idle for ~4 of ~9.5
    minutes: the sm_90a builds cost ~4x the sm_100a ones)."""
    pytest.importorskip("cutlass", reason="nvidia-cutlass-dsl not installed")
    pytest.importorskip("tvm_ffi", reason="apache-tvm-ffi not installed")
    jobs = [(arch, str(dtype).removeprefix("torch."), h, q_len, ps, cache)
            for arch, caches in (("sm_90a", (None, "float8_e4m3fn")), ("sm_100a", (None,)))
            for dtype, h, q_len, ps in cute_mla.shape_classes() for cache in caches]
    assert sum(j[0] == "sm_90a" for j in jobs) == 128 and sum(j[0] == "sm_100a" for j in jobs) == 64
    workers, load = ([], []), [0.0, 0.0]
    for job in sorted(jobs, key=lambda j: -_compile_cost(j[0], j[2], j[3], j[5])):  # longest first
        w = load.index(min(load))
        workers[w].append(job)
        load[w] += _compile_cost(job[0], job[2], job[3], job[5])
    env = dict(os.environ, CUTE_DSL_ARCH="sm_90a", TOKENSPEED_CUTE_CACHE="0",
               PYTHONPATH=os.pathsep.join([os.path.abspath(PKG_SRC), os.environ.get("PYTHONPATH", "")]))
    env.pop("CUTE_DSL_KEEP", None)
    procs = [subprocess.Popen([sys.executable, "-c", ALL_CLASSES_SCRIPT, json.dumps(share)], cwd=tmp_path,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for share in workers]
    for share, proc in zip(workers, procs, strict=True):
        out, err = proc.communicate(timeout=1200)
        assert proc.returncode == 0, err[-4000:]
        assert int(out.split()[-1]) == len(share), out
