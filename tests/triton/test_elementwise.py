"""Triton rms_norm, rope, silu_and_mul, kv_cache_write under the CPU interpreter: conformance on
the small grids, in-place aliasing, untouched cache slots, e4m3 rounding, compile-target lists."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton kernels are defined (conftest may set it)

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

import tokenspeed_core  # noqa: E402
from tokenspeed_core import KernelImpl  # noqa: E402
from tokenspeed_core.ops import kv_cache_write as kvw_spec  # noqa: E402
from tokenspeed_core.ops import rms_norm as rn_spec  # noqa: E402
from tokenspeed_core.ops import rope as rope_spec  # noqa: E402
from tokenspeed_core.testing import check_backend, check_impl  # noqa: E402
from tokenspeed_kernels_triton import kv_cache_write, rms_norm, rope, silu_and_mul  # noqa: E402

OPS = ("rms_norm", "rope", "silu_and_mul", "kv_cache_write")
MODULES = {"rms_norm": rms_norm, "rope": rope, "silu_and_mul": silu_and_mul, "kv_cache_write": kv_cache_write}
needs_interpreter = pytest.mark.interpreter  # skipped unless TRITON_INTERPRET=1 (conftest)
CPU = torch.device("cpu")



@needs_interpreter
@pytest.mark.parametrize("op", OPS)
def test_conformance_small_grid(registry, op):
    rep = check_backend(op, "triton", size="small", device="cpu", registry=registry)
    assert rep.ok, rep.format(verbose=True)
    assert sum(r.status == "pass" for r in rep.results) >= len(registry.spec(op).grid("small"))


@needs_interpreter
def test_rms_norm_fused_in_place():
    gen = torch.Generator().manual_seed(0)
    # float32: exact sums; bf16: the interpreter's float32 -> bf16 stores may be 1 ulp off
    for dtype, tol in ((torch.float32, (0.0, 0.0)), (torch.bfloat16, (1e-6, 2.0 ** -7))):
        for N in (7, 16385):  # one-pass and two-pass paths
            x = torch.randn(3, N, generator=gen).to(dtype)
            res = torch.randn(3, N, generator=gen).to(dtype)
            w = (torch.rand(N, generator=gen) + 0.5).to(dtype)
            out_ref, res_ref = torch.empty_like(x), torch.empty_like(x)
            rn_spec.reference(x=x, weight=w, residual=res, out=out_ref, residual_out=res_ref)
            rms_norm.rms_norm(x, w, out=x, residual_out=res, residual=res)  # both aliased
            torch.testing.assert_close(res.float(), res_ref.float(), atol=tol[0], rtol=tol[1])
            torch.testing.assert_close(x.float(), out_ref.float(), atol=1e-5, rtol=1e-5 if tol[1] == 0 else 1.6e-2)


@needs_interpreter
@pytest.mark.parametrize("style", ["neox", "gptj"])
def test_rope_in_place(style):
    args = rope_spec.SPEC.make_inputs(dict(T=5, Hq=3, Hk=2, Dr=10, style=style, dtype=torch.float32),
                                      torch.Generator().manual_seed(1), CPU)
    q_ref, k_ref = torch.empty_like(args["q"]), torch.empty_like(args["k"])
    rope_spec.reference(**args, q_out=q_ref, k_out=k_ref)
    rope.rope(**args, q_out=args["q"], k_out=args["k"])
    torch.testing.assert_close(args["q"], q_ref)
    torch.testing.assert_close(args["k"], k_ref)


@needs_interpreter
@pytest.mark.parametrize("style", ["neox", "gptj"])
def test_rope_heads_past_one_block(style):
    """Dr 128 puts 64 heads in a block: 130 q heads take three programs a token, and 70 k heads
    two turns of the k loop in the first of them."""
    args = rope_spec.SPEC.make_inputs(dict(T=3, Hq=130, Hk=70, Dr=128, style=style, dtype=torch.float32),
                                      torch.Generator().manual_seed(3), CPU)
    assert rope.launch_config(130, 70, 128)["BLOCK_H"] == 64
    wide = {n: (t.double() if t.is_floating_point() else t) if isinstance(t, torch.Tensor) else t
            for n, t in args.items()}
    q_ref, k_ref = torch.empty_like(wide["q"]), torch.empty_like(wide["k"])
    rope_spec.reference(**wide, q_out=q_ref, k_out=k_ref)
    q_out = torch.full_like(args["q"], float("nan"))
    k_out = torch.full_like(args["k"], float("nan"))
    rope.rope(**args, q_out=q_out, k_out=k_out)
    torch.testing.assert_close(q_out.double(), q_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_out.double(), k_ref, atol=1e-5, rtol=1e-5)


@needs_interpreter
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_kv_cache_write_leaves_other_slots_bit_identical(cache_dtype):
    """The kit poisons the cache; here the cache starts pre-filled, as in the engine."""
    case = dict(T=40, D=576, page_size=16, pages=4, dtype=torch.bfloat16, cache_dtype=cache_dtype, padding=5)
    args = kvw_spec.SPEC.make_inputs(case, torch.Generator().manual_seed(2), CPU)
    expected = args["kv_cache"].clone()
    kvw_spec.reference(kv=args["kv"], slot_mapping=args["slot_mapping"], kv_cache=expected,
                       kv_scale=args["kv_scale"])
    kv_cache_write.kv_cache_write(**args)
    assert torch.equal(args["kv_cache"].view(torch.uint8), expected.view(torch.uint8))


@needs_interpreter
def test_kit_catches_a_kernel_that_clobbers_unaddressed_slots(registry):
    def clobbering(kv, slot_mapping, kv_cache, kv_scale=1.0):
        kv_cache_write.kv_cache_write(kv, slot_mapping, kv_cache, kv_scale)
        free = torch.ones(kv_cache.shape[0] * kv_cache.shape[1], dtype=torch.bool)
        free[slot_mapping[slot_mapping >= 0]] = False
        kv_cache.view(-1, kv_cache.shape[-1])[free.nonzero()[:1, 0]] = 0  # one stray row

    impl = KernelImpl(op="kv_cache_write", backend="clobbering", fn=clobbering, devices=("cpu",))
    rep = check_impl(impl, size="small", device="cpu", registry=registry, bad_inputs=False,
                     cases=[dict(T=5, D=7, page_size=4, pages=3, dtype=torch.float32, padding=2)])
    assert not rep.ok and "not addressed" in rep.format()


@needs_interpreter
def test_e4m3_rounding_matches_torch():
    """Every e4m3 value, every midpoint (ties go to even) and random values, incl. saturation."""
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = codes[torch.isfinite(codes)].unique()
    mids = (grid[1:] + grid[:-1]) / 2
    rand = torch.randn(3000, generator=torch.Generator().manual_seed(3)) * torch.logspace(-4, 3, 3000)
    vals = torch.cat([grid, mids, rand, torch.tensor([500.0, -1e4, 464.0])])
    D = 64
    T = -(-vals.numel() // D)
    kv = torch.zeros(T * D)
    kv[: vals.numel()] = vals
    kv = kv.view(T, D)
    cache = torch.empty(T, 1, D, dtype=torch.float8_e4m3fn)
    kv_cache_write.kv_cache_write(kv, torch.arange(T), cache, 1.0)
    expected = kv.clamp(-448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(cache.view(T, D).view(torch.uint8), expected.view(torch.uint8))


@pytest.mark.parametrize("op", OPS)
def test_compile_targets_listed(op):
    import triton

    targets = MODULES[op].compile_targets()
    assert targets
    for fn, sig, constexprs in targets:
        # under TRITON_INTERPRET=1 the kernels are InterpretedFunctions: compile in a process without it
        assert isinstance(fn, (triton.runtime.jit.JITFunction, triton.runtime.interpreter.InterpretedFunction))
        assert list(sig) == fn.arg_names, "signature must name every argument, in order"
        assert {k for k, v in sig.items() if v == "constexpr"} == set(constexprs)


def test_registered_with_requirements(registry):
    for op in OPS:
        impl = registry.backend(op, "triton")
        assert impl.priority == tokenspeed_core.Priority.PORTABLE and "cuda" in impl.devices
        assert set(impl.dtypes) == {torch.float32, torch.float16, torch.bfloat16}
