"""Plan/run: validate and select once (``Registry.plan``), then run with only a guard check."""

from __future__ import annotations

import math
import threading

import pytest
import torch

import tokenspeed_core as tc
from tokenspeed_core import ArgumentError, KernelSelectionError, OpPlan, Priority, use_backend
from tokenspeed_core._spec import OpSpec
from tokenspeed_core.ops import all_specs
from tokenspeed_core.ops import mla_decode as mla

OPS = [s.name for s in all_specs()]


@pytest.fixture
def reg():
    return tc.build_registry(entry_points=False)


def _mla_args(B=2, seed=1, **extra):
    case = dict(B=B, q_len=2, H=4, page_size=16, seqlens=[5, 17, 33][:B], dtype=torch.float32, D=72, Dv=64)
    args = mla.SPEC.make_inputs(case, torch.Generator().manual_seed(seed), "cpu")
    args["head_dim_v"] = 64
    args.update(extra)
    return args


def _recorder(seen: list, name: str):
    def fn(**kw):
        seen.append((name, kw))
        mla.reference(**kw)
    return fn


def _inputs(spec: OpSpec, seed: int) -> dict:
    case = spec.grid("small")[1]  # an awkward but not minimal case of every op
    return spec.make_inputs(case, torch.Generator().manual_seed(seed), "cpu")


def _clone(args: dict) -> dict:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in args.items()}


