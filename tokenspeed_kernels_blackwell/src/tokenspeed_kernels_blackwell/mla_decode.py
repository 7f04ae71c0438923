"""``mla_decode`` for the CuTe DSL backend: requirements, compile cache, launch, registration.

Requirements are declared here, beside the launcher they guard (``supports``). The kernel itself
is in :mod:`.mla_decode_kernel` and is imported only when a kernel is compiled, so this module
imports without nvidia-cutlass-dsl.

Shape class = (arch, dtype, H, q_len, D, Dv, page_size): everything else (batch, number of pages,
table width, number of KV splits) is a run-time dimension of one compiled kernel. Launches go
through TVM-FFI (``--enable-tvm-ffi``): torch tensors are passed directly, no per-call DLPack
wrapping. The call allocates only through torch's caching allocator and never syncs with the
host, so it is CUDA-graph capturable.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from . import _compile_cache

OP = "mla_decode"
PAGE_MULTIPLE = 64  # a KV tile is 64 contiguous rows of one page
HEAD_DIM, HEAD_DIM_V = 576, 512
MAX_Q_LEN = 8
MAX_HEADS = 128
MAX_KV_SPLITS = 1024  # = mla_decode_combine.MAX_SPLITS
DTYPES = (torch.bfloat16, torch.float16)
FP8 = torch.float8_e4m3fn
FP8_VARIANTS = ("v3", "v4", "v5")  # the variants with an fp8 e4m3 cache path
# capability -> CUTE_DSL_ARCH of the kernel that runs there
TARGETS = {(9, 0): "sm_90a", (10, 0): "sm_100a", (10, 3): "sm_103a"}


def missing_dependency() -> str:
    """Why the kernel cannot be compiled in this process ('' when it can)."""
    if importlib.util.find_spec("cutlass") is None:
        return "nvidia-cutlass-dsl is not installed (pip install 'tokenspeed[blackwell]')"
    if importlib.util.find_spec("tvm_ffi") is None:
        return "apache-tvm-ffi is not installed (pip install apache-tvm-ffi)"
    return ""


def supports_for(variant: str):
    """``supports`` of the launcher bound to ``variant``."""

    def supports(sig) -> str | None:
        if sig.dtype("kv_cache") == FP8 and variant not in FP8_VARIANTS:
            return f"fp8 e4m3 cache: kernel variant {variant} has no fp8 path (one of {FP8_VARIANTS})"
        return _supports(sig)

    return supports


def _supports(sig) -> str | None:
    """Why the CuTe kernel cannot run this signature; None when it can."""
    q_dtype, cache_dtype = sig.dtype("q"), sig.dtype("kv_cache")
    if q_dtype not in DTYPES:
        return f"q dtype {q_dtype} not supported (bf16 or fp16)"
    if cache_dtype != q_dtype and cache_dtype != FP8:
        return f"kv_cache dtype {cache_dtype} must equal q dtype {q_dtype} or be float8_e4m3fn"
    d, dv = sig.dim("D"), sig.dim("Dv")
    if (d, dv) != (HEAD_DIM, HEAD_DIM_V):
        return f"head dims D={d}, Dv={dv}: only D={HEAD_DIM}, Dv={HEAD_DIM_V} (DeepSeek MLA) are compiled"
    ps = sig.dim("PS")
    if ps % PAGE_MULTIPLE:
        return f"page size {ps} is not a multiple of {PAGE_MULTIPLE}"
    q_len = sig.dim("Q")
    if not 1 <= q_len <= MAX_Q_LEN:
        return f"q_len {q_len} outside 1..{MAX_Q_LEN}"
    h = sig.dim("H")
    if not 1 <= h <= MAX_HEADS:
        return f"{h} heads outside 1..{MAX_HEADS}"
    return None


# -- kernel variants -----------------------------------------------------------------------------
# "v3": wgmma over a 2-stage ring of 64-row tiles, one S per CTA shared by its two warpgroups
# (mla_decode_kernel_v3.py). "v4": v3, except where H x q_len <= 32: there the KV rows are the
# MMA's M axis and the query rows its N, so nothing is padded to 64 rows (mla_decode_kernel_v4.py).
# "v5": v4, except where H x q_len > SEESAW_FROM_ROWS: there two KV tiles per step, one whole S
# per warpgroup and FlashMLA's see-saw PV, the KV loaded by TMA from a producer warp, and a
# request's m-blocks in pairs (2-CTA clusters sharing each tile by multicast); an fp8 cache is
# converted through the producer warpgroup's registers instead (mla_decode_kernel_v5.py).
# Earlier variants (v1 mma.sync; v2 / v2_n64 / v2_n64_c8, wgmma with a duplicated S) were removed
# once v3/v4 beat them on every measured row (docs/perf/cute.md, runs 1-3; git history).
VARIANTS = {"v3": dict(block_n=64, stages=2, combine_batch=16),
            "v4": dict(block_n=64, stages=2, combine_batch=16),
            "v5": dict(block_n=64, stages=2, combine_batch=16)}
# The see-saw kernel above this many folded rows: from 33 rows, i.e. v3's
# 33-64-row class too, where it runs one m-block, unpaired and without its L2 prefetch. There it
# is 1.09-1.21x faster than v3 on an H200 (B 16-128, q 4 H 16, but B 16 4K: 0.99x; v3's per-tile
# chain was the limit at 4.25 TB/s) and 0.996-1.014x on an H100 (docs/perf/cute.md, runs 38-39);
# from 128 rows it is 1.14-1.46x faster (run 11). Until run 39 it started at 65 rows: with its
# two-step L2 prefetch it had been 1.2-1.3x slower than v3 at 64 rows (run 10f).
SEESAW_FROM_ROWS = 32
# Fewest KV tiles a see-saw split gets where filling the wave would make splits shorter (two
# 2-tile steps; num_splits_one_wave says why). 8 until run 39: with the fixed costs of a CTA cut
# (runs 33-37), b = 1 H 128 16K runs 64 splits of 4 tiles in 26.3 µs against 29.0 for 32 of 8
# (H100; H200 23.9 against 27.7), b = 1 q 4 H 128 4K 16 of 4 in 24.8 against 28.2 for 8 of 8.
SEESAW_MIN_TILES = 4
# v4 with an fp8 cache (H x q_len <= 32) stages the next tile in registers and keeps one 16-bit
# tile in smem: 95-113 KB and <= 255 registers x 128 threads, so two CTAs share an SM and each
# one's loads in flight overlap the other's per-tile chain. Where the one-CTA-an-SM rule gives
# splits of at least FP8_TWO_PER_SM_FROM_TILES tiles, the rule counts two CTA slots an SM (H200,
# run 48: 1.09-1.24x faster at B 4-128, H 16-32); shorter splits stay (b = 1: 256 splits of 4
# tiles 30.0 µs against 29.2 for 128 of 8 at 64K, 18.3 against 15.5 at 16K).
ROWS_ON_M_MAX = 32  # = mla_decode_kernel_v4.MAX_ROWS_V4: v4 (KV rows on the MMA M axis) up to here
FP8_TWO_PER_SM_FROM_TILES = 16
# The variant the registered implementation launches (TOKENSPEED_CUTE_MLA_VARIANT, read once at
# import). All three passed the conformance kit's full grid on an H100 (bf16/fp16 and the fp8
# cache; graph replay == eager; docs/perf/cute.md, runs 3-11); v3 and v4 on an H200 too.
DEFAULT_VARIANT = os.environ.get("TOKENSPEED_CUTE_MLA_VARIANT", "v5")
if DEFAULT_VARIANT not in VARIANTS:  # the plugin loader reports this and skips the plugin
    raise ValueError(f"TOKENSPEED_CUTE_MLA_VARIANT={DEFAULT_VARIANT!r}: expected one of {sorted(VARIANTS)}")
# Per variant: the fewest folded rows (H x q_len) from which it measured faster than Triton on
# every row of its class (None: nowhere). v3, v4 and v5 beat Triton on every measured row (H100
# and H200: memory-bound 1.22-1.43x, b = 1 1.07-1.88x, compute-bound 1.5-2.8x; run 11).
WINS_FROM_ROWS = {"v3": 1, "v4": 1, "v5": 1}
supports = supports_for(DEFAULT_VARIANT)  # what the registered `cute` implementation accepts
# sm_100a / sm_103a: tcgen05 MMA with TMEM accumulators, Q and 32-row KV tiles by TMA
# (mla_decode_kernel_sm100.py). Compiled for every shape class on CPU, never run on hardware:
# selectable on a Blackwell GPU only with TOKENSPEED_CUTE_SM100=1 until it has passed the
# conformance kit there. Not in VARIANTS, which the sm_90a benchmarks iterate over.
SM100_VARIANT = "tcgen05"
SM100_BLOCK_N = 32
SM100_ENABLED = os.environ.get("TOKENSPEED_CUTE_SM100", "") == "1"


# -- compilation ---------------------------------------------------------------------------------
def resolve_variant(arch: str, variant: str | None) -> str:
    """The kernel variant that runs on ``arch``: the given one (checked), else the arch's default."""
    variant = variant or (DEFAULT_VARIANT if arch == "sm_90a" else SM100_VARIANT)
    if variant not in VARIANTS and variant != SM100_VARIANT:
        raise ValueError(f"unknown variant {variant!r}; one of {sorted(VARIANTS) + [SM100_VARIANT]}")
    if variant == SM100_VARIANT and arch == "sm_90a":
        raise ValueError(f"variant {variant} uses tcgen05, which sm_90a does not have")
    if variant != SM100_VARIANT and arch != "sm_90a":
        raise ValueError(f"variant {variant} uses wgmma, which {arch} does not have (use {SM100_VARIANT})")
    return variant


