"""The Python binding: plans as numpy arrays, typed errors carrying the C++ text, the protocol."""

from __future__ import annotations

import numpy as np
import pytest

from tokenspeed.scheduler import (
    CapacityError,
    InvalidArgumentError,
    Plan,
    ProtocolError,
    Scheduler,
    SchedulerError,
    UnknownRequestError,
)


def _serve(sched: Scheduler, token: int = 7, max_steps: int = 10_000) -> list:
    """Runs steps until nothing is left; samples `token` everywhere."""
    done = []
    for _ in range(max_steps):
        plan = sched.step()
        if plan.num_entries == 0 and sched.stats().num_waiting == 0:
            return done
        done += sched.commit(plan, np.full(int(plan.sample.sum()), token, dtype=np.int32))
        assert sched.check_invariants() == "OK"
    raise AssertionError("did not drain")


def test_plan_arrays_are_int32_numpy_and_chunked_prefill():
    s = Scheduler(page_size=4, num_pages=32, max_batch_tokens=8, max_batch_size=4)
    rid = s.submit(np.arange(10), max_new_tokens=2)
    plan = s.step()
    assert isinstance(plan, Plan)
    for name in ("req_ids", "rows", "query_start", "input_tokens", "positions", "append_pages"):
        arr = getattr(plan, name)
        assert isinstance(arr, np.ndarray) and arr.dtype == np.int32
    assert plan.req_ids.tolist() == [rid] and plan.query_lens.tolist() == [8]  # chunk = budget
    assert plan.sample.tolist() == [0]
    assert plan.new_rows.tolist() == [0] and plan.append_slots.tolist() == [0, 1]
    assert s.commit(plan, []) == []
    plan = s.step()
    assert plan.input_tokens.tolist() == [8, 9] and plan.positions.tolist() == [8, 9]
    assert plan.sample.tolist() == [1] and plan.append_slots.tolist() == [2]  # only the new page
    s.commit(plan, [5])
    plan = s.step()  # a decode: one token, no page-table delta at all
    assert plan.input_tokens.tolist() == [5]
    assert len(plan.append_pages) == 0 and len(plan.new_rows) == 0
    finished = s.commit(plan, [6])
    assert [(f.req_id, f.reason) for f in finished] == [(rid, "length")]
    plan = s.step()
    assert plan.truncate_rows.tolist() == [0] and plan.truncate_lens.tolist() == [0]  # row freed


def test_plan_survives_next_step():
    s = Scheduler(page_size=4, num_pages=32, max_batch_tokens=64, max_batch_size=4)
    s.submit([1, 2, 3], 5)
    first = s.step()
    kept = first.input_tokens.copy()
    s.commit(first, [9])
    s.step()
    assert first.input_tokens.tolist() == kept.tolist()  # our arrays are private copies


def test_prefix_reuse_next_turn_misses_at_most_one_page():
    ps = 16
    s = Scheduler(page_size=ps, num_pages=256, max_batch_tokens=256, max_batch_size=8)
    history = list(np.random.default_rng(0).integers(0, 1000, size=200))
    for turn in range(5):
        s.submit(history, max_new_tokens=20)
        before = s.stats().cached_prompt_tokens
        reply = []
        while True:
            plan = s.step()
            toks = [1000 + turn * 100 + len(reply) + i for i in range(int(plan.sample.sum()))]
            reply += toks
            if s.commit(plan, toks):
                break
        hit = s.stats().cached_prompt_tokens - before
        if turn:
            assert hit >= len(history) - 1 - ps, (turn, hit, len(history))
        history = history + reply + [7, 8, 9]
    assert s.check_invariants() == "OK"


def test_last_prompt_token_is_always_recomputed():
    s = Scheduler(page_size=4, num_pages=32, max_batch_tokens=64, max_batch_size=4)
    prompt = list(range(8))  # exactly two pages
    s.submit(prompt, 1)
    _serve(s)
    assert s.cached_prefix_len(prompt) == 4  # not 8: the last token needs logits
    s.submit(prompt, 1)
    plan = s.step()
    assert plan.context_lens.tolist() == [4] and plan.input_tokens.tolist() == [4, 5, 6, 7]


def test_stop_ids_and_engine_finish():
    s = Scheduler(page_size=4, num_pages=32, max_batch_tokens=64, max_batch_size=4)
    a = s.submit([1, 2], 50, stop_ids=[99])
    b = s.submit([3, 4], 50)
    plan = s.step()
    done = s.commit(plan, [99, 5], finish=[0, 1])
    assert sorted((f.req_id, f.reason) for f in done) == [(a, "stop"), (b, "engine")]
    assert s.stats().owned_pages == 0


