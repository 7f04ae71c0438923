"""A seeded random workload driving a scheduler like an execution plane would.

The simulated engine keeps its own page table (built only from the plans' deltas) and a fake KV
store: each written slot holds a rolling hash of the token prefix it was computed from. That
makes the checks semantic: on admission, every cached page the plan hands over must hold exactly
the request's own prefix (a hit never exceeds the true common prefix), and rejected draft tokens
can never be served from the cache.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np

from tokenspeed.scheduler import CapacityError, PageTable

_MOD = (1 << 61) - 1


def _roll(h: int, tok: int) -> int:
    return (h * 1_000_003 + tok + 1) % _MOD


@dataclass
class EngineRequest:
    tokens: list[int]
    prefix_hash: list[int] = field(default_factory=list)  # prefix_hash[p] covers tokens[:p+1]

    def hash_at(self, p: int) -> int:
        while len(self.prefix_hash) <= p:
            prev = self.prefix_hash[-1] if self.prefix_hash else 0
            self.prefix_hash.append(_roll(prev, self.tokens[len(self.prefix_hash)]))
        return self.prefix_hash[p]


class WorkloadDriver:
    """Random submit / step+commit / abort events against ``sched``; checks after every event."""

    def __init__(self, sched, seed: int, *, vocab: int = 50, num_prefixes: int = 4,
                 max_prompt: int = 120, max_new: int = 24, check_kv: bool = True):
        self.sched = sched
        self.rng = random.Random(seed)
        self.vocab, self.max_prompt, self.max_new = vocab, max_prompt, max_new
        self.check_kv = check_kv
        self.ps = sched.config.page_size
        self.k = sched.config.num_draft_slots
        self.prefixes = [[self.rng.randrange(vocab) for _ in range(self.rng.randrange(1, max_prompt))]
                         for _ in range(num_prefixes)]
        self.live: dict[int, EngineRequest] = {}
        self.rows: dict[int, list[int]] = {}  # engine page table
        cfg = sched.config
        self.dense = PageTable(cfg.max_batch_size, cfg.num_pages)  # the numpy mirror, cross-checked
        self.kv: dict[int, dict[int, int]] = {}  # page -> slot -> prefix hash
        self.finished: list = []
        self.plans: list = []
        self.hits = 0
        self.rejected = 0

    # -- events --
    def submit(self) -> None:
        rng = self.rng
        base = rng.choice(self.prefixes) if rng.random() < 0.7 else []
        if base and rng.random() < 0.5:
            base = base[: rng.randrange(1, len(base) + 1)]
        prompt = base + [rng.randrange(self.vocab) for _ in range(rng.randrange(0 if base else 1, 40))]
        if rng.random() < 0.3 and self.live:  # a new "turn": an earlier request's history + more
            prev = self.live[rng.choice(list(self.live))].tokens
            prompt = prev[: self.max_prompt] + [rng.randrange(self.vocab) for _ in range(rng.randrange(1, 10))]
        stop = [rng.randrange(self.vocab)] if rng.random() < 0.5 else []
        try:
            rid = self.sched.submit(prompt, rng.randrange(1, self.max_new), stop)
        except CapacityError:  # could never fit this pool: rejected up front, nothing changes
            self.rejected += 1
            return
        self.live[rid] = EngineRequest(list(prompt))

    def abort(self) -> None:
        if not self.live:
            return
        rid = self.rng.choice(list(self.live))
        self.sched.abort(rid)
        del self.live[rid]

    def step_and_commit(self) -> None:
        plan = self.sched.step()
        self.plans.append(plan.as_dict())
        self._apply_deltas(plan)
        tokens, num_sampled = [], []
        qs = plan.query_start.tolist()
        for i, rid in enumerate(plan.req_ids.tolist()):
            req = self.live[rid]  # every planned request is live: aborts happen after this loop
            row = self.rows[int(plan.rows[i])]
            ctx = int(plan.context_lens[i])
            drafts = int(plan.draft_slots[i])
            guesses = [self.rng.randrange(self.vocab) for _ in range(drafts)]
            inputs = plan.input_tokens[qs[i]:qs[i + 1]].tolist()
            positions = plan.positions[qs[i]:qs[i + 1]].tolist()
            assert positions == list(range(ctx, ctx + len(inputs)))
            real = len(inputs) - drafts
            assert inputs[:real] == req.tokens[ctx:ctx + real], "plan input tokens differ from history"
            if self.check_kv:
                h = req.hash_at(ctx - 1) if ctx else 0
                for j, pos in enumerate(positions):  # the engine "computes" KV
                    tok = inputs[j] if j < real else guesses[j - real]
                    h = _roll(h, tok)
                    self.kv.setdefault(row[pos // self.ps], {})[pos % self.ps] = h
            if plan.sample[i]:
                accepted = self.rng.randrange(drafts + 1)
                out = guesses[:accepted] + [self.rng.randrange(self.vocab)]
                tokens += out
                num_sampled.append(len(out))
                req.tokens += out
            else:
                num_sampled.append(0)
        if plan.num_entries and self.rng.random() < 0.02:  # abort between step() and commit()
            rid = int(plan.req_ids[self.rng.randrange(plan.num_entries)])
            self.sched.abort(rid)
            del self.live[rid]
        finish = None
        if plan.num_entries and self.rng.random() < 0.05:
            finish = [int(self.rng.random() < 0.2) for _ in range(plan.num_entries)]
        done = self.sched.commit(plan, np.array(tokens, dtype=np.int32), np.array(num_sampled, dtype=np.int32), finish)
        for f in done:
            self.finished.append(f)
            del self.live[f.req_id]

    def _apply_deltas(self, plan) -> None:
        for row, n in zip(plan.truncate_rows.tolist(), plan.truncate_lens.tolist(), strict=True):
            if n == 0:
                self.rows.pop(row, None)
            else:
                del self.rows[row][n:]
        for row, rid in zip(plan.new_rows.tolist(), plan.new_row_reqs.tolist(), strict=True):
            assert row not in self.rows, f"row {row} handed out twice (to request {rid})"
            self.rows[row] = []
        for row, slot, page in zip(plan.append_rows.tolist(), plan.append_slots.tolist(), plan.append_pages.tolist(), strict=True):
            assert slot == len(self.rows[row]), "append not at the end of its row"
            self.rows[row].append(page)
        self.dense.apply(plan)
        for row in set(plan.append_rows.tolist()) | set(plan.truncate_rows.tolist()):
            assert self.dense.row(row).tolist() == self.rows.get(row, []), f"PageTable row {row} diverged"

        if self.check_kv:
            for row, rid in zip(plan.new_rows.tolist(), plan.new_row_reqs.tolist(), strict=True):
                i = plan.req_ids.tolist().index(rid)
                ctx = int(plan.context_lens[i])
                self.hits += ctx
                req = self.live[rid]
                for pos in range(ctx):  # a reported hit must be this request's exact prefix
                    got = self.kv.get(self.rows[row][pos // self.ps], {}).get(pos % self.ps)
                    assert got == req.hash_at(pos), f"request {rid}: cached KV at position {pos} is not its prefix"

    def run(self, num_events: int, *, check_every: int = 1) -> None:
        for n in range(num_events):
            x = self.rng.random()
            if x < 0.25:
                self.submit()
            elif x < 0.28:
                self.abort()
            else:
                self.step_and_commit()
            if n % check_every == 0:
                status = self.sched.check_invariants()
                assert status == "OK", status

    def drain(self, max_steps: int = 100_000) -> None:
        for _ in range(max_steps):
            if not self.live:
                return
            self.step_and_commit()
            status = self.sched.check_invariants()
            assert status == "OK", status
        raise AssertionError("requests did not finish")