_compiled = _compile_cache.KernelMemo()


def compile_kernel(arch: str, dtype: torch.dtype, num_heads: int, q_len: int, page_size: int,
                   head_dim: int = HEAD_DIM, head_dim_v: int = HEAD_DIM_V, variant: str | None = None,
                   kv_dtype: torch.dtype | None = None):
    """The kernel of one shape class for ``arch``: from the in-process cache, else from the disk
    cache (:mod:`._compile_cache`; ``TOKENSPEED_CUTE_CACHE=0`` turns it off), else compiled.

    Works without a GPU: the arguments are fake tensors. ``CUTE_DSL_ARCH`` is set explicitly for
    the duration of the compile (unset, the DSL silently targets sm_100a).
    """
    variant = resolve_variant(arch, variant)
    kv_dtype = dtype if kv_dtype is None else kv_dtype
    if kv_dtype == FP8 and variant not in FP8_VARIANTS:
        raise ValueError(f"variant {variant} has no fp8 cache path (one of {FP8_VARIANTS})")
    key = (arch, dtype, num_heads, q_len, head_dim, head_dim_v, page_size, variant, kv_dtype)
    # on disk: the shape class is the key less arch and variant, which are keyed apart
    return _compiled.get(key, lambda: _compile_cache.make_key(arch, variant, key[1:7] + key[8:]),
                         lambda: _compile(*key))


