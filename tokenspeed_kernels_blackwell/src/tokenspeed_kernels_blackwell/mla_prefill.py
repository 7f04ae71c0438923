"""``mla_prefill`` for the CuTe DSL backend, sm_90a: requirements, compile cache, launch, registration.

The kernel (:mod:`.mla_prefill_kernel_sm90`, FlashAttention-3 style: TMA producer warp, two wgmma
warpgroups) is imported only when it is compiled, so this module imports without
nvidia-cutlass-dsl. Status: on an H200 (docs/perf/cute.md, runs P1-P2) it passed the
conformance kit's full grid and bench/gpu_cute_prefill.py's float64 checks, and ran 1.14-1.70x
faster than the Triton kernel on every timed row (0.89-0.93x cuDNN's time on the long dense
rows, 1.3-1.4x at 8 x 1K), so it is registered SPECIALISED on sm_90a.

Shape class = (arch, dtype, H): T, T_kv and the batch are run-time sizes of one compiled kernel.
The launch needs no host sync: the grid (``T // 128 + B`` query tiles x H heads) comes from
shapes, and each CTA finds its request on the device. CUDA-graph capturable (no allocation
except the aligned copies of a misaligned output).
"""

from __future__ import annotations

import os

import torch

from . import _compile_cache
from .mla_decode import TARGETS, missing_dependency, positive_scale_log2

OP = "mla_prefill"
HEAD_DIM, HEAD_DIM_V = 192, 128  # = mla_prefill_kernel_sm90.HEAD_DIM(_V) (that module needs cutlass)
BLOCK_M = 128  # = mla_prefill_kernel_sm90.BLOCK_M: query rows a CTA
DTYPES = (torch.bfloat16, torch.float16)
MAX_HEADS = 65535  # grid y
ALIGN = 16  # bytes: TMA boxes need 16-byte aligned base addresses and row strides
VARIANT = "fa3_sm90"
STATUS = "sm_90a: conformance passed on an H200; faster than Triton on every measured row (runs P1-P2)"


def supports(sig) -> str | None:
    """Why the kernel cannot run this signature; None when it can. Strides and data pointers are
    not in a signature: the spec requires contiguous tensors, and the launcher refuses a
    misaligned q, k or v by name (``check_tensors``)."""
    dtype = sig.dtype("q")
    if dtype not in DTYPES:
        return f"q dtype {dtype} not supported (bf16 or fp16)"
    dqk, dv = sig.dim("Dqk"), sig.dim("Dv")
    if (dqk, dv) != (HEAD_DIM, HEAD_DIM_V):
        return (f"head dims Dqk={dqk} (q, k), Dv={dv} (v): only Dqk={HEAD_DIM}, Dv={HEAD_DIM_V} "
                f"(DeepSeek MLA prefill) are compiled")
    h = sig.dim("H")
    if not 1 <= h <= MAX_HEADS:
        return f"{h} heads (q dim 1) outside 1..{MAX_HEADS}"
    return None


