"""Triton moe under the CPU interpreter: conformance on the small grid and on a DeepSeek-shaped
case (every expert group, many blocks per expert, a padded last block), the expert-sorted row
layout, and the compile-target list."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton kernels are defined (conftest may set it)

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from tokenspeed_core.ops import moe as moe_spec  # noqa: E402
from tokenspeed_core.testing import check_backend  # noqa: E402
from tokenspeed_kernels_triton import moe  # noqa: E402

needs_interpreter = pytest.mark.interpreter  # skipped unless TRITON_INTERPRET=1 (conftest)


@needs_interpreter
def test_conformance_small_grid(registry):
    rep = check_backend("moe", "triton", size="small", device="cpu", registry=registry)
    assert rep.ok, rep.format(verbose=True)
    assert sum(r.status == "pass" for r in rep.results) >= len(registry.spec("moe").grid("small"))


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shared_width", [24, 40], ids=["shared-own-launch", "shared-in-routed-launch"])
def test_matches_float64_reference_over_many_blocks(dtype, shared_width):
    """40 tokens x top 6 of 32 experts: experts with 0 to 20+ rows (several 16-row blocks, padded
    last blocks), Dm and Dff not multiples of the 32-wide tiles, two shared experts: of another
    width (their own launches) or of the routed width (experts 32 and 33 of the routed launch)."""
    case = dict(T=40, Dm=72, E=32, Dff=40, top_k=6, n_group=8, topk_group=4, S=2, Dffs=shared_width, dtype=dtype)
    args = moe_spec.make_inputs(case, torch.Generator().manual_seed(7), torch.device("cpu"))
    wide = {n: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() and n != "router_logits"
                and n != "e_score_correction_bias" else v) for n, v in args.items()}
    ref = torch.empty((40, 72), dtype=torch.float64)
    moe_spec.reference(**wide, out=ref)
    out = torch.full((40, 72), float("nan"), dtype=dtype)
    moe.moe(**args, out=out)
    atol, rtol = moe_spec.SPEC.tolerance(dtype)
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)


def test_align_rows_groups_rows_by_expert_in_padded_blocks():
    ids = torch.tensor([[3, 0], [3, 1], [0, 3], [3, 2]])  # expert 3 x4, 0 x2, 1 x1, 2 x1
    sorted_rows, block_expert = moe.align_rows(ids, num_experts=5, block_m=2)
    n = ids.numel()
    live = [(int(b), [int(r) for r in sorted_rows[2 * i: 2 * i + 2]]) for i, b in enumerate(block_expert)
            if b >= 0]
    # expert order, token order within an expert, each run padded to the block with n
    assert live == [(0, [1, 4]), (1, [3, n]), (2, [7, n]), (3, [0, 2]), (3, [5, 6])]
    assert all(int(b) == -1 for b in block_expert[len(live):])
    assert sorted_rows.numel() == -(-(n + min(5, n) * 1) // 2) * 2  # rows + (block_m - 1) an expert
    flat = ids.reshape(-1)
    for e, rows in live:  # every row lands in a block of its own expert, once
        assert all(r == n or int(flat[r]) == e for r in rows)
    assert sorted(r for _, rows in live for r in rows if r < n) == list(range(n))


@needs_interpreter
@pytest.mark.parametrize("bound", ["FUSED_MAX_ROWS", "FUSED_MAX_EXPERTS"])
def test_torch_paths_beyond_the_fused_bounds(monkeypatch, bound):
    """Above FUSED_MAX_ROWS the alignment is torch ops fed by the fused routing's int32 ids; above
    FUSED_MAX_EXPERTS the routing is the op's torch code too."""
    monkeypatch.setattr(moe.routing, bound, 16)
    case = dict(T=24, Dm=40, E=16, Dff=24, top_k=4, n_group=4, topk_group=2, S=1, dtype=torch.float32)
    args = moe_spec.make_inputs(case, torch.Generator().manual_seed(3), torch.device("cpu"))
    ref = torch.empty((24, 40))
    moe_spec.reference(**args, out=ref)
    out = torch.full((24, 40), float("nan"))
    moe.moe(**args, out=out)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


@needs_interpreter
@pytest.mark.parametrize("case", [
    dict(T=5, E=256, n_group=8, topk_group=4, top_k=8, S=1),  # DeepSeek-V3
    dict(T=7, E=16, n_group=4, topk_group=2, top_k=4, S=0),
    dict(T=3, E=12, n_group=1, topk_group=1, top_k=2, S=2, norm=False),  # one group, 12 (not 2^k) experts
    dict(T=4, E=8, n_group=8, topk_group=3, top_k=3, S=1),  # groups of one expert
], ids=["deepseek", "e16", "one-group", "groups-of-one"])
def test_route_kernel_matches_the_op_routing(case):
    """The fused routing kernel: the op's experts in the op's (descending) order, its weights, then
    the shared experts as experts E.. of weight 1."""
    gen = torch.Generator().manual_seed(case["T"] * 31 + case["E"])
    T, E, S = case["T"], case["E"], case["S"]
    logits = torch.randn(T, E, generator=gen) * 2.0
    bias = torch.randn(E, generator=gen) * 0.3
    norm = case.get("norm", True)
    ids, weights = moe.route_with_shared(logits, bias, case["top_k"], case["n_group"], case["topk_group"], 2.5,
                                         norm, E, S)
    ref_ids, ref_w = moe_spec.route(logits, bias, case["top_k"], case["n_group"], case["topk_group"], 2.5, norm)
    assert ids.dtype == torch.int32 and ids.shape == (T, case["top_k"] + S)
    assert torch.equal(ids[:, :case["top_k"]].long(), ref_ids)
    torch.testing.assert_close(weights[:, :case["top_k"]], ref_w, rtol=1e-6, atol=1e-6)
    assert torch.equal(ids[:, case["top_k"]:].long(), (E + torch.arange(S)).expand(T, S))
    assert torch.equal(weights[:, case["top_k"]:], torch.ones(T, S))


@needs_interpreter
@pytest.mark.parametrize("rows,experts,block_m", [(9, 257, 16), (40, 12, 16), (300, 33, 64), (1, 1, 16)])
def test_align_kernel_matches_the_torch_layout(rows, experts, block_m):
    """One-program alignment == the torch version, slot for slot (experts with 0, 1 and several
    blocks of rows; a block size above some experts' counts; a single row)."""
    gen = torch.Generator().manual_seed(rows + experts)
    ids = torch.randint(0, experts, (rows,), generator=gen)
    ids[: rows // 3] = experts - 1  # one expert with many rows (several blocks)
    fused = moe.align_rows(ids, experts, block_m)
    for dtype in (torch.int64, torch.int32):  # the op's routing gives int64, the fused routing int32
        torch_ = moe.align_rows_torch(ids.to(dtype), experts, block_m)
        assert torch.equal(fused[0], torch_[0]) and torch.equal(fused[1], torch_[1])


def test_compile_targets_cover_every_kernel():
    names = {fn.__name__ for fn, *_ in moe.compile_targets()}
    assert names == {"moe_up_kernel", "moe_down_kernel", "route_kernel", "align_kernel"}


def test_rank_follows_the_gpu_verification_flag(registry):
    """Below the reference while never run on a GPU, at its band since (the flag is False now)."""
    triton_impl, ref = registry.backend("moe", "triton"), registry.backend("moe", "reference")
    assert moe.NOT_YET_ON_GPU == (triton_impl.priority < ref.priority)
    assert "not yet run on a GPU" in triton_impl.status or not moe.NOT_YET_ON_GPU
