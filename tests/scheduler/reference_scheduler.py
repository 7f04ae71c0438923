"""Pure-Python reference of the C++ scheduler's policy: the executable spec.

Same public surface as ``tokenspeed.scheduler.Scheduler`` and, for the same calls, the same plans
(page ids included). Written for clarity, not speed: it is the baseline the C++ version is
compared with (differential test) and measured against (docs/perf/scheduler.md).
The prefix cache here is keyed by (parent page, block tokens) directly, so it is exact by
construction; the C++ version hashes the key and verifies it.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np

from tokenspeed.scheduler import (
    CapacityError,
    Finished,
    InvalidArgumentError,
    Plan,
    ProtocolError,
    SchedulerConfig,
    SchedulerStats,
    UnknownRequestError,
)

STOP, LENGTH, ENGINE = "stop", "length", "engine"


class Pool:
    def __init__(self, num_pages: int):
        self.refcount = [0] * num_pages
        self.cached = [False] * num_pages
        self.lru: OrderedDict[int, None] = OrderedDict()  # idle cached pages, oldest first
        self.free = list(range(num_pages - 1, -1, -1))  # pop() hands out page 0 first

    def available(self) -> int:
        return len(self.free) + len(self.lru)

    def ref(self, p: int) -> None:
        if self.refcount[p] == 0 and p in self.lru:
            del self.lru[p]
        self.refcount[p] += 1

    def unref(self, p: int) -> None:
        self.refcount[p] -= 1
        if self.refcount[p] == 0:
            if self.cached[p]:
                self.lru[p] = None
            else:
                self.free.append(p)

    def release_all(self, pages: list[int], keep: int = 0) -> None:
        while len(pages) > keep:
            self.unref(pages.pop())

    def set_uncached(self, p: int) -> None:
        self.cached[p] = False
        if p in self.lru:
            del self.lru[p]
            self.free.append(p)


class PrefixCache:
    def __init__(self, pool: Pool, page_size: int):
        self.pool, self.ps = pool, page_size
        self.index: dict[tuple[int, tuple[int, ...]], int] = {}
        self.key_of: dict[int, tuple[int, tuple[int, ...]]] = {}
        self.children: dict[int, list[int]] = {}
        self.generation = [0] * len(pool.refcount)

    def match(self, tokens: list[int], max_pages: int) -> list[int]:
        out, parent = [], -1
        for j in range(max_pages):
            page = self.index.get((parent, tuple(tokens[j * self.ps:(j + 1) * self.ps])))
            if page is None:
                break
            out.append(page)
            parent = page
        return out

    def insert(self, parent: int, block: tuple[int, ...], page: int) -> int:
        key = (parent, block)
        if key in self.index:
            return self.index[key]
        self.index[key] = page
        self.key_of[page] = key
        self.children[page] = []
        if parent >= 0:
            self.children[parent].insert(0, page)
        self.generation[page] += 1
        self.pool.cached[page] = True
        return page

    def uncache_subtree(self, root: int) -> None:
        order = [root]
        i = 0
        while i < len(order):
            order.extend(self.children[order[i]])
            i += 1
        for p in reversed(order):
            key = self.key_of.pop(p)
            del self.index[key]
            if key[0] >= 0:
                self.children[key[0]].remove(p)
            del self.children[p]
            self.pool.set_uncached(p)

    def allocate(self, n: int, into: list[int]) -> None:
        for _ in range(n):
            if not self.pool.free:
                self.uncache_subtree(next(iter(self.pool.lru)))
            p = self.pool.free.pop()
            self.pool.refcount[p] = 1
            into.append(p)


@dataclass
class Request:
    id: int
    tokens: list[int]
    prompt_len: int
    max_new: int
    stop_ids: list[int]
    num_output: int = 0
    admitted_once: bool = False
    state: str = "waiting"  # waiting | prefilling | decoding
    pages: list[int] = field(default_factory=list)
    row: int = -1
    num_computed: int = 0
    num_cached_pages: int = 0
    chain_parent: int = -1
    chain_generation: int = 0
    chain_broken: bool = False


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class ReferenceScheduler:
    def __init__(self, config: SchedulerConfig | None = None, **overrides: int):
        cfg = config or SchedulerConfig()
        if overrides:
            cfg = SchedulerConfig(**{**cfg.__dict__, **overrides})
        self.config = cfg
        self.ps, self.k = cfg.page_size, cfg.num_draft_slots
        self.pool = Pool(cfg.num_pages)
        self.cache = PrefixCache(self.pool, cfg.page_size)
        self.requests: dict[int, Request] = {}
        self.waiting: deque[int] = deque()
        self.running: list[int] = []
        self.free_rows = list(range(cfg.max_batch_size - 1, -1, -1))
        self.pending_truncates: list[tuple[int, int]] = []
        self.next_id = 0
        self.next_step = 1
        self.awaiting = False
        self.plan_entries: list[dict] = []
        self.stats_ = dict(steps=0, preemptions=0, prompt_tokens=0, cached_prompt_tokens=0, computed_tokens=0)

    # -- requests --
    def submit(self, prompt, max_new_tokens: int, stop_ids=()) -> int:
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise InvalidArgumentError("submit: empty prompt")
        if max_new_tokens < 1:
            raise InvalidArgumentError("submit: max_new_tokens must be >= 1")
        if min(prompt) < 0:
            raise InvalidArgumentError("submit: negative token id")
        if len(prompt) + max_new_tokens + self.k > self.config.num_pages * self.ps:
            raise CapacityError("submit: exceeds the KV pool")
        rid = self.next_id
        self.next_id += 1
        self.requests[rid] = Request(rid, prompt, len(prompt), int(max_new_tokens), [int(s) for s in stop_ids])
        self.waiting.append(rid)
        return rid

    def _release_row(self, row: int) -> None:
        self.pending_truncates.append((row, 0))
        self.free_rows.append(row)

    def abort(self, rid: int) -> None:
        r = self.requests.pop(rid, None)
        if r is None:
            raise UnknownRequestError(f"unknown request id {rid}")
        if r.state == "waiting":
            self.waiting.remove(rid)
        else:
            self.running.remove(rid)
            self._release_row(r.row)
            self.pool.release_all(r.pages)

    # -- step --
    def _grow(self, r: Request, num_tokens: int, plan: dict) -> None:
        need = _ceil_div(num_tokens, self.ps) - len(r.pages)
        if need <= 0:
            return
        first = len(r.pages)
        self.cache.allocate(need, r.pages)
        for i in range(first, len(r.pages)):
            plan["append"].append((r.row, i, r.pages[i]))

    def _emit(self, r: Request, qlen: int, drafts: int, sample: bool, plan: dict) -> None:
        real = qlen - drafts
        plan["entries"].append((r.id, r.row, r.num_computed, int(sample), drafts, qlen))
        plan["tokens"].extend(r.tokens[r.num_computed:r.num_computed + real] + [-1] * drafts)
        plan["positions"].extend(range(r.num_computed, r.num_computed + qlen))
        self.stats_["computed_tokens"] += qlen

    def _preempt(self, rid: int) -> None:
        r = self.requests[rid]
        self._release_row(r.row)
        self.pool.release_all(r.pages)
        r.state, r.row, r.num_computed = "waiting", -1, 0
        r.num_cached_pages, r.chain_parent, r.chain_generation, r.chain_broken = 0, -1, 0, False
        self.waiting.appendleft(rid)
        self.stats_["preemptions"] += 1

    def step(self) -> Plan:
        if self.awaiting and self.plan_entries:
            raise ProtocolError("step() called again before commit()")
        cfg, ps, k = self.config, self.ps, self.k
        plan = {"entries": [], "tokens": [], "positions": [], "new_rows": [], "append": []}
        budget = cfg.max_batch_tokens
        n = lambda: len(plan["entries"])  # noqa: E731
        ok = True
        i = 0
        while i < len(self.running):  # 1. decodes
            rid = self.running[i]
            r = self.requests[rid]
            i += 1
            if r.state != "decoding":
                continue
            if n() == cfg.max_batch_size or budget < 1 + k:
                break
            need_tokens = r.num_computed + 1 + k
            need_pages = _ceil_div(need_tokens, ps) - len(r.pages)
            self_preempted = False
            while need_pages > self.pool.available():
                victim = self.running.pop()
                self._preempt(victim)
                if victim == rid:
                    self_preempted = True
                    break
            if self_preempted:
                ok = False
                break
            self._grow(r, need_tokens, plan)
            self._emit(r, 1 + k, k, True, plan)
            budget -= 1 + k
        if ok:
            for rid in self.running:  # 2. running prefills
                r = self.requests[rid]
                if r.state != "prefilling":
                    continue
                if n() == cfg.max_batch_size or budget == 0:
                    break
                remaining = len(r.tokens) - r.num_computed
                chunk = min(remaining, budget)
                have = len(r.pages)
                if _ceil_div(r.num_computed + chunk, ps) - have > self.pool.available():
                    chunk = min(chunk, (have + self.pool.available()) * ps - r.num_computed)
                    if chunk <= 0:
                        continue
                self._grow(r, r.num_computed + chunk, plan)
                self._emit(r, chunk, 0, chunk == remaining, plan)
                budget -= chunk
            while self.waiting and n() < cfg.max_batch_size and budget > 0 and self.free_rows:  # 3. admit
                if self.pool.available() == 0:  # blocked whatever it matches
                    break
                rid = self.waiting[0]
                r = self.requests[rid]
                total = len(r.tokens)
                matched = self.cache.match(r.tokens, (total - 1) // ps)
                m_tokens = len(matched) * ps
                idle = sum(1 for p in matched if self.pool.refcount[p] == 0)
                avail = self.pool.available() - idle
                chunk = min(total - m_tokens, budget)
                if _ceil_div(m_tokens + chunk, ps) - len(matched) > avail:
                    chunk = min(chunk, avail * ps)
                    if chunk <= 0:
                        break
                self.waiting.popleft()
                for p in matched:
                    self.pool.ref(p)
                if not r.admitted_once:
                    r.admitted_once = True
                    self.stats_["prompt_tokens"] += r.prompt_len
                    self.stats_["cached_prompt_tokens"] += m_tokens
                r.row = self.free_rows.pop()
                r.state, r.pages, r.num_computed = "prefilling", list(matched), m_tokens
                r.num_cached_pages = len(matched)
                r.chain_parent = matched[-1] if matched else -1
                r.chain_generation = self.cache.generation[r.chain_parent] if matched else 0
                r.chain_broken = False
                plan["new_rows"].append((r.row, rid))
                for j, p in enumerate(matched):
                    plan["append"].append((r.row, j, p))
                self._grow(r, m_tokens + chunk, plan)
                self._emit(r, chunk, 0, chunk == total - m_tokens, plan)
                self.running.append(rid)
                budget -= chunk
        truncates, self.pending_truncates = self.pending_truncates, []
        self.plan_entries = plan["entries"]
        step_id = self.next_step
        self.next_step += 1
        self.stats_["steps"] += 1
        self.awaiting = True
        return self._to_plan(step_id, plan, truncates)

    @staticmethod
    def _to_plan(step_id: int, plan: dict, truncates: list) -> Plan:
        e = plan["entries"]
        qs = np.concatenate([[0], np.cumsum([x[5] for x in e], dtype=np.int64)]) if e else np.zeros(1)
        cols = lambda rows, i: [x[i] for x in rows]  # noqa: E731
        parts = [cols(e, 0), cols(e, 1), qs.tolist(), cols(e, 2), cols(e, 3), cols(e, 4), plan["tokens"],
                 plan["positions"], cols(truncates, 0), cols(truncates, 1), cols(plan["new_rows"], 0),
                 cols(plan["new_rows"], 1), cols(plan["append"], 0), cols(plan["append"], 1),
                 cols(plan["append"], 2)]
        arena = np.array([v for part in parts for v in part], dtype=np.int32)
        return Plan.from_arena(step_id, arena, len(e), len(plan["tokens"]), len(truncates),
                               len(plan["new_rows"]), len(plan["append"]))

    # -- commit --
    def _offer(self, r: Request) -> None:
        full = r.num_computed // self.ps
        while r.num_cached_pages < full and not r.chain_broken:
            parent = r.chain_parent
            if parent >= 0 and (not self.pool.cached[parent] or self.cache.generation[parent] != r.chain_generation):
                r.chain_broken = True
                break
            j = r.num_cached_pages
            canonical = self.cache.insert(parent, tuple(r.tokens[j * self.ps:(j + 1) * self.ps]), r.pages[j])
            r.chain_parent = canonical
            r.chain_generation = self.cache.generation[canonical]
            r.num_cached_pages = j + 1

    def _append(self, r: Request, toks: list[int]) -> str | None:
        for t in toks:
            r.tokens.append(t)
            r.num_output += 1
            if t in r.stop_ids:
                return STOP
            if r.num_output >= r.max_new:
                return LENGTH
        return None

    def _finish(self, r: Request) -> None:
        self._release_row(r.row)
        self.pool.release_all(r.pages)
        del self.requests[r.id]

    def commit(self, plan: Plan, tokens, num_sampled=None, finish=None) -> list[Finished]:
        if not self.awaiting:
            raise ProtocolError("commit() without a pending plan")
        if plan.step_id != self.next_step - 1:
            raise ProtocolError("commit() for a stale step")
        e = self.plan_entries
        ns = [int(x) for x in (plan.sample if num_sampled is None else num_sampled)]
        toks = [int(t) for t in tokens]
        if len(ns) != len(e) or (finish is not None and len(finish) != len(e)):
            raise InvalidArgumentError("commit(): entry count")
        for (rid, _, _, sample, drafts, _), x, pid in zip(e, ns, plan.req_ids.tolist(), strict=True):
            if pid != rid or not ((1 <= x <= 1 + drafts) if sample else x == 0):
                raise InvalidArgumentError("commit(): bad entry")
        if sum(ns) != len(toks) or any(t < 0 for t in toks):
            raise InvalidArgumentError("commit(): tokens")
        self.awaiting = False
        out, off, finished_any = [], 0, False
        for i, (rid, _, _, _, _, qlen) in enumerate(e):
            mine = toks[off:off + ns[i]]
            off += ns[i]
            r = self.requests.get(rid)
            if r is None:
                continue
            flag = finish is not None and bool(finish[i])
            reason = None
            if r.state == "prefilling":
                r.num_computed += qlen
                if ns[i] == 0:
                    self._offer(r)
                    if flag:
                        self._finish(r)
                        out.append(Finished(rid, ENGINE))
                        finished_any = True
                    continue
                reason = self._append(r, mine)
                r.state = "decoding"
            else:
                reason = self._append(r, mine)
                r.num_computed = min(r.num_computed + ns[i], len(r.tokens))
            if reason is None and flag:
                reason = ENGINE
            self._offer(r)
            if reason is not None:
                self._finish(r)
                out.append(Finished(rid, reason))
                finished_any = True
                continue
            keep = _ceil_div(len(r.tokens) + self.k, self.ps)
            if len(r.pages) > keep:
                self.pool.release_all(r.pages, keep)
                self.pending_truncates.append((r.row, keep))
        if finished_any:
            self.running = [rid for rid in self.running if rid in self.requests]
        return out

    # -- introspection --
    def check_invariants(self) -> str:
        return "OK"

    def stats(self) -> SchedulerStats:
        free, idle = len(self.pool.free), len(self.pool.lru)
        n = len(self.pool.refcount)
        return SchedulerStats(**self.stats_, num_waiting=len(self.waiting), num_running=len(self.running),
                              free_pages=free, cached_idle_pages=idle, owned_pages=n - free - idle, num_pages=n)
