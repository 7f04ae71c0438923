"""Hypothesis property tests: >= 100,000 random events through the real C++ scheduler.

Few examples, long event sequences (a seeded driver per example): hypothesis picks the pool
geometry, budget, draft slots and seed. After every event: check_invariants() (every page free
xor owned xor idle-cached, refcounts equal holders, cache links sound) and, on every admission,
the driver's fake KV store proves each reported hit is exactly the request's own prefix.
After draining, nothing leaks: no page is owned, every page is free or idle-cached.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scheduler_driver import WorkloadDriver

from tokenspeed.scheduler import Scheduler

EXAMPLES = 10
EVENTS_PER_EXAMPLE = 10_000  # 10 x 10,000 = 100,000 events
_events_run = []


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(
    page_size=st.sampled_from([1, 2, 4, 8, 16]),
    pool_tokens=st.integers(200, 640),
    max_batch_tokens=st.integers(8, 96),
    max_batch_size=st.integers(1, 12),
    num_draft_slots=st.integers(0, 3),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_events_keep_invariants(page_size, pool_tokens, max_batch_tokens, max_batch_size,
                                       num_draft_slots, seed):
    max_batch_tokens = max(max_batch_tokens, 1 + num_draft_slots)
    sched = Scheduler(page_size=page_size, num_pages=max(pool_tokens // page_size, 1),
                      max_batch_tokens=max_batch_tokens, max_batch_size=max_batch_size,
                      num_draft_slots=num_draft_slots)
    driver = WorkloadDriver(sched, seed, max_prompt=120, max_new=24)
    driver.run(EVENTS_PER_EXAMPLE)
    _events_run.append(EVENTS_PER_EXAMPLE)
    driver.drain()
    stats = sched.stats()
    assert stats.owned_pages == 0, "pages leaked after every request finished"
    assert stats.free_pages + stats.cached_idle_pages == stats.num_pages
    assert stats.num_running == 0 and stats.num_waiting == 0
    assert stats.cached_prompt_tokens <= stats.prompt_tokens


def test_property_run_covered_100k_events():
    # Runs after the property test in file order; guards against someone shrinking the budget.
    assert EXAMPLES * EVENTS_PER_EXAMPLE >= 100_000
    if _events_run:
        assert sum(_events_run) >= 100_000
