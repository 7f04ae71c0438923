"""CuTe DSL mla_decode for sm_100a / sm_103a (tcgen05 + TMEM): compiled on CPU, PTX inspected.

No Blackwell GPU exists in this project: these tests are all the kernel gets until one does. They
compile the kernel for the Blackwell targets against fake tensors with the same argument list as
``mla_decode._compile`` passes (so ``mla_decode.py`` can launch it like the sm_90a kernels), in a
subprocess per batch with ``CUTE_DSL_ARCH`` set explicitly (the DSL reads it once per process) and
``--gpu-arch``, then read the dumped PTX: the target line, the tcgen05 instructions the design
depends on (their counts follow from the tile shapes), the MMA instruction descriptors (M, N,
operand majorness) and the absence of any Hopper/Ampere MMA, so that a regression to another
design, or a compile failure, fails CI.

CI compiles a representative subset (one per M-block count, a partial last block, both dtypes,
both arches, ~30 s); tests/blackwell/test_cute_mla_decode.py compiles every shape class the registry
advertises (H 16/32/64/128 x q_len 1..8 x bf16/fp16, page 64: 64 classes, ~2.5 min).
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

PKG_SRC = os.path.join(os.path.dirname(__file__), "..", "..", "tokenspeed_kernels_blackwell", "src")
D, DV = 576, 512

# (dtype, H, q_len, page_size): folded M = 16, 64, 160 (two blocks, the second partial), 128,
# 512, 1024 (8 blocks); fp16 at M = 32 and 384; page 128. Distinct M and dtype give distinct
# dump names (the DSL names the PTX after the argument types).
SHAPES_SM100 = [
    ("bfloat16", 16, 1, 64), ("bfloat16", 16, 4, 64), ("bfloat16", 32, 5, 64),
    ("bfloat16", 128, 1, 64), ("bfloat16", 64, 8, 64), ("bfloat16", 128, 8, 128),
    ("float16", 16, 2, 64), ("float16", 128, 3, 64),
]
SHAPES_SM103 = [("bfloat16", 32, 4, 64)]

COMPILE_SCRIPT = textwrap.dedent("""
    import json, os, sys, time
    import cutlass
    import cutlass.cute as cute
    from cutlass.cute.runtime import make_fake_compact_tensor, make_fake_stream
    from tokenspeed_kernels_blackwell.mla_decode_kernel_sm100 import MlaDecodeSplitKVTcgen05

    arch = os.environ["CUTE_DSL_ARCH"]
    D, DV = 576, 512

    def fake(dtype, shape, align):
        return make_fake_compact_tensor(dtype, shape, stride_order=tuple(reversed(range(len(shape)))),
                                        assumed_align=align)

    out = []
    for dtype, h, q_len, ps in json.loads(sys.argv[1]):
        dt = {"bfloat16": cutlass.BFloat16, "float16": cutlass.Float16}[dtype]
        m = h * q_len
        batch, table_w, splits, rows = cute.sym_int(), cute.sym_int(), cute.sym_int(), cute.sym_int64()
        part_batch = cute.sym_int()
        args = (  # the argument list of mla_decode._compile (partial O in the output's dtype)
            fake(dt, (batch, m, D), 16), fake(dt, (rows, D), 16), fake(cutlass.Int32, (batch, table_w), 4),
            fake(cutlass.Int32, (batch,), 4), fake(dt, (part_batch, splits, m, DV), 16),
            fake(cutlass.Float32, (part_batch, splits, m), 4), fake(dt, (batch, m, DV), 16),
            fake(cutlass.Float32, (batch, m), 4), cutlass.Float32(1.0), cutlass.Float32(1.0),
            make_fake_stream(),
        )
        t = time.time()
        kernel = MlaDecodeSplitKVTcgen05(dt, h, q_len, D, DV, ps)
        cute.compile(kernel, *args, options=f"--enable-tvm-ffi --gpu-arch {arch}")
        out.append(round(time.time() - t, 2))
    print(json.dumps(out))
