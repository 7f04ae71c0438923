"""CuTe DSL mla_prefill (sm_90a): registration, requirements, the tiling's index math, and the
compiled PTX, all without a GPU. On hardware it is checked by bench/gpu_cute_prefill.py (float64
reference on awkward shapes, the conformance kit's full grid, graph replay, timings).

The compile runs in a subprocess with CUTE_DSL_ARCH set explicitly (read once per process;
unset, the DSL targets sm_100a) and CUTE_DSL_KEEP=ptx; the test reads the dumped PTX.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import tokenspeed_core
from tokenspeed_core.ops import mla_prefill as op
from tokenspeed_kernels_blackwell import mla_prefill as cute_prefill
from tokenspeed_kernels_blackwell import plugin

PKG_SRC = os.path.join(os.path.dirname(__file__), "..", "..", "tokenspeed_kernels_blackwell", "src")


def _registry():
    reg = tokenspeed_core.build_registry(entry_points=False)
    with reg.registering_as("cute"):
        plugin.tokenspeed_register_kernels(registry=reg)
    return reg


def _sig(**case):
    spec = op.SPEC
    base = dict(H=16, q_lens=[5, 9], prefixes=[0, 3], dtype=torch.bfloat16)
    call = spec.bind(spec.make_inputs({**base, **case}, torch.Generator().manual_seed(0), "cpu"))
    return spec.signature(call, (9, 0))


def test_registered_above_triton_on_sm90_once_measured():
    # passed the conformance kit on an H200 and beat Triton on every measured row (docs/perf/cute.md,
    # runs P1-P2): SPECIALISED, and unavailable only for a missing dependency
    reg = _registry()
    impl = reg.backend("mla_prefill", "cute")
    assert impl.capability == ((9, 0), (9, 0)) and "conformance passed on an H200" in impl.status
    assert impl.unavailable == cute_prefill.missing_dependency()
    assert impl.priority == tokenspeed_core.Priority.SPECIALISED > tokenspeed_core.Priority.PORTABLE
    sig = _sig()
    spec = reg.spec("mla_prefill")
    # on a CUDA device of capability 9.0 nothing else stands in its way (here: the device is a CPU)
    assert impl.reject_reason(sig, spec.primary) in (None, "device cpu not in ['cuda']", impl.unavailable)
    # on another capability the registry says why it is not a candidate
    assert impl.reject_reason(spec.signature(spec.bind(spec.make_inputs(
        dict(H=16, q_lens=[5], prefixes=[0], dtype=torch.bfloat16), torch.Generator().manual_seed(0), "cpu")),
        (10, 0)), spec.primary)


@pytest.mark.parametrize("case, needle", [
    (dict(), None),
    (dict(dtype=torch.float16, H=128), None),
    (dict(dtype=torch.float32), "q dtype"),
    (dict(Dqk=48, Dv=32), "Dqk=48 (q, k)"),
    (dict(Dqk=192, Dv=64), "Dv=64 (v)"),
])
def test_supports_names_what_it_rejects(case, needle):
    reason = cute_prefill.supports(_sig(**case))
    assert (reason is None) if needle is None else (reason and needle in reason), reason


def _args(T=10, Tkv=12, H=2):
    q = torch.randn(T, H, 192, dtype=torch.bfloat16)
    k = torch.randn(Tkv, H, 192, dtype=torch.bfloat16)
    v = torch.randn(Tkv, H, 128, dtype=torch.bfloat16)
    cu_q = torch.tensor([0, 4, T], dtype=torch.int32)
    cu_kv = torch.tensor([0, 5, Tkv], dtype=torch.int32)
    return dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_kv=cu_kv,
                out=torch.empty(T, H, 128, dtype=torch.bfloat16), lse=torch.empty(T, H))


def test_launcher_refuses_what_tma_cannot_read_by_name():
    cute_prefill.check_tensors(**_args())  # the ordinary case passes
    a = _args()
    flat = torch.randn(10 * 2 * 192 + 1, dtype=torch.bfloat16)
    a["q"] = flat[1:].view(10, 2, 192)  # 2 bytes past an aligned pointer
    with pytest.raises(ValueError, match=r"^q: TMA needs a 16-byte aligned"):
        cute_prefill.check_tensors(**a)
    a = _args()
    a["k"] = torch.randn(12, 192, 2, dtype=torch.bfloat16).transpose(1, 2)
    with pytest.raises(ValueError, match=r"^k: the last dim must be contiguous"):
        cute_prefill.check_tensors(**a)
    a = _args()
    a["v"] = torch.randn(2, 12, 128, dtype=torch.bfloat16).transpose(0, 1)
    with pytest.raises(ValueError, match=r"^v: expected a contiguous"):
        cute_prefill.check_tensors(**a)
    a = _args()
    a["cu_seqlens_kv"] = a["cu_seqlens_kv"].long()
    with pytest.raises(ValueError, match=r"^cu_seqlens_kv: expected a contiguous int32"):
        cute_prefill.check_tensors(**a)
    with pytest.raises(ValueError, match="sm_100a does not have"):
        cute_prefill.compile_kernel("sm_100a", torch.bfloat16, 16)


# -- the tiling's index math, mirrored in Python ---------------------------------------------------
BM = BN = 128


def emulate(q, k, v, cu_q, cu_kv, scale):
    """The kernel's schedule in float64: grid T // 128 + B, the device binary search, the tile
    loop with n_full / n_tiles, the single mask bound, the finite initial max. Mirrors
    mla_prefill_kernel_sm90 line by line where it decides which rows and columns count."""
    T, H, _ = q.shape
    B = len(cu_q) - 1
    out = torch.full((T, H, 128), float("nan"), dtype=torch.float64)
    lse = torch.full((T, H), float("nan"), dtype=torch.float64)
    grid, steps = T // BM + B, B.bit_length() + 1
    done = set()
    for bx in range(grid):
        pid = grid - 1 - bx
        lo, hi = 0, B - 1
        for _ in range(steps):
            mid = (lo + hi + 1) // 2
            if cu_q[mid] // BM + mid <= pid:
                lo = mid
            else:
                hi = mid - 1
        b = lo
        q_start, q_len = cu_q[b], cu_q[b + 1] - cu_q[b]
        kv_start, kv_len = cu_kv[b], cu_kv[b + 1] - cu_kv[b]
        prefix = kv_len - q_len
        q_row0 = (pid - (q_start // BM + b)) * BM
        if q_row0 >= q_len:
            continue
        assert (b, q_row0) not in done
        done.add((b, q_row0))
        q_pos0 = prefix + q_row0
        n_tiles = (min(kv_len, q_pos0 + BM) + BN - 1) // BN
        n_full = (q_pos0 + 1) // BN
        qi = torch.arange(q_row0, q_row0 + BM)
        limit = torch.minimum(prefix + qi, torch.tensor(kv_len - 1))
        rows = (q_start + qi).clamp(max=T - 1)  # rows past the tensor: TMA zeros (any values do)
        qt = torch.where((q_start + qi < T)[:, None, None], q[rows], 0.0)
        for h in range(H):
            m = torch.full((BM,), -1.0e30, dtype=torch.float64)
            s_sum = torch.zeros(BM, dtype=torch.float64)
            o = torch.zeros(BM, 128, dtype=torch.float64)
            for j in range(n_tiles):
                cols = torch.arange(j * BN, (j + 1) * BN)
                kr = kv_start + cols
                ok = kr < k.shape[0]
                kt = torch.where(ok[:, None], k[kr.clamp(max=k.shape[0] - 1), h], 0.0)
                vt = torch.where(ok[:, None], v[kr.clamp(max=k.shape[0] - 1), h], 0.0)
                s = (qt[:, h] @ kt.T) * scale * math.log2(math.e)
                if j >= n_full:
                    s = s.masked_fill(cols[None, :] > limit[:, None], float("-inf"))
                else:
                    assert not (cols[None, :] > limit[:, None]).any(), "a tile without the mask needs one"
                m_new = torch.maximum(m, s.max(1).values)
                f = torch.exp2(m - m_new)
                p = torch.exp2(s - m_new[:, None])
                s_sum = s_sum * f + p.sum(1)
                o = o * f[:, None] + p @ vt
                m = m_new
            valid = qi < q_len
            out[q_start + qi[valid], h] = (o / s_sum[:, None])[valid]
            lse[q_start + qi[valid], h] = ((m + torch.log2(s_sum)) * math.log(2))[valid]
    return out, lse


@pytest.mark.parametrize("q_lens, prefixes", [
    ([1], [0]), ([130, 0, 1, 300], [0, 64, 200, 129]), ([257], [127]), ([128, 128], [0, 128]),
])
def test_schedule_and_masks_match_the_reference(q_lens, prefixes):
    case = dict(H=2, q_lens=q_lens, prefixes=prefixes, dtype=torch.float64)
    a = op.make_inputs(case, torch.Generator().manual_seed(1), "cpu")
    cu_q, cu_kv = a["cu_seqlens_q"].tolist(), a["cu_seqlens_kv"].tolist()
    out, lse = emulate(a["q"], a["k"], a["v"], cu_q, cu_kv, a["softmax_scale"])
    T, H = a["q"].shape[:2]
    ro, rl = torch.empty(T, H, 128, dtype=torch.float64), torch.empty(T, H, dtype=torch.float64)
    op.reference(a["q"], a["k"], a["v"], a["cu_seqlens_q"], a["cu_seqlens_kv"], ro, rl, a["softmax_scale"])
    assert not out.isnan().any() and (out - ro).abs().max() < 1e-10 and (lse - rl).abs().max() < 1e-10


# -- compilation without a GPU ---------------------------------------------------------------------
COMPILE_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from tokenspeed_kernels_blackwell.mla_prefill import compile_kernel
    for dtype, h in json.loads(sys.argv[1]):
        compile_kernel("sm_90a", getattr(torch, dtype), h)
""")
SHAPES = [("bfloat16", 16), ("bfloat16", 128), ("float16", 16), ("float16", 128)]