def test_abort_anytime_frees_pages():
    s = Scheduler(page_size=4, num_pages=32, max_batch_tokens=64, max_batch_size=4)
    a = s.submit(list(range(20)), 10)
    b = s.submit(list(range(100, 110)), 10)
    s.abort(b)  # waiting
    plan = s.step()
    s.abort(a)  # running, with a plan in flight
    assert s.commit(plan, [1]) == []  # the aborted entry is ignored
    st = s.stats()
    assert st.owned_pages == 0 and st.num_running == 0 and st.num_waiting == 0
    assert s.check_invariants() == "OK"


def test_typed_errors_carry_cpp_text():
    s = Scheduler(page_size=4, num_pages=8, max_batch_tokens=16, max_batch_size=2)
    with pytest.raises(UnknownRequestError, match="unknown request id 42"):
        s.abort(42)
    with pytest.raises(InvalidArgumentError, match="negative token id"):
        s.submit([1, -3], 1)
    with pytest.raises(InvalidArgumentError, match="max_new_tokens"):
        s.submit([1], 0)
    with pytest.raises(InvalidArgumentError, match="int32"):
        s.submit([2**40], 1)
    with pytest.raises(CapacityError, match="exceeds the KV pool"):
        s.submit(list(range(40)), 1)
    rid = s.submit([1, 2, 3], 4)
    plan = s.step()
    with pytest.raises(ProtocolError, match="before commit"):
        s.step()
    with pytest.raises(InvalidArgumentError, match="num_sampled"):
        s.commit(plan, [1, 2], num_sampled=[2])
    with pytest.raises(InvalidArgumentError, match="tokens given"):
        s.commit(plan, [1, 2])
    s.commit(plan, [1])
    with pytest.raises(ProtocolError, match="already committed"):
        s.commit(plan, [1])  # double commit
    assert isinstance(UnknownRequestError("x"), LookupError)
    assert issubclass(ProtocolError, SchedulerError)
    s.abort(rid)
    with pytest.raises(InvalidArgumentError, match="config"):
        Scheduler(page_size=0)


def test_preemption_when_pages_run_out():
    s = Scheduler(page_size=4, num_pages=8, max_batch_tokens=64, max_batch_size=4)
    ids = [s.submit(list(range(i * 10, i * 10 + 6)), 20) for i in range(3)]
    done = _serve(s)
    assert sorted(f.req_id for f in done) == ids
    st = s.stats()
    assert st.preemptions > 0 and st.owned_pages == 0


def test_speculative_slots():
    s = Scheduler(page_size=4, num_pages=32, max_batch_tokens=64, max_batch_size=4, num_draft_slots=2)
    s.submit([1, 2, 3], 30)
    plan = s.step()
    s.commit(plan, [4])
    plan = s.step()
    assert plan.draft_slots.tolist() == [2] and plan.input_tokens.tolist() == [4, -1, -1]
    assert plan.positions.tolist() == [3, 4, 5]
    s.commit(plan, [10, 11, 12], num_sampled=[3])  # both drafts accepted + bonus
    plan = s.step()
    assert plan.context_lens.tolist() == [6] and plan.input_tokens.tolist() == [12, -1, -1]
    s.commit(plan, [20], num_sampled=[1])  # both rejected: rolled back
    plan = s.step()
    assert plan.context_lens.tolist() == [7] and plan.input_tokens.tolist() == [20, -1, -1]
    with pytest.raises(InvalidArgumentError, match="out of range"):
        s.commit(plan, [1, 2, 3, 4], num_sampled=[4])
    assert s.check_invariants() == "OK"


def test_extension_is_not_stale():
    """An editable install does not rebuild on edit: catch an extension older than its sources."""
    from pathlib import Path

    import tokenspeed._scheduler_cffi as ext

    so = Path(ext.__file__)
    sched = Path(__file__).resolve().parents[2] / "scheduler"
    if not sched.is_dir() or sched.parent not in so.parents:
        pytest.skip("extension not built in-tree")
    newest = max(p.stat().st_mtime for p in [*sched.glob("src/*.cpp"), *sched.glob("include/**/*.h*")])
    assert so.stat().st_mtime >= newest, "stale tokenspeed._scheduler_cffi: rerun `pip install --no-build-isolation -e .`"


def test_shapes_and_config_limits_are_checked():
    with pytest.raises(InvalidArgumentError, match="1-D"):
        Scheduler(page_size=4, num_pages=8).submit(np.zeros((2, 3), dtype=np.int32), 1)
    with pytest.raises(InvalidArgumentError, match="max_batch_size"):
        Scheduler(max_batch_size=2**30)
    with pytest.raises(InvalidArgumentError, match="2\\^31"):
        Scheduler(page_size=64, num_pages=2**30)
    with pytest.raises(InvalidArgumentError, match="int32"):
        Scheduler(num_pages=2**40)