def _compile(arch, dtype, num_heads, q_len, head_dim, head_dim_v, page_size, variant, kv_dtype):
    import cutlass
    import cutlass.cute as cute
    from cutlass.cute.runtime import make_fake_compact_tensor, make_fake_stream

    dt = {torch.bfloat16: cutlass.BFloat16, torch.float16: cutlass.Float16}[dtype]
    kv_dt = dt if kv_dtype == dtype else cutlass.Float8E4M3FN
    m = num_heads * q_len
    # the partials have a batch dimension of their own: with one split a request the sm_90a
    # kernels write `out` themselves and the launcher passes a one-request placeholder
    batch, table_w, splits, part_batch = cute.sym_int(), cute.sym_int(), cute.sym_int(), cute.sym_int()
    rows = cute.sym_int64()  # a cache holds > 2^31 elements at 64 x 64K-token requests

    def fake(dtype_, shape, align):
        return make_fake_compact_tensor(dtype_, shape, stride_order=tuple(reversed(range(len(shape)))),
                                        assumed_align=align)

    args = (
        fake(dt, (batch, m, head_dim), 16),  # q folded: row = qi * H + h
        fake(kv_dt, (rows, head_dim), 16),  # kv cache, pages flattened
        fake(cutlass.Int32, (batch, table_w), 4),
        fake(cutlass.Int32, (batch,), 4),
        fake(dt, (part_batch, splits, m, head_dim_v), 16),  # partial O in the output's dtype
        fake(cutlass.Float32, (part_batch, splits, m), 4),
        fake(dt, (batch, m, head_dim_v), 16),
        fake(cutlass.Float32, (batch, m), 4),
        cutlass.Float32(1.0),
        cutlass.Float32(1.0),
        # no stream argument at call time: TVM-FFI launches on the caller's current stream (torch's,
        # the capturing one under CUDA-graph capture), with no stream query in Python
        make_fake_stream(use_tvm_ffi_env_stream=True),
    )
    if variant == SM100_VARIANT:
        from .mla_decode_kernel_sm100 import MlaDecodeSplitKVTcgen05

        kernel = MlaDecodeSplitKVTcgen05(dt, num_heads, q_len, head_dim, head_dim_v, page_size)
    elif kernel_kind(variant, m) == "v4":
        from .mla_decode_kernel_v4 import MlaDecodeSplitKVRowsOnM

        kernel = MlaDecodeSplitKVRowsOnM(dt, num_heads, q_len, head_dim, head_dim_v, page_size,
                                         kv_dtype=kv_dt, **VARIANTS[variant])
    elif kernel_kind(variant, m) == "v5":
        from .mla_decode_kernel_v5 import MlaDecodeSplitKVSeesaw

        kernel = MlaDecodeSplitKVSeesaw(dt, num_heads, q_len, head_dim, head_dim_v, page_size,
                                        kv_dtype=kv_dt, **VARIANTS[variant])
    else:
        from .mla_decode_kernel_v3 import MlaDecodeSplitKVSharedS

        kernel = MlaDecodeSplitKVSharedS(dt, num_heads, q_len, head_dim, head_dim_v, page_size,
                                         kv_dtype=kv_dt, **VARIANTS[variant])
    prev = os.environ.get("CUTE_DSL_ARCH")
    os.environ["CUTE_DSL_ARCH"] = arch
    try:
        return cute.compile(kernel, *args, options=f"--enable-tvm-ffi --gpu-arch {arch}")
    finally:
        if prev is None:
            os.environ.pop("CUTE_DSL_ARCH", None)
        else:
            os.environ["CUTE_DSL_ARCH"] = prev