def check_tensors(q, k, v, cu_seqlens_q, cu_seqlens_kv, out, lse) -> None:
    """What TMA and the stores need and a signature cannot show: raises ValueError naming the
    argument. q, k, v are read by TMA boxes (contiguous last dim, rows and base 16-byte aligned);
    out and lse are written with computed offsets from a contiguous layout."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3 or t.stride(2) != 1:
            raise ValueError(f"{name}: the last dim must be contiguous (strides {tuple(t.stride())})")
        if not t.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous [tokens, heads, dim] tensor, got strides "
                             f"{tuple(t.stride())}")
        if t.data_ptr() % ALIGN:
            raise ValueError(f"{name}: TMA needs a {ALIGN}-byte aligned base address, got {t.data_ptr():#x} "
                             f"(a view at an element offset?); pass an aligned copy or use the triton backend")
    for name, t in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_kv", cu_seqlens_kv)):
        if t.dtype != torch.int32 or not t.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous int32 tensor, got {t.dtype} strides {tuple(t.stride())}")
    for name, t in (("out", out), ("lse", lse)):
        if not t.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous tensor, got strides {tuple(t.stride())}")


_compiled = _compile_cache.KernelMemo()


def compile_kernel(arch: str, dtype: torch.dtype, num_heads: int):
    """The kernel of one shape class: from the in-process cache, else the disk cache, else
    compiled (fake tensors: no GPU needed). ``CUTE_DSL_ARCH`` is set for the duration of the
    compile (unset, the DSL silently targets sm_100a)."""
    if arch != "sm_90a":
        raise ValueError(f"mla_prefill's CuTe kernel uses wgmma, which {arch} does not have (sm_90a only)")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype} not supported (bf16 or fp16)")
    key = (arch, dtype, num_heads)
    shape_class = (OP, dtype, num_heads, HEAD_DIM, HEAD_DIM_V)
    return _compiled.get(key, lambda: _compile_cache.make_key(arch, VARIANT, shape_class), lambda: _compile(*key))


def _compile(arch, dtype, num_heads):
    import cutlass
    import cutlass.cute as cute
    from cutlass.cute.runtime import make_fake_compact_tensor, make_fake_stream

    from .mla_prefill_kernel_sm90 import MlaPrefillSm90

    dt = {torch.bfloat16: cutlass.BFloat16, torch.float16: cutlass.Float16}[dtype]
    # 64-bit token counts: out's offsets pass 2^31 elements at 128K tokens x 128 heads
    tokens, kv_tokens, b1 = cute.sym_int64(), cute.sym_int64(), cute.sym_int()

    def fake(dtype_, shape, align):
        return make_fake_compact_tensor(dtype_, shape, stride_order=tuple(reversed(range(len(shape)))),
                                        assumed_align=align)

    args = (
        fake(dt, (tokens, num_heads, HEAD_DIM), ALIGN),
        fake(dt, (kv_tokens, num_heads, HEAD_DIM), ALIGN),
        fake(dt, (kv_tokens, num_heads, HEAD_DIM_V), ALIGN),
        fake(cutlass.Int32, (b1,), 4),
        fake(cutlass.Int32, (b1,), 4),
        fake(dt, (tokens, num_heads, HEAD_DIM_V), ALIGN),
        fake(cutlass.Float32, (tokens, num_heads), 4),
        cutlass.Float32(1.0),
        cutlass.Int32(1),
        make_fake_stream(use_tvm_ffi_env_stream=True),  # the caller's current stream at call time
    )
    prev = os.environ.get("CUTE_DSL_ARCH")
    os.environ["CUTE_DSL_ARCH"] = arch
    try:
        return cute.compile(MlaPrefillSm90(dt, num_heads), *args, options=f"--enable-tvm-ffi --gpu-arch {arch}")
    finally:
        if prev is None:
            os.environ.pop("CUTE_DSL_ARCH", None)
        else:
            os.environ["CUTE_DSL_ARCH"] = prev


def mla_prefill(q, k, v, cu_seqlens_q, cu_seqlens_kv, out, lse, softmax_scale):
    """CuTe DSL ragged causal extend attention (sm_90a); writes ``out`` and ``lse``."""
    T, H, _ = q.shape
    batch = cu_seqlens_q.shape[0] - 1
    if T == 0 or batch <= 0 or H == 0:
        return
    check_tensors(q, k, v, cu_seqlens_q, cu_seqlens_kv, out, lse)
    dev = q.device
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    arch = TARGETS.get(torch.cuda.get_device_capability(idx))
    fn = compile_kernel(arch, q.dtype, H)
    out_c = out if out.data_ptr() % ALIGN == 0 else torch.empty_like(out)
    # binary search over cu_seqlens_q: the largest b in [0, B - 1] in bit_length(B) + 1 halvings
    q, scale_log2 = positive_scale_log2(q, softmax_scale)
    fn(q, k, v, cu_seqlens_q, cu_seqlens_kv, out_c, lse, scale_log2, batch.bit_length() + 1)
    if out_c is not out:
        out.copy_(out_c)


def register(registry, backend: str, priority) -> None:
    missing = missing_dependency()
    registry.register(
        OP, mla_prefill, backend=backend, devices=("cuda",), capability=((9, 0), (9, 0)), dtypes=DTYPES,
        supports=supports, priority=priority,
        doc="CuTe DSL ragged causal extend attention, sm_90a (FlashAttention-3 style: TMA producer warp, "
            "two wgmma warpgroups, 128 x 128 tiles, LSE)",
        status=STATUS, unavailable=missing,
    )


__all__ = ["check_tensors", "compile_kernel", "mla_prefill", "register", "supports"]
