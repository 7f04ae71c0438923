"""Registry: selection by priority and requirements, caching per signature, explain, overrides."""

from __future__ import annotations

import pytest
import torch

import tokenspeed_core as tc
from tokenspeed_core import KernelSelectionError, Priority, use_backend
from tokenspeed_core.ops import mla_decode as mla


@pytest.fixture
def reg():
    return tc.build_registry(entry_points=False)


@pytest.fixture
def args():
    case = dict(B=2, q_len=1, H=4, page_size=16, seqlens=[5, 17], dtype=torch.float32, D=72, Dv=64)
    return mla.SPEC.make_inputs(case, torch.Generator().manual_seed(1), "cpu")


def _recorder(calls: list, name: str):
    def fn(**kw):
        calls.append(name)
        mla.reference(**kw)
    return fn


def test_highest_priority_supporting_impl_wins(reg, args):
    calls: list[str] = []
    with reg.registering_as("t"):
        reg.register("mla_decode", _recorder(calls, "low"), backend="low", priority=Priority.PORTABLE)
        reg.register("mla_decode", _recorder(calls, "high"), backend="high", priority=Priority.PLUGIN,
                     supports=lambda sig: "H must be 128" if sig.dim("H") != 128 else None)
    reg.call("mla_decode", **args)
    assert calls == ["low"]  # high rejected by supports, low beats reference
    text = reg.explain("mla_decode", **args)
    assert "rejected high" in text and "H must be 128" in text
    assert "SELECTED low" in text and "ok       reference" in text


def test_device_capability_and_dtype_requirements_explained(reg, args):
    with reg.registering_as("t"):
        reg.register("mla_decode", mla.reference, backend="gpu_only", devices=("cuda",), priority=300)
        reg.register("mla_decode", mla.reference, backend="hopper", devices=("cpu", "cuda"),
                     capability=((9, 0), (9, 0)), priority=300)
        reg.register("mla_decode", mla.reference, backend="bf16", dtypes=(torch.bfloat16,), priority=300)
    text = reg.explain("mla_decode", **args)
    assert "device cpu not in ['cuda']" in text
    assert "needs a CUDA compute capability" in text
    assert "q dtype fp32 not in ['bf16']" in text
    call = reg.spec("mla_decode").bind(args)
    sig = reg.spec("mla_decode").signature(call, (10, 0))
    hopper = reg.backend("mla_decode", "hopper")
    assert "sm_100 > supported sm_90" in hopper.reject_reason(sig, "q")
    sig90 = reg.spec("mla_decode").signature(call, (9, 0))
    assert hopper.reject_reason(sig90, "q") is None


def test_selection_cached_per_signature(reg, args):
    seen = []

    def supports(sig):
        seen.append(sig)
        return None

    with reg.registering_as("t"):
        reg.register("mla_decode", mla.reference, backend="x", supports=supports, priority=200)
    for _ in range(3):
        reg.call("mla_decode", **args)
    assert len(seen) == 1
    # a different static dim (H) is a new signature; a different batch size is not
    args2 = mla.SPEC.make_inputs(dict(B=5, q_len=1, H=4, page_size=16, seqlen=9, dtype=torch.float32, D=72, Dv=64),
                                 torch.Generator().manual_seed(2), "cpu")
    reg.call("mla_decode", **args2)
    assert len(seen) == 1
    args3 = mla.SPEC.make_inputs(dict(B=2, q_len=1, H=8, page_size=16, seqlen=9, dtype=torch.float32, D=72, Dv=64),
                                 torch.Generator().manual_seed(3), "cpu")
    reg.call("mla_decode", **args3)
    assert len(seen) == 2


def test_env_and_context_overrides(reg, args, monkeypatch):
    calls: list[str] = []
    with reg.registering_as("t"):
        reg.register("mla_decode", _recorder(calls, "a"), backend="a", priority=200)
        reg.register("mla_decode", _recorder(calls, "b"), backend="b", priority=100)
    reg.call("mla_decode", **args)
    monkeypatch.setenv("TOKENSPEED_KERNEL_MLA_DECODE", "b")
    reg.call("mla_decode", **args)
    with use_backend(mla_decode="a"):  # the context manager wins over the environment
        reg.call("mla_decode", **args)
    assert calls == ["a", "b", "a"]
    assert "forced: b by TOKENSPEED_KERNEL_MLA_DECODE" in reg.explain("mla_decode", **args)


def test_forced_backend_that_cannot_run_is_an_error(reg, args):
    with reg.registering_as("t"):
        reg.register("mla_decode", mla.reference, backend="cuda_only", devices=("cuda",))
    with use_backend(mla_decode="cuda_only"), pytest.raises(KernelSelectionError, match="cannot run this call"):
        reg.call("mla_decode", **args)
    with use_backend(mla_decode="nope"), pytest.raises(KernelSelectionError, match="'nope' .* not registered"):
        reg.call("mla_decode", **args)


def test_supports_that_raises_is_a_rejection_not_a_crash(reg, args):
    with reg.registering_as("t"):
        reg.register("mla_decode", mla.reference, backend="buggy", priority=400,
                     supports=lambda sig: 1 / 0)
    assert "supports() raised ZeroDivisionError" in reg.explain("mla_decode", **args)
    reg.call("mla_decode", **args)  # falls to the reference


def test_duplicate_backend_and_unknown_op_rejected(reg):
    with pytest.raises(ValueError, match="already has a backend named 'reference'"):
        reg.register("mla_decode", mla.reference, backend="reference")
    with pytest.raises(KeyError, match="unknown op 'nope'"):
        reg.register("nope", mla.reference, backend="x")


def test_unavailable_impl_listed_with_reason(reg, args):
    with reg.registering_as("t"):
        reg.register("mla_decode", mla.reference, backend="cute", priority=300, unavailable="package X missing")
    assert "unavailable: package X missing" in reg.explain("mla_decode", **args)


def test_rank_lowers_priority_per_signature_without_refusing(reg, args):
    calls: list[str] = []
    with reg.registering_as("t"):
        reg.register("mla_decode", _recorder(calls, "special"), backend="special", priority=300,
                     rank=lambda sig: 300 if sig.dim("H") >= 64 else 50)
        reg.register("mla_decode", _recorder(calls, "portable"), backend="portable", priority=100)
    reg.call("mla_decode", **args)  # H=4: special steps down below portable
    with use_backend(mla_decode="special"):  # but can still be forced
        reg.call("mla_decode", **args)
    assert calls == ["portable", "special"]
    assert "prio 50" in reg.explain("mla_decode", **args)