def test_compiles_for_sm90a_with_wgmma_and_tma(tmp_path):
    pytest.importorskip("cutlass", reason="nvidia-cutlass-dsl not installed")
    pytest.importorskip("tvm_ffi", reason="apache-tvm-ffi not installed")
    env = dict(os.environ, CUTE_DSL_ARCH="sm_90a", CUTE_DSL_KEEP="ptx", TOKENSPEED_CUTE_CACHE="0",
               PYTHONPATH=os.pathsep.join([os.path.abspath(PKG_SRC), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT, json.dumps(SHAPES)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ptx = sorted(glob.glob(str(tmp_path / "*.ptx")))
    assert len(ptx) == len(SHAPES), [os.path.basename(p)[-60:] for p in ptx]
    ptxas = shutil.which("ptxas")
    for p in ptx:
        text = open(p).read()
        ty = "f16" if "Float16" in os.path.basename(p) and "BFloat16" not in os.path.basename(p) else "bf16"
        assert ".target sm_90a" in text and re.search(r"\.reqntid 384", text), p
        assert "mma.sync" not in text, "must not fall back to warp-level MMA"
        mmas = re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)\.f32\.(\w+)\.\w+ \{[^}]*\}, (\S)", text)
        # S = Q K^T: 192 / 16 = 12 k-steps, both operands from smem descriptors; O += P V: 128 / 16
        # = 8 k-steps, P from registers (A in braces), V MN-major (the transpose-B bit). Pipelined
        # by one tile: S twice (tile 0, the loop), P V twice (the loop, the last tile)
        assert {(s, t) for s, t, _ in mmas} == {("m64n128k16", ty)}, (p, set(mmas))
        assert sum(1 for *_, a in mmas if a == "%") == 2 * 192 // 16, p
        assert sum(1 for *_, a in mmas if a == "{") == 2 * 8, p
        assert len(re.findall(r"wgmma[^;]*\{[^}]*\}, \{[^}]*\}, %rd\d+, p, 1,  1, 1;", text)) == 2 * 8, p
        # the loop waits for S with P V still in flight, then for P V
        waits = re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+);", text)
        assert sorted(waits) == ["0", "0", "0", "1"], (p, waits)
        # TMA from one producer warp: Q 3 boxes, K 3, V 2 (128 rows x 64 columns), 3-d views with
        # the head outermost; nothing by cp.async; every load on an mbarrier
        boxes = re.findall(r"cp\.async\.bulk\.tensor\.(\d)d\.", text)
        assert boxes == ["3"] * 8, (p, boxes)
        assert not re.search(r"cp\.async\.c[ag]\.", text) and "mbarrier.try_wait.parity" in text
        assert text.count("elect.sync") == 8, "each box elects its lane over the whole warp"
        assert re.search(r"setmaxnreg\.dec\.sync\.aligned\.u32\s+40;", text)
        assert re.search(r"setmaxnreg\.inc\.sync\.aligned\.u32\s+232;", text)
        # one CTA barrier (after the mbarrier init); out two columns a store, lse one a row
        assert text.count("bar.sync") == 1, p
        assert text.count("st.global.b32") == 2 * 64 // 4 + 2, p
        if ptxas:
            res = subprocess.run([ptxas, "-arch=sm_90a", "-v", p, "-o", str(tmp_path / "k.cubin")],
                                 capture_output=True, text=True, timeout=300)
            assert res.returncode == 0, res.stderr[-2000:]
            assert "0 bytes spill stores, 0 bytes spill loads" in res.stderr, res.stderr
            assert "0 bytes stack frame" in res.stderr, res.stderr
