"""Hypothesis state machine over the public API: hypothesis chooses every event (so failures
shrink to a minimal event sequence), the model tracks which ids are live, and every step checks
the scheduler's invariants and that each request's plan input is its own history."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tokenspeed.scheduler import CapacityError, ProtocolError, Scheduler, UnknownRequestError

SHARED = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3]


class SchedulerMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.sched = Scheduler(page_size=4, num_pages=24, max_batch_tokens=12, max_batch_size=3,
                               num_draft_slots=1)
        self.history: dict[int, list[int]] = {}
        self.dead: set[int] = set()

    @rule(shared=st.integers(0, len(SHARED)), tail=st.lists(st.integers(0, 9), max_size=20),
          max_new=st.integers(1, 12), stop=st.lists(st.integers(0, 9), max_size=1))
    def submit(self, shared, tail, max_new, stop):
        prompt = SHARED[:shared] + tail
        if not prompt:
            return
        try:
            rid = self.sched.submit(prompt, max_new, stop)
        except CapacityError:
            assert len(prompt) + max_new + 1 > 24 * 4
            return
        self.history[rid] = list(prompt)

    @rule(data=st.data())
    def step_and_commit(self, data):
        plan = self.sched.step()
        qs = plan.query_start.tolist()
        tokens, num_sampled = [], []
        for i, rid in enumerate(plan.req_ids.tolist()):
            real = qs[i + 1] - qs[i] - int(plan.draft_slots[i])
            ctx = int(plan.context_lens[i])
            assert plan.input_tokens[qs[i]:qs[i] + real].tolist() == self.history[rid][ctx:ctx + real]
            if plan.sample[i]:
                n = data.draw(st.integers(1, 1 + int(plan.draft_slots[i])))
                out = data.draw(st.lists(st.integers(0, 9), min_size=n, max_size=n))
                tokens += out
                num_sampled.append(n)
                self.history[rid] += out
            else:
                num_sampled.append(0)
        for f in self.sched.commit(plan, np.array(tokens, dtype=np.int32), np.array(num_sampled, dtype=np.int32)):
            del self.history[f.req_id]
            self.dead.add(f.req_id)
        if plan.num_entries:
            try:
                self.sched.commit(plan, np.array(tokens, dtype=np.int32), np.array(num_sampled, dtype=np.int32))
                raise AssertionError("double commit accepted")
            except ProtocolError:
                pass

    @precondition(lambda self: self.history)
    @rule(data=st.data())
    def abort(self, data):
        rid = data.draw(st.sampled_from(sorted(self.history)))
        self.sched.abort(rid)
        del self.history[rid]
        self.dead.add(rid)

    @precondition(lambda self: self.dead)
    @rule(data=st.data())
    def abort_dead_request_fails(self, data):
        rid = data.draw(st.sampled_from(sorted(self.dead)))
        try:
            self.sched.abort(rid)
            raise AssertionError("aborting a finished request succeeded")
        except UnknownRequestError:
            pass

    @invariant()
    def invariants_hold(self):
        assert self.sched.check_invariants() == "OK"
        st_ = self.sched.stats()
        assert st_.num_waiting + st_.num_running == len(self.history)


TestSchedulerMachine = SchedulerMachine.TestCase
TestSchedulerMachine.settings = settings(max_examples=60, stateful_step_count=60, deadline=None,
                                         derandomize=True, suppress_health_check=[HealthCheck.too_slow])
