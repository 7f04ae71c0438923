"""Differential test: the C++ scheduler and the Python reference produce identical plans
(page ids, rows, deltas, tokens) and identical finishes on the same random workloads."""

from __future__ import annotations

import pytest
from reference_scheduler import ReferenceScheduler
from scheduler_driver import WorkloadDriver

from tokenspeed.scheduler import Scheduler

CONFIGS = [
    dict(page_size=4, num_pages=48, max_batch_tokens=32, max_batch_size=6, num_draft_slots=0),
    dict(page_size=4, num_pages=40, max_batch_tokens=24, max_batch_size=4, num_draft_slots=2),
    dict(page_size=1, num_pages=150, max_batch_tokens=16, max_batch_size=8, num_draft_slots=0),
    dict(page_size=16, num_pages=24, max_batch_tokens=64, max_batch_size=3, num_draft_slots=1),
]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "ps{page_size}-np{num_pages}-k{num_draft_slots}".format(**c))
def test_cpp_matches_reference(config, seed):
    cpp = WorkloadDriver(Scheduler(**config), seed, check_kv=False)
    ref = WorkloadDriver(ReferenceScheduler(**config), seed, check_kv=False)
    for driver in (cpp, ref):
        driver.run(3000, check_every=500)
        driver.drain()
    assert len(cpp.plans) == len(ref.plans)
    for i, (a, b) in enumerate(zip(cpp.plans, ref.plans, strict=True)):
        assert a == b, f"plans differ at step {i}:\nC++: {a}\nref: {b}"
    assert cpp.finished == ref.finished
    assert cpp.sched.stats() == ref.sched.stats()
