"""The step plan as flat int32 numpy arrays (no per-element Python objects)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Plan:
    """One step's batch and page-table deltas. Every array is a view into one private int32 copy.

    Per entry (``num_entries``): ``req_ids``, ``rows``, ``query_start`` (``num_entries + 1``
    offsets into the per-token arrays), ``context_lens`` (tokens already in KV), ``sample`` (1:
    sample after this entry), ``draft_slots`` (trailing query tokens reserved for drafts).
    Per token: ``input_tokens`` (drafts are -1: the engine fills them), ``positions``.
    Page-table deltas, applied in this order: ``truncate_rows``/``truncate_lens`` (row keeps its
    first N pages; 0 = row freed), ``new_rows``/``new_row_reqs``, then
    ``append_rows``/``append_slots``/``append_pages`` (row[slot] = page).
    ``copy_src``/``copy_dst`` and ``zero_pages`` are always empty with this design (shared pages
    are full and immutable; attention never reads past a sequence's length).
    """

    __slots__ = (
        "step_id", "num_entries", "num_tokens", "req_ids", "rows", "query_start", "context_lens",
        "sample", "draft_slots", "input_tokens", "positions", "truncate_rows", "truncate_lens",
        "new_rows", "new_row_reqs", "append_rows", "append_slots", "append_pages", "copy_src",
        "copy_dst", "zero_pages",
    )

    _EMPTY = np.zeros(0, dtype=np.int32)

    @classmethod
    def from_arena(cls, step_id: int, arena: np.ndarray, num_entries: int, num_tokens: int,
                   num_truncates: int, num_new_rows: int, num_appends: int) -> Plan:
        """Slices the arena laid out as documented in tokenspeed_scheduler.h (ts_plan)."""
        plan = cls.__new__(cls)
        plan.step_id = step_id
        plan.num_entries = num_entries
        plan.num_tokens = num_tokens
        e, t, a = num_entries, num_tokens, num_appends
        o = 0
        plan.req_ids = arena[o:o + e]; o += e
        plan.rows = arena[o:o + e]; o += e
        plan.query_start = arena[o:o + e + 1]; o += e + 1
        plan.context_lens = arena[o:o + e]; o += e
        plan.sample = arena[o:o + e]; o += e
        plan.draft_slots = arena[o:o + e]; o += e
        plan.input_tokens = arena[o:o + t]; o += t
        plan.positions = arena[o:o + t]; o += t
        plan.truncate_rows = arena[o:o + num_truncates]; o += num_truncates
        plan.truncate_lens = arena[o:o + num_truncates]; o += num_truncates
        plan.new_rows = arena[o:o + num_new_rows]; o += num_new_rows
        plan.new_row_reqs = arena[o:o + num_new_rows]; o += num_new_rows
        plan.append_rows = arena[o:o + a]; o += a
        plan.append_slots = arena[o:o + a]; o += a
        plan.append_pages = arena[o:o + a]; o += a
        plan.copy_src = plan.copy_dst = plan.zero_pages = cls._EMPTY
        return plan

    @property
    def query_lens(self) -> np.ndarray:
        return np.diff(self.query_start)

    def as_dict(self) -> dict[str, list[int]]:
        """Plain lists, for comparisons and debugging (not for the hot path)."""
        return {name: getattr(self, name).tolist() for name in self.__slots__
                if isinstance(getattr(self, name), np.ndarray)}

    def __repr__(self) -> str:
        return (f"Plan(step_id={self.step_id}, entries={self.num_entries}, tokens={self.num_tokens}, "
                f"new_rows={len(self.new_rows)}, appends={len(self.append_rows)}, "
                f"truncates={len(self.truncate_rows)})")


class Finished(NamedTuple):
    req_id: int
    reason: str  # "stop" | "length" | "engine"


FINISH_REASONS = {1: "stop", 2: "length", 3: "engine", 4: "aborted"}
