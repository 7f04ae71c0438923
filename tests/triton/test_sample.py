"""Triton sample under the CPU interpreter: hash parity with the spec, conformance on the small grid,
filter boundaries, and mutants of the kernel's decisions that the conformance compare must catch."""

from __future__ import annotations

import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton kernels are defined (conftest may set it)

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import tokenspeed_core  # noqa: E402
import tokenspeed_core.ops.sample as sample_op  # noqa: E402
from tokenspeed_core.testing import check_backend, run_case  # noqa: E402
from tokenspeed_kernels_triton import sample as kernel  # noqa: E402

SPEC = sample_op.SPEC
needs_interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="CPU run needs TRITON_INTERPRET=1"
)


@triton.jit
def _hash_probe(seeds_ptr, offsets_ptr, bits_in_ptr, bits_ptr, e_ptr, V, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    idx = tl.arange(0, BLOCK)
    h = kernel._row_key(tl.load(seeds_ptr + row), tl.load(offsets_ptr + row))
    bits = kernel._random_bits(idx, h)
    tl.store(bits_ptr + row * V + idx, bits.to(tl.int64), mask=idx < V)
    given = tl.load(bits_in_ptr + row * V + idx, mask=idx < V, other=0).to(tl.uint32)
    tl.store(e_ptr + row * V + idx, kernel._exponential(given), mask=idx < V)


@needs_interpreter
def test_uint32_hash_and_exponentials_match_the_spec_bit_for_bit():
    seeds = torch.tensor([0, -1, 2**63 - 1, -(2**63), 987654321987, -5], dtype=torch.int64)
    offsets = torch.tensor([0, 2**32 + 1, 7, 2**62, 1, 123456], dtype=torch.int64)
    B, V = len(seeds), 64
    want = sample_op.random_bits(seeds, offsets, V)
    # E over the whole range of u, the ends near 0 and 1 included
    bits_in = torch.randint(0, 2**32, (B, V), generator=torch.Generator().manual_seed(0))
    bits_in[0, :8] = torch.tensor([0, 1, 2**23 - 1, 2**23, 2**24 - 2, 2**24 - 1, 2**23 + 1, 5]) << 8
    bits = torch.empty(B, V, dtype=torch.int64)
    e = torch.empty(B, V, dtype=torch.float32)
    _hash_probe[(B,)](seeds, offsets, bits_in, bits, e, V, BLOCK=V)
    assert torch.equal(bits, want)
    e_ref = sample_op.exponentials(bits_in)
    rel = ((e.double() - e_ref) / e_ref).abs().max().item()
    assert rel < 8 * 2**-24, f"E relative error {rel}"


@needs_interpreter
def test_conformance_small_grid(registry):
    rep = check_backend("sample", "triton", size="small", device="cpu", registry=registry)
    assert rep.ok, rep.format(verbose=True)
    assert sum(r.status == "pass" for r in rep.results) >= len(SPEC.grid("small"))


@needs_interpreter
@pytest.mark.parametrize("case", [
    dict(B=24, V=3000, dtype=torch.bfloat16, mode="filters"),  # several BLOCK chunks per row
    dict(B=16, V=1025, dtype=torch.float16, masked=True),
], ids=SPEC.label)
def test_multi_chunk_rows_agree_exactly(registry, case):
    inputs = SPEC.make_inputs(case, torch.Generator().manual_seed(42), "cpu")
    call = SPEC.bind(inputs)
    out = call.tensors["out"].fill_(-7)
    registry.backend("sample", "triton").fn(**call.kwargs())
    ref = torch.empty_like(out)
    SPEC.reference(**{k: (v.double() if v.is_floating_point() else v) for k, v in inputs.items()}, out=ref)
    assert SPEC.compare("out", out, ref, call) is None
    assert (out == ref).float().mean() > 0.9  # differences are rare float-rounding near-ties


@needs_interpreter
def test_exact_boundaries_match_the_reference(registry):
    """p = [.25, .5, .25, 0]: top-p 0.5 excludes the .25 tokens, min-p 0.5 includes them, top-k ties kept."""
    ln2 = math.log(2)
    B = 16
    x = torch.tensor([-ln2, 0.0, -ln2, float("-inf")]).expand(B, -1).contiguous()
    impl = registry.backend("sample", "triton")
    for f, allowed in [(dict(top_p=0.5), {1}), (dict(min_p=0.5), {0, 1, 2}), (dict(min_p=3.0), {1}),
                       (dict(top_k=2), {0, 1, 2}), (dict(top_k=1, top_p=0.9), {1}),
                       (dict(top_p=0.5 + 2**-20), {0, 1, 2})]:
        args = dict(logits=x, temperature=torch.ones(B), top_k=torch.zeros(B, dtype=torch.int32),
                    top_p=torch.ones(B), min_p=torch.zeros(B), seeds=torch.full((B,), 3),
                    offsets=torch.arange(B))
        for k, v in f.items():
            args[k] = torch.full_like(args[k], v)
        out = torch.full((B,), -1, dtype=torch.int64)
        impl.fn(**args, out=out)
        ref = torch.empty_like(out)
        SPEC.reference(**args, out=ref)
        assert torch.equal(out, ref), f
        assert set(out.tolist()) == allowed, f


@needs_interpreter
@pytest.mark.parametrize("mutant", ["ignore_top_k", "ignore_top_p", "ignore_min_p", "other_seed",
                                    "last_greedy_tie"])
def test_conformance_catches_kernel_mutants(registry, mutant):
    """The compare is not vacuous: the real kernel on tampered inputs fails it."""
    impl = registry.backend("sample", "triton")

    def tampered(logits, temperature, top_k, top_p, min_p, seeds, offsets, out):
        if mutant == "ignore_top_k":
            top_k = torch.zeros_like(top_k)
        elif mutant == "ignore_top_p":
            top_p = torch.ones_like(top_p)
        elif mutant == "ignore_min_p":
            min_p = torch.zeros_like(min_p)
        elif mutant == "other_seed":
            seeds = seeds + 1
        impl.fn(logits, temperature, top_k, top_p, min_p, seeds, offsets, out)
        if mutant == "last_greedy_tie":
            x = logits.float()
            last = (x.shape[1] - 1) - x.flip(1).argmax(1)
            out.copy_(torch.where(temperature <= 0, last, out))

    def focused(case, gen, device):
        # every filter drawn, then all but the one under test turned off, so it alone decides;
        # for the greedy tie rule, coarse logits so the maximum is often shared
        inputs = SPEC.make_inputs(case, gen, device)
        if mutant == "last_greedy_tie":
            inputs["logits"] = (inputs["logits"].float() / 4).round().to(inputs["logits"].dtype)
            return inputs
        for name, off in (("top_k", 0), ("top_p", 1.0), ("min_p", 0.0)):
            if mutant != f"ignore_{name}":
                inputs[name] = torch.full_like(inputs[name], off)
        return inputs

    bad = tokenspeed_core.KernelImpl(op="sample", backend="mutant", fn=tampered, devices=("cpu",))
    spec = SPEC if mutant == "other_seed" else SPEC.with_(make_inputs=focused)
    case = (dict(B=16, V=40, dtype=torch.bfloat16, mode="greedy") if mutant == "last_greedy_tie"
            else dict(B=16, V=200, dtype=torch.float32, mode="filters"))
    results = [run_case(spec, bad, case, "cpu", seed=s) for s in (1, 2)]
    assert any(r.status == "fail" for r in results), [r.detail for r in results]


def test_registration_and_compile_targets(registry):
    impl = registry.backend("sample", "triton")
    assert impl.plugin == "triton" and "cuda" in impl.devices
    targets = kernel.compile_targets()
    assert {e[1]["logits_ptr"] for e in targets if "logits_ptr" in e[1]} == {"*fp32", "*bf16", "*fp16"}
    assert {e[0].__name__ for e in targets} == {"_sample_kernel", "_split_step_kernel", "_split_finish_kernel"}
    for fn, sig, constexprs, *_ in targets:
        assert set(constexprs) <= set(sig) and all(sig[c] == "constexpr" for c in constexprs)
        assert list(sig) == fn.arg_names


def test_path_choice_is_static_in_the_shape():
    """Small batches split rows (B=1..8 at V=129K: ~256 programs); large ones keep a row per program."""
    assert kernel.use_split(1, 129280) and kernel.use_split(16, 129280)
    assert not kernel.use_split(256, 129280) and not kernel.use_split(1, 1000)
    assert kernel.split_plan(1, 129280) == (1024, 1024, 127)
    assert kernel.split_plan(4, 129280) == (1024, 2048, 64)
    assert kernel.split_plan(16, 129280) == (1024, 8192, 16)


@pytest.fixture
def split_small_chunks(monkeypatch):
    """Force the split-row path on the small grid: 128-wide blocks, ~24 programs per call."""
    monkeypatch.setattr(kernel, "SPLIT_BLOCK", 128)
    monkeypatch.setattr(kernel, "SPLIT_PROGRAMS", 24)


@needs_interpreter
def test_conformance_small_grid_split_path(registry, split_small_chunks):
    # B=7 V=1000: 3 chunks of 384/384/232; B=5 V=513: 256/256/1; B=4 V=777: 256 x 3 + 9;
    # B=9 V=4096: 2 chunks; B=1 V=1 and B=3 V=2 stay on the row path (one block per row)
    assert kernel.split_plan(7, 1000) == (128, 384, 3) and kernel.split_plan(5, 513) == (128, 256, 3)
    assert kernel.split_plan(4, 777) == (128, 256, 4)
    assert kernel.use_split(6, 300) and not kernel.use_split(3, 2)
    rep = check_backend("sample", "triton", size="small", device="cpu", registry=registry)
    assert rep.ok, rep.format(verbose=True)
    assert sum(r.status == "pass" for r in rep.results) >= len(SPEC.grid("small"))


@needs_interpreter
@pytest.mark.parametrize("case, block, chunk", [
    (dict(B=1, V=1000, dtype=torch.bfloat16, mode="filters"), 32, 96),  # 11 chunks, the last 40 wide
    (dict(B=2, V=300, dtype=torch.float32, mode="filters"), 16, 48),  # 4 top-k digits, 8 top-p stages
    (dict(B=3, V=777, dtype=torch.float16, masked=True), 32, 64),  # whole chunks of -inf at the tail
], ids=lambda v: SPEC.label(v) if isinstance(v, dict) else str(v))
def test_split_path_chunk_boundaries(case, block, chunk):
    """Split rows cut at awkward places agree with the reference and with the row-per-program path."""
    for seed in (3,) if case["B"] > 1 else (3, 4, 5):
        inputs = SPEC.make_inputs(case, torch.Generator().manual_seed(seed), "cpu")
        call = SPEC.bind(inputs)
        out = call.tensors["out"].fill_(-7)
        kernel.launch(**call.kwargs(), path="split", block=block, chunk=chunk)
        row = torch.full_like(out, -7)
        kernel.launch(**{**call.kwargs(), "out": row}, path="row", block=block)
        ref = torch.empty_like(out)
        SPEC.reference(**{k: (v.double() if v.is_floating_point() else v) for k, v in inputs.items()}, out=ref)
        assert SPEC.compare("out", out, ref, call) is None, seed
        assert torch.equal(out, row), (seed, out, row)  # same math; sums differ only in order


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_top_p_search_range_and_early_stop(registry, dtype):
    """Tied (coarse) logits, top-p with min-p on and off: the search starts where lo and the max key
    differ and stops once min-p decides; both must keep the reference's set."""
    B, V = 16, 700
    gen = torch.Generator().manual_seed(7)
    x = (torch.randn(B, V, generator=gen) * 3).round().div(2).to(dtype)
    args = dict(logits=x, temperature=torch.rand(B, generator=gen) + 0.3,
                top_k=torch.tensor([0, 5, 300, 0] * 4, dtype=torch.int32),
                top_p=torch.tensor([0.99, 0.5, 0.9, 0.2] * 4),
                min_p=torch.tensor([0.0] * 8 + [0.3] * 4 + [0.02] * 4),
                seeds=torch.randint(0, 2**40, (B,), generator=gen), offsets=torch.arange(B))
    out = torch.full((B,), -1, dtype=torch.int64)
    registry.backend("sample", "triton").fn(**args, out=out)
    ref = torch.empty_like(out)
    SPEC.reference(**{k: (v.double() if v.is_floating_point() else v) for k, v in args.items()}, out=ref)
    call = SPEC.bind({**args, "out": out})
    assert SPEC.compare("out", out, ref, call) is None
    assert (out == ref).float().mean() > 0.9


@needs_interpreter
def test_row_path_prefetch_changes_nothing():
    """The row path's prefetched loads (default) and plain loads pick the same tokens."""
    case = dict(B=4, V=700, dtype=torch.bfloat16, mode="filters")
    call = SPEC.bind(SPEC.make_inputs(case, torch.Generator().manual_seed(11), "cpu"))
    outs = []
    for prefetch in (True, False):
        out = torch.full((case["B"],), -7, dtype=torch.int64)
        kernel.launch(**{**call.kwargs(), "out": out}, path="row", block=64, prefetch=prefetch)
        outs.append(out)
    assert torch.equal(outs[0], outs[1]) and (outs[0] >= 0).all()