def _poisoned_outputs(spec: OpSpec, args: dict) -> dict:
    """Outputs to pass, filled with values no kernel writes (NaN, or -1 for integers)."""
    call = spec.bind(args)
    outs = {}
    for role in spec.outputs:
        t = call.tensors[role.name]
        if t is None or role.inout:
            continue
        outs[role.name] = torch.full_like(t, math.nan if t.is_floating_point() else -1)
    return outs


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def _same(a, b) -> bool:
    a, b = _as_tuple(a), _as_tuple(b)
    return len(a) == len(b) and all(
        (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
        for x, y in zip(a, b, strict=True)
    )


# -- run() computes what call() computes ---------------------------------------------------------
@pytest.mark.parametrize("op", OPS)
def test_run_matches_call_for_every_op(reg, op):
    spec = reg.spec(op)
    example = _inputs(spec, seed=1)
    example.update(_poisoned_outputs(spec, example))
    plan = reg.plan(op, **example)
    assert isinstance(plan, OpPlan) and plan.backend == "reference"
    # new values of the planned shapes (fresh random data, poisoned outputs): values are free
    fresh = _inputs(spec, seed=2)
    fresh.update(_poisoned_outputs(spec, fresh))
    by_call, by_run = _clone(fresh), _clone(fresh)
    expect = reg.call(op, **by_call)
    got = plan.run(**by_run)
    assert type(got) is type(expect)
    assert _same(expect, got), f"{op}: plan.run differs from call"
    # the outputs returned are the tensors passed in (destination passing), as call() returns
    for role, t in zip(spec.outputs, _as_tuple(got), strict=True):
        if t is not None:
            assert t is by_run[role.name]


@pytest.mark.parametrize("op", ["mla_decode", "rms_norm", "silu_and_mul", "rope"])
def test_run_allocates_outputs_not_passed(reg, op):
    spec = reg.spec(op)
    example = _inputs(spec, seed=3)
    plan = reg.plan(op, **example)
    a, b = plan.run(**example), plan.run(**example)
    assert _same(reg.call(op, **example), a)
    # a fresh allocation per run: a later run must not overwrite what an earlier one returned
    assert all(x is None or x.data_ptr() != y.data_ptr() for x, y in zip(_as_tuple(a), _as_tuple(b),
                                                                           strict=True))


def test_run_passes_the_kernel_what_call_passes(reg):
    seen: list = []
    with reg.registering_as("t"):
        reg.register("mla_decode", _recorder(seen, "rec"), backend="rec", priority=Priority.PLUGIN)
    args = _mla_args(softmax_scale=0.125)
    plan = reg.plan("mla_decode", **args)
    assert seen == []  # planning runs nothing
    reg.call("mla_decode", **args)
    plan.run(**{**args, "softmax_scale": 1})  # an int for a float param: coerced as call() does
    (_, by_call), (_, by_run) = seen
    assert by_call.keys() == by_run.keys()
    assert type(by_run["softmax_scale"]) is float and by_run["softmax_scale"] == 1.0
    for name in ("head_dim_v", "kv_scale"):
        assert by_run[name] == by_call[name] and type(by_run[name]) is type(by_call[name])
    assert by_run["q"] is args["q"]


def test_defaults_not_passed_to_plan_are_filled_in(reg):
    seen: list = []
    with reg.registering_as("t"):
        reg.register("mla_decode", _recorder(seen, "rec"), backend="rec", priority=Priority.PLUGIN)
    args = _mla_args()
    del args["kv_scale"]  # default 1.0
    reg.plan("mla_decode", **args).run(**args)
    assert seen[0][1]["kv_scale"] == 1.0


# -- the guard ------------------------------------------------------------------------------------
def _err(plan: OpPlan, **kwargs) -> ArgumentError:
    with pytest.raises(ArgumentError) as info:
        plan.run(**kwargs)
    assert "make a new plan" in str(info.value) or "unknown argument" in str(info.value)
    return info.value


def test_guard_shape(reg):
    args = _mla_args(B=2)
    plan = reg.plan("mla_decode", **args)
    other = _mla_args(B=3)  # a batch of 3: a new shape of q, page_table, cache_seqlens
    e = _err(plan, **other)
    assert e.arg == "q" and "planned shape (2, 2, 4, 72), got (3, 2, 4, 72); make a new plan" in str(e)
    # the dims that are dynamic by design are pinned too: a cache with more pages is a new plan
    bigger = torch.cat([args["kv_cache"], args["kv_cache"][:1]])
    e = _err(plan, **{**args, "kv_cache": bigger})
    pages = args["kv_cache"].shape[0]
    assert e.arg == "kv_cache" and f"planned shape ({pages}, 16, 72), got ({pages + 1}, 16, 72)" in str(e)


def test_guard_dtype(reg):
    args = _mla_args()
    plan = reg.plan("mla_decode", **args)
    e = _err(plan, **{**args, "q": args["q"].to(torch.bfloat16)})
    assert e.arg == "q" and "planned dtype fp32, got bf16" in str(e)


def test_guard_device(reg):
    args = _mla_args()
    plan = reg.plan("mla_decode", **args)
    e = _err(plan, **{**args, "cache_seqlens": args["cache_seqlens"].to("meta")})
    assert e.arg == "cache_seqlens" and "planned device cpu, got meta" in str(e)


def test_guard_contiguity(reg):
    args = _mla_args()
    plan = reg.plan("mla_decode", **args)
    q = args["q"]
    strided = q.transpose(2, 3).contiguous().transpose(2, 3)  # same shape and values, other strides
    assert strided.shape == q.shape and not strided.is_contiguous()
    e = _err(plan, **{**args, "q": strided})
    assert e.arg == "q" and "planned a contiguous tensor, got strides" in str(e)
    # what bind() accepts, run() accepts: a contiguous tensor whose size-1 dim has an odd stride
    one = _mla_args(B=1)
    plan1 = reg.plan("mla_decode", **one)
    q1 = torch.empty(2 * 2 * 4 * 72).as_strided((1, 2, 4, 72), (999, 4 * 72, 72, 1))
    q1.copy_(one["q"])
    assert q1.is_contiguous() and q1.stride() != one["q"].stride()
    assert _same(plan1.run(**{**one, "q": q1}), reg.call("mla_decode", **one))


def test_guard_not_a_tensor(reg):
    args = _mla_args()
    plan = reg.plan("mla_decode", **args)
    e = _err(plan, **{**args, "page_table": args["page_table"].tolist()})
    assert e.arg == "page_table" and "planned a tensor of shape (2, 3), got list" in str(e)


def test_guard_missing_and_extra_arguments(reg):
    args = _mla_args()
    plan = reg.plan("mla_decode", **args)
    e = _err(plan, **{k: v for k, v in args.items() if k != "kv_scale"})
    assert e.arg == "kv_scale" and "was passed to plan() and is missing" in str(e)
    out = torch.empty(2, 2, 4, 64)
    e = _err(plan, **args, out=out)
    assert e.arg == "out" and "was not passed to plan()" in str(e)
    e = _err(plan, **args, bogus=1)
    assert e.arg == "bogus" and "unknown argument" in str(e)


def test_guard_none_stays_none(reg):
    from tokenspeed_core.ops import rms_norm

    spec = rms_norm.SPEC
    args = spec.make_inputs(dict(T=3, N=8, dtype=torch.float32), torch.Generator().manual_seed(0), "cpu")
    plan = reg.plan("rms_norm", **args, residual=None, out=None)
    e = _err(plan, **args, residual=torch.randn(3, 8), out=None)
    assert e.arg == "residual" and "planned None (not given), got a tensor of shape (3, 8)" in str(e)
    e = _err(plan, **args, residual=None, out=torch.empty(3, 8))
    assert e.arg == "out" and "planned None (allocated by each run)" in str(e)
    out, residual_out = plan.run(**args, residual=None, out=None)
    assert residual_out is None and torch.equal(out, reg.call("rms_norm", **args)[0])


def test_guard_static_param(reg):
    args = _mla_args()
    plan = reg.plan("mla_decode", **args)
    e = _err(plan, **{**args, "head_dim_v": 32})
    assert e.arg == "head_dim_v"
    assert "planned 64 (a static param: part of the kernel choice), got 32; make a new plan" in str(e)
    with pytest.raises(ArgumentError, match="expected int, got float 64.0"):  # call()'s error
        plan.run(**{**args, "head_dim_v": 64.0})  # equal, but bind() refuses a float


def test_non_static_scalars_are_checked_as_call_checks_them(reg):
    args = _mla_args()
    plan = reg.plan("mla_decode", **args)
    plan.run(**{**args, "softmax_scale": 0.5})  # may change between runs
    for name, bad, text in [("softmax_scale", math.nan, "expected a finite float"),
                            ("kv_scale", -1.0, "expected > 0"),
                            ("softmax_scale", "0.1", "expected float")]:
        with pytest.raises(ArgumentError, match=text) as by_call:
            reg.call("mla_decode", **{**args, name: bad})
        with pytest.raises(ArgumentError, match=text) as by_run:
            plan.run(**{**args, name: bad})
        assert by_run.value.arg == by_call.value.arg == name


def test_plan_validates_the_example_as_call_does(reg):
    args = _mla_args()
    args["page_table"] = args["page_table"].to(torch.int64)
    with pytest.raises(ArgumentError) as by_call:
        reg.call("mla_decode", **args)
    with pytest.raises(ArgumentError) as by_plan:
        reg.plan("mla_decode", **args)
    assert str(by_plan.value) == str(by_call.value)


# -- selection ------------------------------------------------------------------------------------
def test_forced_backend_honoured_at_plan_time_and_pinned(reg, monkeypatch):
    seen: list = []
    with reg.registering_as("t"):
        reg.register("mla_decode", _recorder(seen, "a"), backend="a", priority=200)
        reg.register("mla_decode", _recorder(seen, "b"), backend="b", priority=100)
    args = _mla_args()
    assert reg.plan("mla_decode", **args).backend == "a"
    with use_backend(mla_decode="b"):
        forced = reg.plan("mla_decode", **args)
    assert forced.backend == "b"
    forced.run(**args)  # outside the block: the plan keeps its choice
    monkeypatch.setenv("TOKENSPEED_KERNEL_MLA_DECODE", "reference")
    assert reg.plan("mla_decode", **args).backend == "reference"
    forced.run(**args)
    assert [name for name, _ in seen] == ["b", "b"]


def test_forced_backend_errors_are_those_of_call(reg):
    with reg.registering_as("t"):
        reg.register("mla_decode", mla.reference, backend="cuda_only", devices=("cuda",))
    args = _mla_args()
    for forced, text in [("cuda_only", "cannot run this call"), ("nope", "'nope' .* not registered")]:
        with use_backend(mla_decode=forced):
            with pytest.raises(KernelSelectionError, match=text) as by_call:
                reg.call("mla_decode", **args)
            with pytest.raises(KernelSelectionError, match=text) as by_plan:
                reg.plan("mla_decode", **args)
        assert str(by_plan.value) == str(by_call.value)


def test_supports_rejection_and_rank_as_in_select(reg):
    with reg.registering_as("t"):
        reg.register("mla_decode", mla.reference, backend="big_h", priority=400,
                     supports=lambda sig: None if sig.dim("H") >= 64 else "H < 64")
        reg.register("mla_decode", mla.reference, backend="ranked", priority=300,
                     rank=lambda sig: 50)
        reg.register("mla_decode", mla.reference, backend="portable", priority=100)
    args = _mla_args()
    plan = reg.plan("mla_decode", **args)
    assert plan.backend == "portable"
    assert plan.backend == reg.select(reg.spec("mla_decode").bind(args)).backend


def test_plan_keeps_working_when_plugins_register_later(reg):
    seen: list = []
    with reg.registering_as("early"):
        reg.register("mla_decode", _recorder(seen, "early"), backend="early", priority=200)
    args = _mla_args()
    plan = reg.plan("mla_decode", **args)
    with reg.registering_as("late"):
        reg.register("mla_decode", _recorder(seen, "late"), backend="late", priority=400)
    plan.run(**args)
    reg.call("mla_decode", **args)
    assert "SELECTED late" in plan.explain()
    assert "registry changed since planning: a new plan would run late" in plan.explain()
    assert "plan: runs early (plugin early)" in plan.explain()
    reg.unregister_plugin("early")
    plan.run(**args)  # still pinned to its implementation
    assert [name for name, _ in seen] == ["early", "late", "early"]


def test_explain(reg):
    with reg.registering_as("t"):
        reg.register("mla_decode", mla.reference, backend="fast", priority=200,
                     supports=lambda sig: "page size must be 64" if sig.dim("PS") != 64 else None)
        reg.register("mla_decode", mla.reference, backend="other", priority=100)
    args = _mla_args()
    with use_backend(mla_decode="reference"):
        plan = reg.plan("mla_decode", **args)
    text = plan.explain()  # explained outside the block: shows the selection as it was made
    assert text.startswith(plan.signature.describe())
    assert "(forced: reference by use_backend())" in text.splitlines()[0]
    assert "rejected fast" in text and "page size must be 64" in text
    assert "rejected other" in text and "not the forced backend 'reference'" in text
    assert "SELECTED reference" in text and "registry changed" not in text
    assert "plan: runs reference (plugin reference)" in text
    assert "q: shape (2, 2, 4, 72) fp32 on cpu, contiguous" in text
    assert "out: not passed; each run allocates (2, 2, 4, 64) fp32 on cpu" in text
    assert "head_dim_v = 64 (static)" in text and "softmax_scale: any valid value" in text
    assert repr(plan).startswith("OpPlan(mla_decode -> reference, mla_decode[cpu;")


# -- run() does none of call()'s per-call work -----------------------------------------------------
def test_run_does_not_bind_sign_or_select(reg, monkeypatch):
    args = _mla_args()
    plan = reg.plan("mla_decode", **args)
    expect = reg.call("mla_decode", **args)

    def forbidden(*a, **k):
        raise AssertionError("called by run()")

    for cls, name in [(OpSpec, "bind"), (OpSpec, "signature"), (tc.Registry, "select"),
                      (tc.Registry, "candidates")]:
        monkeypatch.setattr(cls, name, forbidden)
    assert _same(plan.run(**args), expect)
    with pytest.raises(AssertionError, match="called by run"):
        reg.call("mla_decode", **args)  # the patch is live: call() would have tripped it


def test_public_plan_uses_the_process_registry(reg, monkeypatch):
    monkeypatch.setattr(tc, "_registry", reg)
    args = _mla_args()
    plan = tc.plan("mla_decode", **args)
    assert plan.backend == "reference"
    assert _same(plan.run(**args), reg.call("mla_decode", **args))


def test_one_plan_runs_from_several_threads(reg):
    args = _mla_args()
    plan = reg.plan("mla_decode", **args)
    expect = reg.call("mla_decode", **args)
    bad: list = []

    def worker():
        for _ in range(10):
            if not _same(plan.run(**args), expect):
                bad.append(1)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad
