"""Trace replay through the real scheduler with a simple cost model and no GPU.

Agentic sessions run closed-loop: a session's next turn arrives when its previous turn finished,
plus its think time times ``think_scale`` (compressed). Mooncake runs open-loop on its timestamps.
The "engine" samples, for an agent turn, the tokens the next turn's prompt carries at those
positions (so the reply is what the conversation really continued with), otherwise random ones.
Simulated time advances by the cost model per step; the scheduler's own wall time per
step+commit is measured separately (step latency percentiles).
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field

import numpy as np

from tokenspeed.scheduler import CapacityError
from tokenspeed.sim.traces import OpenLoopRequest, Session


@dataclass(frozen=True)
class CostModel:
    """Seconds per step = base + per_token * scheduled tokens + per_context_token * KV read."""

    base_s: float = 0.004
    per_token_s: float = 2.5e-5
    per_context_token_s: float = 2.0e-9

    def step_seconds(self, num_tokens: int, context_tokens: int) -> float:
        return self.base_s + self.per_token_s * num_tokens + self.per_context_token_s * context_tokens


@dataclass
class _Live:
    prompt_len: int
    reply_source: np.ndarray | None  # tokens the engine "samples" (teacher forcing)
    generated: int = 0
    session: int = -1
    turn: int = -1
    arrival_s: float = 0.0
    first_token_s: float | None = None
    cached_at_admission: int = -1


@dataclass
class SimResult:
    trace: str
    requests: int = 0
    finished: int = 0
    rejected: int = 0  # could never fit the KV pool (CapacityError at submit)
    steps: int = 0
    preemptions: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    output_tokens: int = 0
    sim_seconds: float = 0.0
    wall_seconds: float = 0.0
    scheduler_seconds: float = 0.0
    step_us: dict[str, float] = field(default_factory=dict)
    ttft_s: dict[str, float] = field(default_factory=dict)
    kv_tokens: int = 0
    page_size: int = 0

    @property
    def prefix_hit_rate(self) -> float:
        return self.cached_prompt_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["prefix_hit_rate"] = round(self.prefix_hit_rate, 6)
        return d


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    arr = np.asarray(values)
    return {f"p{q}": round(float(np.percentile(arr, q)), 3) for q in (50, 90, 99)} | {"max": round(float(arr.max()), 3)}


class Simulator:
    def __init__(self, scheduler, cost: CostModel | None = None, *, think_scale: float = 0.1, seed: int = 0):
        self.sched = scheduler
        self.cost = cost or CostModel()
        self.think_scale = think_scale
        self.rng = np.random.default_rng(seed)
        self.live: dict[int, _Live] = {}
        self.step_wall: list[float] = []
        self.ttft: list[float] = []
        self.clock = 0.0
        self.output_tokens = 0
        self.finished = 0
        self.submit_wall = 0.0
        self.rejected = 0
        self.turn_hits: list[tuple[int, int, int]] = []  # (session, turn, cached tokens at admission)

    # One engine step: plan, fake forward pass, commit. Returns finished request ids.
    def _engine_step(self) -> list[int]:
        t0 = time.perf_counter()
        plan = self.sched.step()
        t1 = time.perf_counter()
        sample_idx = np.flatnonzero(plan.sample)
        first: list[_Live] = []
        tokens = np.empty(len(sample_idx), dtype=np.int32)
        req_ids = plan.req_ids
        for j, i in enumerate(sample_idx.tolist()):
            live = self.live[int(req_ids[i])]
            pos = live.prompt_len + live.generated
            src = live.reply_source
            tokens[j] = src[pos] if src is not None and pos < len(src) else self.rng.integers(0, 100_000)
            live.generated += 1
            if live.first_token_s is None:
                first.append(live)
        t2 = time.perf_counter()
        done = self.sched.commit(plan, tokens)
        t3 = time.perf_counter()
        self.step_wall.append((t1 - t0) + (t3 - t2))
        self.output_tokens += len(tokens)
        self.clock += self.cost.step_seconds(plan.num_tokens, int(plan.context_lens.sum()))
        for live in first:  # the first token exists once this step's forward pass is over
            live.first_token_s = self.clock
            self.ttft.append(self.clock - live.arrival_s)
        for rid, _row in zip(plan.new_row_reqs.tolist(), plan.new_rows.tolist(), strict=True):
            live = self.live.get(rid)
            if live is not None and live.cached_at_admission < 0:  # first admission only
                i = int(np.flatnonzero(req_ids == rid)[0])
                live.cached_at_admission = int(plan.context_lens[i])
        out = []
        for f in done:
            out.append(f.req_id)
            self.finished += 1
        return out

    def _idle(self) -> bool:
        st = self.sched.stats()
        return st.num_running == 0 and st.num_waiting == 0

    def run_sessions(self, sessions: list[Session], name: str = "agentic") -> SimResult:
        arrivals: list[tuple[float, int, int]] = [(0.0, s, 0) for s in range(len(sessions))]
        heapq.heapify(arrivals)
        total = sum(len(s.turns) for s in sessions)
        wall0 = time.perf_counter()
        while arrivals or not self._idle():
            while arrivals and arrivals[0][0] <= self.clock:
                t, s, i = heapq.heappop(arrivals)
                sess = sessions[s]
                turn = sess.turns[i]
                prompt = sess.prompt_tokens(i)
                nxt = sess.prompt_tokens(i + 1) if i + 1 < len(sess.turns) else None
                t_sub = time.perf_counter()
                try:
                    rid = self.sched.submit(prompt, turn.output_len)
                except CapacityError:  # larger than the whole pool: the session ends here
                    self.rejected += len(sess.turns) - i
                    continue
                finally:
                    self.submit_wall += time.perf_counter() - t_sub
                self.live[rid] = _Live(len(prompt), nxt, session=s, turn=i, arrival_s=t)
            if self._idle():
                self.clock = max(self.clock, arrivals[0][0])
                continue
            for rid in self._engine_step():
                live = self.live.pop(rid)
                self.turn_hits.append((live.session, live.turn, live.cached_at_admission))
                sess = sessions[live.session]
                if live.turn + 1 < len(sess.turns):
                    think = sess.turns[live.turn + 1].think_time * self.think_scale
                    heapq.heappush(arrivals, (self.clock + think, live.session, live.turn + 1))
        return self._result(name, total, time.perf_counter() - wall0)

    def run_open_loop(self, requests: list[OpenLoopRequest], name: str = "mooncake", time_scale: float = 1.0) -> SimResult:
        order = sorted(range(len(requests)), key=lambda i: requests[i].arrival_s)
        nxt = 0
        wall0 = time.perf_counter()
        while nxt < len(order) or not self._idle():
            while nxt < len(order) and requests[order[nxt]].arrival_s * time_scale <= self.clock:
                r = requests[order[nxt]]
                prompt = r.prompt()
                t_sub = time.perf_counter()
                nxt += 1
                try:
                    rid = self.sched.submit(prompt, r.output_len)
                except CapacityError:  # larger than the whole pool
                    self.rejected += 1
                    continue
                finally:
                    self.submit_wall += time.perf_counter() - t_sub
                self.live[rid] = _Live(r.prompt_len, None, arrival_s=r.arrival_s * time_scale)
            if self._idle():
                self.clock = max(self.clock, requests[order[nxt]].arrival_s * time_scale)
                continue
            for rid in self._engine_step():
                self.live.pop(rid)
        return self._result(name, len(requests), time.perf_counter() - wall0)

    def _result(self, name: str, total: int, wall: float) -> SimResult:
        st = self.sched.stats()
        cfg = self.sched.config
        return SimResult(
            trace=name, requests=total, finished=self.finished, rejected=self.rejected, steps=st.steps, preemptions=st.preemptions,
            prompt_tokens=st.prompt_tokens, cached_prompt_tokens=st.cached_prompt_tokens,
            output_tokens=self.output_tokens, sim_seconds=round(self.clock, 3), wall_seconds=round(wall, 3),
            scheduler_seconds=round(sum(self.step_wall) + self.submit_wall, 4),
            step_us=_percentiles([w * 1e6 for w in self.step_wall]), ttft_s=_percentiles(self.ttft),
            kv_tokens=cfg.num_pages * cfg.page_size, page_size=cfg.page_size)
