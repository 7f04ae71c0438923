"""Python face of the C++ scheduler: one object per scheduler, numpy in and out."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from tokenspeed.scheduler._errors import ERRORS_BY_CODE, InternalError, InvalidArgumentError
from tokenspeed.scheduler._plan import FINISH_REASONS, Finished, Plan

try:
    from tokenspeed._scheduler_cffi import ffi, lib
except ImportError as exc:  # pragma: no cover - only without a built extension
    raise ImportError(
        "tokenspeed._scheduler_cffi is not built; run `pip install --no-build-isolation -e .` "
        "in the repository root"
    ) from exc

_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
_INT32 = np.dtype(np.int32)
# Hot-path names bound once (step/commit run thousands of times per second).
_ts_step, _ts_commit = lib.ts_step, lib.ts_commit
_ffi_buffer, _from_buffer, _frombuffer = ffi.buffer, ffi.from_buffer, np.frombuffer
_plan_from_arena = Plan.from_arena


def _raise_for(status: int) -> None:
    message = ffi.string(lib.ts_last_error()).decode("utf-8", "replace")
    raise ERRORS_BY_CODE.get(status, InternalError)(message)


def _int32_array(values, what: str) -> np.ndarray:
    """A C-contiguous int32 array; values outside int32 raise instead of wrapping around."""
    if isinstance(values, np.ndarray) and values.dtype == np.int32 and values.ndim == 1:
        return np.ascontiguousarray(values)
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise InvalidArgumentError(f"{what}: expected a 1-D sequence, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, dtype=np.int32)
    if arr.dtype.kind not in "iub":
        raise InvalidArgumentError(f"{what}: expected integers, got dtype {arr.dtype}")
    if arr.dtype.kind != "b" and (int(arr.min()) < _INT32_MIN or int(arr.max()) > _INT32_MAX):
        raise InvalidArgumentError(f"{what}: value out of int32 range")
    return np.ascontiguousarray(arr, dtype=np.int32)


@dataclass(frozen=True)
class SchedulerConfig:
    page_size: int = 64
    num_pages: int = 4096
    max_batch_tokens: int = 8192
    max_batch_size: int = 256
    num_draft_slots: int = 0


@dataclass(frozen=True)
class SchedulerStats:
    steps: int
    preemptions: int
    prompt_tokens: int
    cached_prompt_tokens: int
    computed_tokens: int
    num_waiting: int
    num_running: int
    free_pages: int
    cached_idle_pages: int
    owned_pages: int
    num_pages: int

    @property
    def prefix_hit_rate(self) -> float:
        return self.cached_prompt_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


class Scheduler:
    """Continuous-batching scheduler over a paged KV pool with a prefix cache.

    Protocol: ``submit`` requests at any time; ``plan = step()``; run the plan; ``commit(plan,
    tokens)``; repeat. ``abort`` at any time. Errors raise typed ``SchedulerError`` subclasses
    carrying the C++ message. Not thread-safe: drive one scheduler from one thread.
    """

    def __init__(self, config: SchedulerConfig | None = None, **overrides: int):
        cfg = config or SchedulerConfig()
        if overrides:
            cfg = SchedulerConfig(**{**cfg.__dict__, **overrides})
        self.config = cfg
        c = ffi.new("ts_config*")
        for name, value in cfg.__dict__.items():
            if not _INT32_MIN <= int(value) <= _INT32_MAX:
                raise InvalidArgumentError(f"config: {name}={value} out of int32 range")
            setattr(c, name, int(value))
        handle = ffi.new("ts_scheduler**")
        status = lib.ts_scheduler_create(c, handle)
        if status:
            _raise_for(status)
        self._handle = ffi.gc(handle[0], lib.ts_scheduler_destroy)
        # Reused across calls: no allocation on the hot path.
        self._plan_c = ffi.new("ts_plan*")
        self._commit_c = ffi.new("ts_commit_input*")
        self._commit_out = ffi.new("ts_commit_output*")
        self._id_out = ffi.new("int32_t*")
        self._commit_c.finish = ffi.NULL
        self._finish_set = False
        self._pending_step = -1

    # -- requests -------------------------------------------------------------------------
    def submit(self, prompt: Sequence[int] | np.ndarray, max_new_tokens: int,
               stop_ids: Iterable[int] = ()) -> int:
        """Queues a request; returns its id (ids are never reused)."""
        prompt_arr = _int32_array(prompt, "prompt")
        stop_arr = _int32_array(list(stop_ids), "stop_ids")
        if not _INT32_MIN <= int(max_new_tokens) <= _INT32_MAX:
            raise InvalidArgumentError("max_new_tokens out of int32 range")
        status = lib.ts_submit(
            self._handle, ffi.from_buffer("int32_t[]", prompt_arr), len(prompt_arr), int(max_new_tokens),
            ffi.from_buffer("int32_t[]", stop_arr), len(stop_arr), self._id_out)
        if status:
            _raise_for(status)
        return int(self._id_out[0])

    def abort(self, req_id: int) -> None:
        """Drops a request in any state; its pages go back (full ones stay cached)."""
        if not _INT32_MIN <= int(req_id) <= _INT32_MAX:
            raise InvalidArgumentError(f"request id {req_id} out of int32 range")
        status = lib.ts_abort(self._handle, int(req_id))
        if status:
            _raise_for(status)

    # -- step protocol ----------------------------------------------------------------------
    def step(self) -> Plan:
        p = self._plan_c
        status = _ts_step(self._handle, p)
        if status:
            _raise_for(status)
        # One copy of the arena: the C++ buffers are reused next step, our arrays must not be.
        arena = _frombuffer(_ffi_buffer(p.arena, p.arena_len << 2), _INT32).copy()
        step_id = p.step_id
        self._pending_step = step_id
        return _plan_from_arena(step_id, arena, p.num_entries, p.num_tokens, p.num_truncates,
                                p.num_new_rows, p.num_appends)

    def commit(self, plan: Plan, tokens, num_sampled=None, finish=None) -> list[Finished]:
        """Reports a plan's results.

        ``tokens``: the sampled tokens, concatenated over entries; an entry with ``sample == 1``
        contributes its accepted draft tokens then the bonus token (``num_sampled[i]`` of them).
        ``num_sampled`` defaults to ``plan.sample`` (one token per sampling entry, no drafts).
        ``finish``: optional per-entry flags, the engine ending a request itself.
        Returns the requests that finished in this commit.
        """
        if type(tokens) is np.ndarray and tokens.dtype == _INT32 and tokens.flags.c_contiguous:
            tok = tokens  # the hot path: no conversion, no copy
        else:
            tok = _int32_array(tokens, "tokens")
        c = self._commit_c
        step_id = plan.step_id
        c.step_id = step_id
        latest = step_id == self._pending_step
        if latest:
            # The scheduler's own buffers still hold this plan's ids and sample flags (they live
            # until the next step), so pass them back instead of wrapping numpy arrays.
            p = self._plan_c
            c.req_ids = p.req_ids
            n = plan.num_entries
        else:  # a stale plan: the C++ side rejects it with a clear message
            c.req_ids = _from_buffer("int32_t[]", plan.req_ids)
            n = plan.num_entries
        if num_sampled is None:
            c.num_sampled = p.sample if latest else _from_buffer("int32_t[]", plan.sample)
        else:
            ns = _int32_array(num_sampled, "num_sampled")
            if len(ns) != n:
                raise InvalidArgumentError(f"commit(): num_sampled has {len(ns)} entries, the plan has {n}")
            c.num_sampled = _from_buffer("int32_t[]", ns)
        c.num_entries = n
        c.num_tokens = len(tok)
        c.tokens = _from_buffer("int32_t[]", tok)
        if finish is None:
            if self._finish_set:
                c.finish = ffi.NULL
                self._finish_set = False
            status = _ts_commit(self._handle, c, self._commit_out)
        else:
            flags = np.ascontiguousarray(finish, dtype=np.uint8)
            if len(flags) != n:
                raise InvalidArgumentError(f"commit(): finish has {len(flags)} flags, expected {n}")
            c.finish = _from_buffer("uint8_t[]", flags)
            self._finish_set = True
            status = _ts_commit(self._handle, c, self._commit_out)
        if status:
            _raise_for(status)
        out = self._commit_out
        num_finished = out.num_finished
        if num_finished == 0:
            return []
        return [Finished(int(out.finished_ids[i]), FINISH_REASONS[int(out.finished_reasons[i])])
                for i in range(num_finished)]

    # -- introspection ----------------------------------------------------------------------
    def check_invariants(self) -> str:
        """"OK" when every invariant holds, else the text of the first broken one."""
        status = lib.ts_check_invariants(self._handle)
        if status == 0:
            return "OK"
        if status == 5:
            return ffi.string(lib.ts_last_error()).decode("utf-8", "replace")
        _raise_for(status)
        return ""  # unreachable

    def stats(self) -> SchedulerStats:
        s = ffi.new("ts_stats*")
        status = lib.ts_get_stats(self._handle, s)
        if status:
            _raise_for(status)
        return SchedulerStats(*(int(getattr(s, f)) for f in SchedulerStats.__dataclass_fields__))

    def cached_prefix_len(self, tokens) -> int:
        """Tokens of ``tokens`` an admission would take from the prefix cache right now."""
        arr = _int32_array(tokens, "tokens")
        out = ffi.new("int32_t*")
        status = lib.ts_match_prefix(self._handle, ffi.from_buffer("int32_t[]", arr), len(arr), out)
        if status:
            _raise_for(status)
        return int(out[0])
