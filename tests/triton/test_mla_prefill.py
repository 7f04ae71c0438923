"""Triton mla_prefill under the CPU interpreter: conformance on the small grid, the Hopper tile
config on one realistic-dims case, program-to-request mapping over many ragged requests."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton kernels are defined (conftest may set it)

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from tokenspeed_core.ops.mla_prefill import SPEC  # noqa: E402
from tokenspeed_core.testing import check_backend, run_case  # noqa: E402
from tokenspeed_kernels_triton import mla_prefill as kernel  # noqa: E402

needs_interpreter = pytest.mark.interpreter  # skipped unless TRITON_INTERPRET=1 (conftest)



@needs_interpreter
def test_conformance_small_grid(registry):
    rep = check_backend("mla_prefill", "triton", size="small", device="cpu", registry=registry)
    assert rep.ok, rep.format(verbose=True)
    assert sum(r.status == "pass" for r in rep.results) >= len(SPEC.grid("small"))


def _run_against_reference(case, config=None, seed=0):
    x = SPEC.make_inputs(case, torch.Generator().manual_seed(seed), torch.device("cpu"))
    call = SPEC.bind(x)
    out, lse = call.tensors["out"], call.tensors["lse"]
    out.fill_(float("nan"))
    lse.fill_(float("nan"))
    kernel.launch(**call.kwargs(), config=config)
    x64 = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
           for k, v in x.items()}
    ref_out = torch.empty(out.shape, dtype=torch.float64)
    ref_lse = torch.empty(lse.shape, dtype=torch.float32)
    SPEC.reference(**x64, out=ref_out, lse=ref_lse)
    atol, rtol = SPEC.tolerance(x["q"].dtype)
    torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)


@needs_interpreter
def test_hopper_tiles_on_deepseek_dims():
    """The GPU config (BLOCK_M 128, BLOCK_N 64): a block straddling requests' diagonals, a long
    prefix, a request shorter than one block and one longer than two."""
    case = dict(H=1, Dqk=192, Dv=128, q_lens=[300, 0, 5], prefixes=[70, 9, 200], dtype=torch.float16)
    _run_against_reference(case, config=kernel.HOPPER_16BIT)


@needs_interpreter
def test_many_ragged_requests_map_to_programs():
    """Binary search over cu_seqlens_q: 13 requests of 0..33 rows, several per 16-row block."""
    q_lens = [0, 1, 16, 17, 0, 0, 3, 33, 15, 2, 0, 31, 1]
    prefixes = [4, 0, 0, 5, 0, 1, 40, 0, 16, 1, 3, 2, 0]
    case = dict(H=2, Dqk=16, Dv=16, q_lens=q_lens, prefixes=prefixes, dtype=torch.float32)
    _run_against_reference(case, seed=5)


@needs_interpreter
def test_through_registry_selects_triton(registry):
    case = dict(H=2, Dqk=48, Dv=32, q_lens=[9, 4], prefixes=[3, 20], dtype=torch.float32)
    r = run_case(SPEC, registry.backend("mla_prefill", "triton"), case, torch.device("cpu"), seed=11)
    assert r.status == "pass", r
    x = SPEC.make_inputs(case, torch.Generator().manual_seed(1), torch.device("cpu"))
    assert "SELECTED triton" in registry.explain("mla_prefill", **x)


def test_split_head_dim():
    assert kernel.split_head_dim(192) == (128, 64)
    assert kernel.split_head_dim(128) == (128, 0)
    assert kernel.split_head_dim(48) == (32, 16)
    assert kernel.split_head_dim(24) == (32, 0)
    assert kernel.split_head_dim(8) == (16, 0)
    for d in range(1, 300):
        da, db = kernel.split_head_dim(d)
        assert da + db >= d and da >= 16 and (db == 0 or db >= 16)


def test_supports_explains_rejection(registry):
    x = SPEC.make_inputs(dict(H=1, Dqk=320, Dv=128, q_lens=[2], prefixes=[0], dtype=torch.float32),
                         torch.Generator().manual_seed(0), torch.device("cpu"))
    text = registry.explain("mla_prefill", **x)
    assert "rejected triton" in text and "Dqk=320" in text, text


def test_compile_targets_are_well_formed():
    targets = kernel.compile_targets()
    assert targets
    for fn, sig, constexprs, options in targets:
        assert set(options) == {"num_warps", "num_stages"}
        assert set(sig) == set(fn.arg_names)
        assert all(sig[k] == "constexpr" for k in constexprs)