""")


def _compile(arch, shapes, tmp_path, keep_ptx=True):
    pytest.importorskip("cutlass", reason="nvidia-cutlass-dsl not installed")
    pytest.importorskip("tvm_ffi", reason="apache-tvm-ffi not installed")
    env = dict(os.environ, CUTE_DSL_ARCH=arch,
               PYTHONPATH=os.pathsep.join([os.path.abspath(PKG_SRC), os.environ.get("PYTHONPATH", "")]))
    env.pop("CUTE_DSL_KEEP", None)
    if keep_ptx:
        env["CUTE_DSL_KEEP"] = "ptx"
    proc = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT, json.dumps(shapes)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return sorted(glob.glob(str(tmp_path / "*.ptx")))


def _idescs(ptx: str) -> list[dict]:
    """Decode every 32-bit literal of the PTX that is a plausible tcgen05 kind::f16 instruction
    descriptor (fp32 accumulator, 16-bit A and B of one type, M = 128). The DSL folds the MMA
    atom's run-time fields (negate A/B) in with ``selp`` + ``or``, so both candidates appear."""
    found = []
    for lit in set(re.findall(r"\b(\d{8,10})\b", ptx)):
        v = int(lit)
        if v >= 1 << 32:
            continue
        d = dict(d_f32=(v >> 4) & 3, a=(v >> 7) & 7, b=(v >> 10) & 7, a_mn=(v >> 15) & 1,
                 b_mn=(v >> 16) & 1, n=((v >> 17) & 63) * 8, m=((v >> 24) & 31) * 16, low=v & 0xF,
                 reserved=(v >> 23) & 1 | (v >> 29) & 1)
        if d["d_f32"] == 1 and d["a"] == d["b"] and d["a"] in (0, 1) and d["m"] == 128 and d["low"] == 0 \
                and d["reserved"] == 0 and d["n"] in (32, 256):
            found.append(d)
    return found


# The synchronisation protocol, in PTX order (the kernel is straight-line code around one loop,
# so text order is program order): events of interest, consecutive repeats collapsed.
_EVENTS = [("init", r"mbarrier\.init"), ("expect_tx", r"mbarrier\.arrive\.expect_tx"),
           ("tma", r"cp\.async\.bulk\.tensor"), ("proxy", r"fence\.proxy\.async\.shared::cta"), ("before", r"tcgen05\.fence::before_thread_sync"),
           ("bar", r"\bbar\.sync\s+\d+(,\s*\d+)?;"), ("after", r"tcgen05\.fence::after_thread_sync"),
           ("mma", r"tcgen05\.mma\."), ("commit", r"tcgen05\.commit\."), ("try_wait", r"mbarrier\.try_wait"),
           ("ld", r"tcgen05\.ld\."), ("wait_ld", r"tcgen05\.wait::ld"), ("st", r"tcgen05\.st\."),
           ("wait_st", r"tcgen05\.wait::st"), ("sts", r"st\.shared\.v4"), ("alloc", r"tcgen05\.alloc"),
           ("dealloc", r"tcgen05\.dealloc"), ("stg", r"st\.global\.v4"), ("vote", r"vote\.sync\.ballot")]
PROTOCOL = [
    "init", "bar",  # mbarriers initialised before anyone arms or waits on them (all 5 warps)
    # the producer warp: Q (barrier armed with the bytes, then the boxes); per KV tile, the wait
    # for its slot's last PV, then the same
    "expect_tx", "tma", "try_wait", "expect_tx", "tma",
    # the softmax warps
    "alloc", "bar",
    # loop top: Q / tile landed (mbarrier, no proxy fence for TMA writes); stale V rows zeroed
    # and published to the async proxy; TMEM reads of the last tile ordered
    "try_wait", "sts", "proxy", "before", "bar", "after",
    "mma", "commit",  # S = Q K^T, committed to the mbarrier
    "try_wait", "after",  # S (and the previous PV) done
    "ld", "wait_ld", "sts",  # S row -> softmax -> P to smem
    "vote", "ld", "wait_ld", "st", "wait_st",  # O correction
    "proxy", "before", "bar", "after", "mma",  # P published, TMEM stores ordered, then PV
    "commit",  # PV committed to the slot's "empty" barrier (the producer's); after the loop to the
    "try_wait", "after",  # MMA barrier: the last PV done
    "ld", "wait_ld", "stg",  # epilogue
    "before", "bar", "dealloc",
]


def _events(split: str) -> list[str]:
    rx = re.compile("|".join(f"(?P<{n}>{p})" for n, p in _EVENTS))
    out: list[str] = []
    for m in rx.finditer(split):
        if not out or out[-1] != m.lastgroup:
            out.append(m.lastgroup)
    return out


def _is_subsequence(needle: list[str], hay: list[str]) -> bool:
    it = iter(hay)
    return all(any(x == y for y in it) for x in needle)


def _check_ptx(path: str, arch: str) -> None:
    from tokenspeed_kernels_blackwell import mla_decode_kernel_sm100 as k

    text = open(path).read()
    name = os.path.basename(path)
    assert f".target {arch}" in text, name
    entries = text.split(".entry ")[1:]
    # the split stage, the combine's four builds (row-per-warp for <= 2 / 4 / 8 splits, batched)
    assert len(entries) == 5, (name, len(entries))
    (split,) = [e for e in entries if "attention_kernel" in e[:160]]
    assert f".reqntid {k.NUM_THREADS}, 1, 1" in split and k.NUM_THREADS == 160, name
    # this kernel always leaves out and lse to the combine (its stores are all 16-byte)
    assert not k.MlaDecodeSplitKVTcgen05.one_split_direct and "st.global.b16" not in split, name
    # no other generation's tensor-core path
    assert "mma.sync" not in text and "wgmma" not in text, name

    dv_cta = DV // k.DV_PARTS
    # S = Q K^T: D / 16 k-steps of m128 n32; O += P V: BLOCK_N / 16 k-steps of m128 n256
    mmas = re.findall(r"tcgen05\.mma\.cta_group::1\.kind::f16\b", split)
    assert len(mmas) == D // 16 + k.BLOCK_N // 16, (name, len(mmas))
    descs = _idescs(split)
    qk = {(x["m"], x["n"], x["a_mn"], x["b_mn"]) for x in descs if x["n"] == k.BLOCK_N}
    pv = {(x["m"], x["n"], x["a_mn"], x["b_mn"]) for x in descs if x["n"] == dv_cta}
    assert qk == {(128, k.BLOCK_N, 0, 0)}, (name, qk)  # Q and K both K-major
    assert pv == {(128, dv_cta, 0, 1)}, (name, pv)  # P K-major, V read MN-major from the K tile
    # TMEM: one allocation of all 512 columns, permit given up, freed at the end
    assert split.count("tcgen05.alloc.cta_group::1") == 1, name
    assert re.search(r"mov\.b32\s+%r\d+, 512;\s+tcgen05\.alloc", split), name
    assert split.count("tcgen05.relinquish_alloc_permit") == 1, name
    assert split.count("tcgen05.dealloc.cta_group::1") == 1, name
    # softmax reads S (one 32x32b.x32 load), rescales O in 32-column chunks (load + store each),
    # the epilogue reads O once more
    lds = re.findall(r"tcgen05\.ld\.sync\.aligned\.32x32b\.x32\.b32", split)
    sts = re.findall(r"tcgen05\.st\.sync\.aligned\.32x32b\.x32\.b32", split)
    assert len(lds) == 1 + 2 * (dv_cta // k.O_CHUNK), (name, len(lds))
    assert len(sts) == dv_cta // k.O_CHUNK, (name, len(sts))
    # every load is waited for before its registers are used; the stores once, before the PV MMA
    assert split.count("tcgen05.wait::ld") == len(lds), name
    assert split.count("tcgen05.wait::st") == 1, name
    # MMA completion: commit to an mbarrier (in the loop after S and after PV, after the loop),
    # waited by parity
    assert split.count("tcgen05.commit.cta_group::1.mbarrier::arrive::one") == 3, name
    assert "mbarrier.try_wait.parity" in split, name
    # ordering of TMEM traffic across threads, and of generic-proxy smem writes (zeroed stale V
    # rows, P) before the tensor cores read them
    assert "tcgen05.fence::before_thread_sync" in split and "tcgen05.fence::after_thread_sync" in split, name
    assert split.count("fence.proxy.async.shared::cta") == 2, name
    _check_tma_loads(split, name)
    # every fence, wait and barrier of the protocol, in order
    events = _events(split)
    assert _is_subsequence(PROTOCOL, events), (name, " ".join(events))
    # the MMAs are issued by one elected thread
    assert "elect.sync" in split, name
    # partial O (16-bit, as the combine reads it) leaves as 16-byte stores of each thread's row
    # (8 columns each), not 4-byte
    assert len(re.findall(r"st\.global\.v4\.b32", split)) == dv_cta // 8, name


def _check_tma_loads(split: str, name: str) -> None:
    """Q and KV arrive by TMA on mbarriers, nothing by cp.async (a regression to it fails here)."""
    from tokenspeed_kernels_blackwell import mla_decode_kernel_sm100 as k

    assert not re.search(r"cp\.async\.(ca|cg)\.|cp\.async\.(commit|wait)_group", split), name
    boxes = D // 64  # one 64-column box per 128B-swizzle atom column
    tma = re.findall(r"cp\.async\.bulk\.tensor\.(\d)d\.shared::cta\.global\.tile\.mbarrier::complete_tx::bytes", split)
    # KV (2-D over the flattened cache) in the producer's loop; Q (3-D over (row, column,
    # request)) once
    assert tma.count("2") == boxes and tma.count("3") == boxes and len(tma) == 2 * boxes, (name, tma)
    assert len(re.findall(r"cp\.async\.bulk\.tensor", split)) == len(tma), name
    # every box is issued by a lane elected from the full warp (elect.sync -1): the whole warp
    # runs the copy (under a one-lane branch elect.sync would hang)
    for m in re.finditer(r"cp\.async\.bulk\.tensor", split):
        before = split[:m.start()].rsplit("elect.sync", 1)
        assert len(before) == 2 and re.match(r"\s+%r\d+\|%p\d+, -1;", before[1]), name
        assert before[1].count("\n") < 12, name  # the election guards this very copy
    # the barriers armed with the bytes: Q (128 rows, padding included), a KV tile (32 rows)
    expects = re.findall(r"mov\.b32\s+%r\d+, (\d+);\s+mbarrier\.arrive\.expect_tx", split)
    q_bytes, kv_bytes = k.BLOCK_M * D * 2, k.BLOCK_N * D * 2
    assert sorted(map(int, expects)) == sorted([q_bytes, kv_bytes]), (name, expects)
    # mbarriers: the MMA's, Q's and a "full" and an "empty" one per ring slot; waited for Q, the
    # tile and S in the loop, the last PV after it, and a free slot by the producer
    assert split.count("mbarrier.init.shared") == 2 + 2 * k.STAGES, name
    assert split.count("mbarrier.try_wait.parity") == 5, name
    # warp specialisation: the producer warp issues every load, the softmax warps none (their
    # code, from the TMEM allocation on, has no TMA) and meet on their own named barrier; the
    # whole CTA meets once, after the mbarrier init
    assert "cp.async.bulk.tensor" not in split[split.index("tcgen05.alloc"):], name
    assert len(re.findall(r"bar\.sync\s+0;", split)) == 1, name
    assert len(re.findall(rf"bar\.sync\s+{k.BAR_MATH}, {k.MATH_THREADS};", split)) == 3, name
    assert split.count("prefetch.tensormap") == 2, name


def test_tile_config_fits_one_sm():
    pytest.importorskip("cutlass", reason="nvidia-cutlass-dsl not installed")
    from tokenspeed_kernels_blackwell import mla_decode_kernel_sm100 as k

    dv_cta = DV // k.DV_PARTS
    # TMEM: O (this CTA's Dv columns, fp32) + S (BLOCK_N fp32 columns) in one power-of-two
    # allocation of at most the 512 columns of an SM; M = 128 rows = the 128 lanes
    assert dv_cta + k.BLOCK_N <= k.TMEM_COLS <= 512 and k.TMEM_COLS & (k.TMEM_COLS - 1) == 0
    assert k.BLOCK_M == 128 and k.MATH_THREADS == k.BLOCK_M  # one softmax thread (TMEM lane) per row
    assert k.NUM_THREADS == k.MATH_THREADS + 32 and k.LOAD_WARP == k.MATH_THREADS // 32  # + the producer warp
    assert dv_cta <= 256 and dv_cta % k.O_CHUNK == 0  # one tcgen05 MMA of N <= 256 for PV
    # shared memory: Q + KV ring + P (16-bit) + barrier / TMEM address (padded to 1 KB) within
    # the 227 KB a block may opt in to on sm_100
    smem = 2 * (k.BLOCK_M * D + k.STAGES * k.BLOCK_N * D + k.BLOCK_M * k.BLOCK_N) + 1024
    assert smem <= 232448, smem


def test_ctas_per_split():
    pytest.importorskip("cutlass", reason="nvidia-cutlass-dsl not installed")
    from tokenspeed_kernels_blackwell.mla_decode_kernel_sm100 import ctas_per_split

    assert ctas_per_split(16) == 2 and ctas_per_split(128) == 2
    assert ctas_per_split(129) == 4 and ctas_per_split(1024) == 16


def test_rejects_shapes_it_cannot_tile():
    pytest.importorskip("cutlass", reason="nvidia-cutlass-dsl not installed")
    import cutlass
    from tokenspeed_kernels_blackwell.mla_decode_kernel_sm100 import MlaDecodeSplitKVTcgen05

    with pytest.raises(ValueError):
        MlaDecodeSplitKVTcgen05(cutlass.BFloat16, 16, 1, D, DV, 48)  # page not a multiple of 32
    with pytest.raises(ValueError):
        MlaDecodeSplitKVTcgen05(cutlass.BFloat16, 16, 1, 832, 768, 64)  # Dv / 2 > 256: no N fits


@pytest.mark.parametrize("arch, shapes", [("sm_100a", SHAPES_SM100), ("sm_103a", SHAPES_SM103)])
def test_compiles_with_tcgen05(arch, shapes, tmp_path):
    ptx = _compile(arch, shapes, tmp_path)
    assert len(ptx) == len(shapes), [os.path.basename(p)[-60:] for p in ptx]
    for p in ptx:
        _check_ptx(p, arch)
