"""The step plan as flat int32 numpy arrays (no per-element Python objects)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

_FIELDS = ("req_ids", "rows", "query_start", "context_lens", "sample", "draft_slots", "input_tokens",
           "positions", "truncate_rows", "truncate_lens", "new_rows", "new_row_reqs", "append_rows",
           "append_slots", "append_pages")
_EMPTY = np.zeros(0, dtype=np.int32)
_EMPTY.flags.writeable = False


class Plan:
    """One step's batch and page-table deltas, as int32 views into one private copy of the arena.

    Per entry (``num_entries``): ``req_ids``, ``rows``, ``query_start`` (``num_entries + 1``
    offsets into the per-token arrays), ``context_lens`` (tokens already in KV), ``sample`` (1:
    sample after this entry), ``draft_slots`` (trailing query tokens reserved for drafts).
    Per token: ``input_tokens`` (drafts are -1: the engine fills them), ``positions``.
    Page-table deltas, applied in this order: ``truncate_rows``/``truncate_lens`` (row keeps its
    first N pages; 0 = row freed), ``new_rows``/``new_row_reqs``, then
    ``append_rows``/``append_slots``/``append_pages`` (row[slot] = page).
    ``copy_src``/``copy_dst`` and ``zero_pages`` are always empty with this design (shared pages
    are full and immutable; attention never reads past a sequence's length).
    Arrays are sliced on first access (most steps read only a few of them).
    """

    __slots__ = ("step_id", "num_entries", "num_tokens", "_arena", "_bounds", "_views")

    copy_src = copy_dst = zero_pages = _EMPTY

    @classmethod
    def from_arena(cls, step_id: int, arena: np.ndarray, num_entries: int, num_tokens: int,
                   num_truncates: int, num_new_rows: int, num_appends: int) -> Plan:
        """Wraps an arena laid out as documented in tokenspeed_scheduler.h (ts_plan)."""
        plan = cls.__new__(cls)
        plan.step_id = step_id
        plan.num_entries = num_entries
        plan.num_tokens = num_tokens
        plan._arena = arena
        e = num_entries
        plan._bounds = (e, e, e + 1, e, e, e, num_tokens, num_tokens, num_truncates, num_truncates,
                        num_new_rows, num_new_rows, num_appends, num_appends, num_appends)
        plan._views = None
        return plan

    def _view(self, index: int) -> np.ndarray:
        views = self._views
        if views is None:
            views, o = {}, 0
            for name, n in zip(_FIELDS, self._bounds, strict=True):
                views[name] = (o, o + n)
                o += n
            self._views = views
        lo, hi = views[_FIELDS[index]]
        return self._arena[lo:hi]

    req_ids = property(lambda self: self._view(0))
    rows = property(lambda self: self._view(1))
    query_start = property(lambda self: self._view(2))
    context_lens = property(lambda self: self._view(3))
    sample = property(lambda self: self._view(4))
    draft_slots = property(lambda self: self._view(5))
    input_tokens = property(lambda self: self._view(6))
    positions = property(lambda self: self._view(7))
    truncate_rows = property(lambda self: self._view(8))
    truncate_lens = property(lambda self: self._view(9))
    new_rows = property(lambda self: self._view(10))
    new_row_reqs = property(lambda self: self._view(11))
    append_rows = property(lambda self: self._view(12))
    append_slots = property(lambda self: self._view(13))
    append_pages = property(lambda self: self._view(14))

    @property
    def num_sampled(self) -> int:
        return int(self.sample.sum())

    @property
    def query_lens(self) -> np.ndarray:
        return np.diff(self.query_start)

    def as_dict(self) -> dict[str, list[int]]:
        """Plain lists, for comparisons and debugging (not for the hot path)."""
        out = {name: getattr(self, name).tolist() for name in _FIELDS}
        out.update(copy_src=[], copy_dst=[], zero_pages=[])
        return out

    def __repr__(self) -> str:
        return (f"Plan(step_id={self.step_id}, entries={self.num_entries}, tokens={self.num_tokens}, "
                f"new_rows={len(self.new_rows)}, appends={len(self.append_rows)}, "
                f"truncates={len(self.truncate_rows)})")


class Finished(NamedTuple):
    req_id: int
    reason: str  # "stop" | "length" | "engine"


FINISH_REASONS = {1: "stop", 2: "length", 3: "engine", 4: "aborted"}
