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


def test_compile_targets_cover_both_kernels():
    names = {fn.__name__ for fn, *_ in moe.compile_targets()}
    assert names == {"moe_up_kernel", "moe_down_kernel"}


def test_rank_follows_the_gpu_verification_flag(registry):
    """Below the reference while never run on a GPU, at its band since (the flag is False now)."""
    triton_impl, ref = registry.backend("moe", "triton"), registry.backend("moe", "reference")
    assert moe.NOT_YET_ON_GPU == (triton_impl.priority < ref.priority)
    assert "not yet run on a GPU" in triton_impl.status or not moe.NOT_YET_ON_GPU
