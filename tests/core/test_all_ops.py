"""Every op family defined by the core: its grid, generator, cost model and validation hold together.

The reference run through the conformance kit must pass its own small grid (catches a generator
that produces invalid calls, a tolerance table missing a dtype, a grid case the spec rejects), and
malformed calls must raise ArgumentError naming the argument for every op.
"""

from __future__ import annotations

import math

import pytest
import torch

import tokenspeed_core as tc
from tokenspeed_core.ops import OP_MODULES, all_specs
from tokenspeed_core.testing import check_impl, run_bad_inputs

REG = tc.build_registry(entry_points=False)
SPECS = {s.name: s for s in all_specs()}


def test_every_listed_op_family_is_defined():
    assert set(SPECS) == set(OP_MODULES)


@pytest.mark.parametrize("op", sorted(SPECS))
def test_reference_conforms_on_its_small_grid(op):
    report = check_impl(REG.backend(op, "reference"), registry=REG, size="small", device="cpu",
                        bad_inputs=False)
    assert report.ok, report.format()


@pytest.mark.parametrize("op", sorted(SPECS))
def test_bad_inputs_raise_argument_error_naming_the_argument(op):
    spec = SPECS[op]
    case = spec.grid("small")[0]
    results = run_bad_inputs(spec, REG.backend(op, "reference"), REG, torch.device("cpu"), case, seed=3)
    kinds = {r.label.split()[-1] for r in results}
    assert {"fp64", "dim", "non-contiguous", "meta"} & kinds, kinds  # dtype, rank, layout, device
    failed = [f"{r.label}: {r.detail}" for r in results if r.status != "pass"]
    assert not failed, "\n".join(failed)


@pytest.mark.parametrize("op", sorted(SPECS))
def test_cost_model_is_positive_and_finite(op):
    spec = SPECS[op]
    case = next(c for c in spec.grid("small") if c.get("B", c.get("T", 1)) != 0)
    args = spec.make_inputs(case, torch.Generator().manual_seed(0), "cpu")
    cost = spec.cost(spec.bind(args))
    assert math.isfinite(cost.flops) and cost.flops >= 0
    assert math.isfinite(cost.bytes) and cost.bytes > 0


@pytest.mark.parametrize("op", sorted(SPECS))
def test_inputs_are_random_not_zero(op):
    spec = SPECS[op]
    for case in spec.grid("small"):  # the first case with non-empty floating inputs
        a = spec.make_inputs(case, torch.Generator().manual_seed(0), "cpu")
        floats = [k for k, v in a.items() if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel()]
        if floats:
            break
    assert floats, "no floating input to check"
    b = spec.make_inputs(case, torch.Generator().manual_seed(1), "cpu")
    for k in floats:
        assert a[k].float().abs().sum() > 0, f"{k} is all zeros"
    assert any(not torch.equal(a[k], b[k]) for k in floats), "seed does not change the inputs"