def kernel_kind(variant: str, m: int) -> str:
    """Which sm_90a kernel a variant launches for ``m`` folded rows: "v4" (KV rows on the MMA M
    axis), "v5" (the see-saw kernel) or "v3"."""
    if variant in ("v4", "v5") and m <= ROWS_ON_M_MAX:
        return "v4"
    if variant == "v5" and m > SEESAW_FROM_ROWS:
        return "v5"
    return "v3"


def shape_classes(q_lens=range(1, MAX_Q_LEN + 1), heads=(16, 32, 64, 128), page_sizes=(64,),
                  dtypes=DTYPES):
    """The shape classes worth compiling ahead of time: CI compiles all of them for sm_90a (16-bit
    and fp8 caches) and sm_100a (tests/blackwell/test_cute_mla_decode.py)."""
    for dtype in dtypes:
        for h in heads:
            for q_len in q_lens:
                for ps in page_sizes:
                    yield dtype, h, q_len, ps


# -- launch --------------------------------------------------------------------------------------


def num_splits_v2(batch: int, m_blocks: int, max_rows: int, sms: int, block_n: int = 32) -> int:
    """The base split rule: the fewest splits whose CTAs fill whole waves (>= 90% of the SM
    slots of the last wave busy; one CTA per SM), so no SM idles through a half-empty last wave
    (a first rule, ceil(sms / ctas), gave 192 CTAs = 1.45 waves at batch 64). Never more splits
    than KV tiles. Static shapes only: a captured graph stays valid."""
    per_split = max(1, batch * m_blocks)
    tiles = max(1, -(-max_rows // block_n))
    best, best_eff = 1, 0.0
    for s in range(1, min(tiles, max(1, -(-4 * sms // per_split))) + 1):
        ctas = per_split * s
        eff = ctas / (-(-ctas // sms) * sms)
        if ctas >= 0.9 * sms and eff >= 0.9:
            return s
        if eff > best_eff + 1e-9:
            best, best_eff = s, eff
    return best


def num_splits_one_wave(batch: int, m_blocks: int, max_rows: int, sms: int, block_n: int = 64,
                        min_tiles: int = 1) -> int:
    """KV splits per request for the wgmma variants: ``num_splits_v2``, except that when its CTAs
    fit in one wave (small batches) the split count is raised to fill the whole wave (or half of
    it, if that keeps ``min_tiles`` tiles a split), and then lowered to the fewest splits with the
    same tiles per split (every split equally long).

    Why: at b = 1 (16K tokens = 256 tiles) v2's rule gave 119 splits of up to 3 tiles (86 busy
    CTAs, the critical path 3 tiles long); 128 splits of exactly 2 tiles shorten it by a third.
    ``min_tiles``: the see-saw kernel fills and drains a 2-tile step per split, so a split gets
    at least two steps (``SEESAW_MIN_TILES``: at b = 1, H 128, 16K 64 splits of 4 tiles 26.3 µs
    against 29.0 for 32 of 8, H100, run 39; before the epilogue and combine were cut, runs 12
    and 12d, 32 of 8 had been the faster). Shorter requests keep at least half the wave busy.
    The combine pays per split, which is why ``MAX_KV_SPLITS`` bounds the count and the combine
    spreads the splits over warps (mla_decode_combine.py). Static shapes only."""
    per_split = max(1, batch * m_blocks)
    tiles = max(1, -(-max_rows // block_n))
    s = num_splits_v2(batch, m_blocks, max_rows, sms, block_n)
    if per_split * s <= sms:  # one wave: fill it (v2's count never exceeds this)
        fill = min(sms // per_split, tiles)
        s = min(fill, max(tiles // min_tiles, fill // 2, 1))
        s = -(-tiles // -(-tiles // s))
    return max(1, min(s, MAX_KV_SPLITS))


@functools.lru_cache(maxsize=4096)
def _launch_plan(dev_idx: int, dtype, batch: int, q_len: int, heads: int, d: int, kv_dtype, page_size: int,
                 table_w: int, head_dim_v: int, variant, num_kv_splits):
    """(compiled kernel, splits, folded rows, resolved variant) of one call shape: everything a
    call derives from static shapes, computed once (a decode step repeats the same shapes: its
    host cost is then the partial buffers, none with one split, and the launch). Raises on an
    unusable variant."""
    arch = TARGETS[torch.cuda.get_device_capability(dev_idx)]
    variant = resolve_variant(arch, variant)
    fn = compile_kernel(arch, dtype, heads, q_len, page_size, d, head_dim_v, variant, kv_dtype=kv_dtype)
    sms = torch.cuda.get_device_properties(dev_idx).multi_processor_count
    m = heads * q_len
    max_rows = table_w * page_size
    if num_kv_splits is not None:
        splits = int(num_kv_splits)
        if not 1 <= splits <= MAX_KV_SPLITS:
            raise ValueError(f"num_kv_splits must be in 1..{MAX_KV_SPLITS}, got {splits}")
    else:
        splits = split_count(variant, batch, m, max_rows, sms, kv_dtype)
    return fn, splits, m, variant


def split_count(variant: str, batch: int, m: int, max_rows: int, sms: int, kv_dtype) -> int:
    """The split rule's count for a resolved variant: ``batch`` requests of ``m`` folded rows and
    up to ``max_rows`` KV rows on ``sms`` SMs."""
    if variant == SM100_VARIANT:
        from .mla_decode_kernel_sm100 import ctas_per_split  # 128-row blocks x 2 Dv halves

        return num_splits_one_wave(batch, ctas_per_split(m), max_rows, sms, SM100_BLOCK_N)
    from .mla_decode_kernel import BLOCK_M

    block_n = VARIANTS[variant]["block_n"]
    kind = kernel_kind(variant, m)
    if kind == "v4" and kv_dtype == FP8:
        s = num_splits_one_wave(batch, 1, max_rows, sms, block_n)
        if -(-max_rows // block_n) >= FP8_TWO_PER_SM_FROM_TILES * s:
            s = num_splits_one_wave(batch, 1, max_rows, 2 * sms, block_n)
        return s
    return num_splits_one_wave(batch, -(-m // BLOCK_M), max_rows, sms, block_n,
                               min_tiles=SEESAW_MIN_TILES if kind == "v5" else 1)


_placeholders: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def partial_buffers(batch: int, splits: int, m: int, head_dim_v: int, dtype, device, variant: str):
    """(partial O, partial LSE) for one launch: ``[batch, splits, m, head_dim_v]`` in the output
    dtype and ``[batch, splits, m]`` fp32. With one split a request the sm_90a kernels write
    ``out`` and ``lse`` themselves and never touch the partials: a one-request placeholder, made
    once per device and shape, stands in (a large batch would otherwise hold up to 134 MB for
    nothing: B 128, q 4, H 128); made during a CUDA-graph capture, it lives in the graph's pool,
    which is harmless since nothing reads it. The sm_100a kernel always writes its partials."""
    if splits == 1 and variant != SM100_VARIANT:
        key = (device, dtype, m, head_dim_v)
        bufs = _placeholders.get(key)
        if bufs is None:
            bufs = _placeholders[key] = (torch.empty((1, 1, m, head_dim_v), dtype=dtype, device=device),
                                         torch.empty((1, 1, m), dtype=torch.float32, device=device))
        return bufs
    return (torch.empty((batch, splits, m, head_dim_v), dtype=dtype, device=device),
            torch.empty((batch, splits, m), dtype=torch.float32, device=device))


ALIGN = 16  # bytes: q, the cache and out are moved 16 bytes at a time (TMA boxes, cp.async, st.v4)


def _misaligned(t) -> bool:
    return t.data_ptr() % ALIGN != 0


LOG2_E = 1.4426950408889634
SMALLEST_NORMAL_F32 = 1.1754943508222875e-38


def positive_scale_log2(q: torch.Tensor, softmax_scale: float, kv_scale: float = 1.0):
    """``(q', s)`` with q' . k x s == q . k x softmax_scale x kv_scale x log2(e) and s > 0, as the
    see-saw decode kernel and the prefill kernel need it: they take a row's max over the raw
    scores and scale inside the exponent's FFMA, exp2(score x s - max x s) (one instruction a
    score instead of an FMUL and an FADD), which is right only for s > 0. The op allows any
    scale: a negative one is moved into q (a copy; q . k x s = (-q) . k x |s|); zero (uniform
    weights) becomes the smallest normal float, under which every scaled score rounds to 0 while
    a masked score stays -inf (0 x -inf would be NaN)."""
    s = float(softmax_scale) * float(kv_scale) * LOG2_E
    if s < 0:
        return -q, -s
    if s == 0:
        return q, SMALLEST_NORMAL_F32
    return q, s


def mla_decode(q, kv_cache, page_table, cache_seqlens, out, lse, softmax_scale, head_dim_v=HEAD_DIM_V,
               kv_scale=1.0, variant=None, num_kv_splits=None):
    """CuTe DSL MLA decode (split-KV + combine); writes ``out`` and ``lse``.

    ``num_kv_splits`` overrides the split rule (benchmarks sweep it); it must be >= 1. q and out
    at a data pointer that is not 16-byte aligned (a view at an odd element offset) go through
    aligned copies; such a cache is refused by name (copying it would cost more than the call)."""
    batch, q_len, heads, d = q.shape
    if batch == 0:
        return
    if _misaligned(kv_cache):
        raise ValueError(f"kv_cache: the CuTe kernels read it 16 bytes at a time, but its data pointer "
                         f"{kv_cache.data_ptr():#x} is not {ALIGN}-byte aligned (a view at an element offset?); "
                         f"pass an aligned cache or choose the triton backend")
    dev = q.device
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    fn, splits, m, resolved = _launch_plan(idx, q.dtype, batch, q_len, heads, d, kv_cache.dtype, kv_cache.shape[1],
                                           page_table.shape[1], head_dim_v, variant, num_kv_splits)
    o_part, lse_part = partial_buffers(batch, splits, m, head_dim_v, q.dtype, dev, resolved)
    out_c = out if out.is_contiguous() and not _misaligned(out) else torch.empty_like(
        out, memory_format=torch.contiguous_format)
    lse_c = lse if lse.is_contiguous() else torch.empty_like(lse, memory_format=torch.contiguous_format)
    q_c, scale_log2 = positive_scale_log2(q.contiguous(), softmax_scale, kv_scale)
    if _misaligned(q_c):
        q_c = q_c.clone()
    fn(
        q_c.view(batch, m, d),
        kv_cache.contiguous().view(-1, d),
        page_table.contiguous(),
        cache_seqlens.contiguous(),
        o_part,
        lse_part,
        out_c.view(batch, m, head_dim_v),
        lse_c.view(batch, m),
        scale_log2,
        float(kv_scale),
    )
    if out_c is not out:
        out.copy_(out_c)
    if lse_c is not lse:
        lse.copy_(lse_c)


# -- registration --------------------------------------------------------------------------------
_KERNEL_DESC = {"v3": "wgmma, one S per CTA, 2-stage cp.async",
                "v4": "wgmma; KV rows on the MMA M axis where H x q_len <= 32, else v3",
                "v5": "v4; where H x q_len > 32: two KV tiles per step, see-saw PV, TMA producer warp, "
                      "m-block pairs sharing tiles by multicast (fp8 cache: converted by the producer)"}
SM90_STATUS = f"sm_90a: {DEFAULT_VARIANT} kernel ({_KERNEL_DESC.get(DEFAULT_VARIANT, 'wgmma + cp.async ring')})" + (
    "" if WINS_FROM_ROWS[DEFAULT_VARIANT] is None else
    f"; preferred over Triton for H x q_len >= {WINS_FROM_ROWS[DEFAULT_VARIANT]}")
SM100_UNAVAILABLE = (
    "sm_100a/sm_103a tcgen05/TMEM kernel: compiled for every shape class in CI, never run on "
    "hardware; set TOKENSPEED_CUTE_SM100=1 to make it selectable on a Blackwell GPU"
)


def rank_for(priority, preferred):
    """Per-signature priority: ``preferred`` where the registered variant measured faster than
    Triton (``WINS_FROM_ROWS``), ``priority`` elsewhere (still selectable when forced)."""
    wins_from = WINS_FROM_ROWS[DEFAULT_VARIANT]
    if preferred is None or wins_from is None:
        return None

    def rank(sig) -> int:
        return preferred if sig.dim("H") * sig.dim("Q") >= wins_from else priority

    return rank


def register(registry, backend: str, priority, preferred=None) -> None:
    # No GPU needs no reason here: selection rejects non-CUDA devices and other capabilities
    # itself, and says so in explain().
    missing = missing_dependency()
    registry.register(
        OP, mla_decode, backend=backend, devices=("cuda",), capability=((9, 0), (9, 0)),
        dtypes=DTYPES, supports=supports, priority=priority, rank=rank_for(priority, preferred),
        doc="CuTe DSL MLA decode, sm_90a (q_len folded into heads, split-KV + combine, LSE)",
        status=SM90_STATUS, unavailable=missing,
    )
    registry.register(
        OP, make_mla_decode(SM100_VARIANT), backend=f"{backend}_sm100", devices=("cuda",),
        capability=((10, 0), (10, 3)), dtypes=DTYPES, supports=supports_for(SM100_VARIANT), priority=priority,
        doc="CuTe DSL MLA decode, sm_100a/sm_103a (tcgen05 MMA, TMEM accumulators, split-KV + combine, LSE)",
        status="compiled, not run on hardware",
        unavailable=missing or ("" if SM100_ENABLED else SM100_UNAVAILABLE),
    )


def make_mla_decode(variant: str):
    """The launcher bound to one kernel variant (benchmarks register the variants side by side)."""
    if variant not in VARIANTS and variant != SM100_VARIANT:
        raise ValueError(f"unknown variant {variant!r}")

    def launch(q, kv_cache, page_table, cache_seqlens, out, lse, softmax_scale, head_dim_v=HEAD_DIM_V,
               kv_scale=1.0):
        mla_decode(q, kv_cache, page_table, cache_seqlens, out, lse, softmax_scale, head_dim_v,
                   kv_scale, variant=variant)

    launch.__name__ = f"mla_decode_{variant}"
    return launch


__all__ = ["VARIANTS", "compile_kernel", "rank_for", "make_mla_decode", "mla_decode", "num_splits_v2", "num_splits_one_wave",
           "partial_buffers",
           "register", "shape_classes", "split_count", "supports", "supports_for", "SM100_VARIANT"]
