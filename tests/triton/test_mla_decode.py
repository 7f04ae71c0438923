"""Triton mla_decode: conformance on the small grid (interpreter on CPU), the split/combine and
half-latent paths forced on awkward cases, the split planner, and the GPU grid where CUDA exists."""

from __future__ import annotations

import functools
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton kernels are defined (conftest sets it too)

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from tokenspeed_core import KernelImpl  # noqa: E402
from tokenspeed_core.ops.mla_decode import SPEC  # noqa: E402
from tokenspeed_core.testing import check_backend, run_case  # noqa: E402
from tokenspeed_kernels_triton import mla_decode as kernel  # noqa: E402

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETING else "cuda"


def test_conformance_small_grid(registry):
    rep = check_backend("mla_decode", "triton", size="small", device=DEVICE, registry=registry)
    assert rep.ok, rep.format(verbose=True)
    assert sum(r.status == "pass" for r in rep.results) >= len(SPEC.grid("small"))


def _variant(**kw) -> KernelImpl:
    return KernelImpl(op="mla_decode", backend="triton-variant",
                      fn=functools.partial(kernel.mla_decode_triton, **kw))


# Cases where split boundaries fall mid-request and (q_len > 1) a query row sees nothing in the
# last split: the combine must weigh such partial results by exp(-inf) = 0, not NaN.
AWKWARD = [
    dict(B=2, q_len=4, H=16, page_size=64, seqlens=[64, 131], dtype=torch.float32),
    dict(B=3, q_len=1, H=16, page_size=16, seqlens=[17, 1, 32], dtype=torch.bfloat16),
    dict(B=2, q_len=3, H=16, page_size=32, seqlens=[100, 33], dtype=torch.bfloat16,
         cache_dtype=torch.float8_e4m3fn),
]


@pytest.mark.parametrize("splits", [2, 7])
@pytest.mark.parametrize("case", AWKWARD, ids=SPEC.label)
def test_forced_splits(case, splits):
    res = run_case(SPEC, _variant(num_splits=splits), case, DEVICE)
    assert res.status == "pass", res.detail


@pytest.mark.parametrize("config", [kernel.Config(64, 32, 8, 2, dv_halves=True), kernel.Config(64, 64, 8, 2),
                                    kernel.Config(16, 64, 4, 2, transposed=True),
                                    kernel.Config(32, 64, 8, 2, transposed=True)],
                         ids=lambda c: c.describe())
def test_other_tile_configs(config):
    case = dict(B=2, q_len=4, H=16, page_size=64, seqlens=[64, 131], dtype=torch.bfloat16)
    res = run_case(SPEC, _variant(config=config, num_splits=3), case, DEVICE)
    assert res.status == "pass", res.detail


@pytest.mark.parametrize("policy", sorted(kernel.POLICIES))
def test_candidate_policies(policy):
    # the candidate tilings the GPU bench sweeps: q_len 1 x H 16 (16 rows, one split) and 48 rows
    for case, splits in ((dict(B=3, q_len=1, H=16, page_size=16, seqlens=[17, 1, 70], dtype=torch.bfloat16), None),
                         (dict(B=2, q_len=3, H=16, page_size=32, seqlens=[100, 3], dtype=torch.float16), 2)):
        res = run_case(SPEC, _variant(policy=policy, num_splits=splits), case, DEVICE)
        assert res.status == "pass", (policy, res.detail)


def test_transposed_excludes_halves():
    with pytest.raises(ValueError):
        kernel.Config(16, 64, 4, 2, dv_halves=True, transposed=True)


def test_plan_splits_follows_shapes():
    plan = kernel.plan_splits
    # one long request spreads over the whole GPU; a full batch needs no split
    assert plan(1, 1, 65536, 32, 132) >= 66
    assert plan(128, 1, 16384, 32, 132) == 1
    # never more splits than KV tiles, never zero
    assert plan(1, 1, 40, 32, 132) <= 2
    assert plan(0, 1, 4096, 32, 132) == 1
    assert all(plan(b, 1, 4096, 32, 132) >= 1 for b in (1, 3, 17, 200))


def test_supports_explains(registry):
    sig_ok = _signature(registry, D=576, Dv=512)
    assert kernel._supports(sig_ok) is None
    assert "rope width" in kernel._supports(_signature(registry, D=576, Dv=256))


def _signature(registry, D, Dv):
    q = torch.randn(1, 1, 16, D, dtype=torch.bfloat16)
    cache = torch.randn(2, 16, D, dtype=torch.bfloat16)
    call = SPEC.bind(dict(q=q, kv_cache=cache, page_table=torch.zeros(1, 2, dtype=torch.int32),
                          cache_seqlens=torch.ones(1, dtype=torch.int32), softmax_scale=0.1, head_dim_v=Dv))
    return registry.signature(call)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETING, reason="needs a CUDA GPU")
def test_full_grid_gpu(registry):
    rep = check_backend("mla_decode", "triton", size="full", device="cuda", registry=registry)
    assert rep.ok, rep.format(verbose=True)
