"""The execution plane's side of the page-table deltas: a dense int32 table kept up to date."""

from __future__ import annotations

import numpy as np

from tokenspeed.scheduler._errors import InvalidArgumentError
from tokenspeed.scheduler._plan import Plan


class PageTable:
    """``table[row, i]`` is the KV page holding tokens ``[i * page_size, (i + 1) * page_size)`` of
    the request on ``row``; ``lens[row]`` is how many entries are valid (-1 fills the rest).

    ``apply(plan)`` applies one plan's deltas in the documented order (truncations, new rows,
    appends) with a few vectorised numpy operations; the table can be handed to attention kernels
    as is (or copied to the device row-slice by row-slice, using ``plan.append_rows`` to know
    which rows changed).
    """

    def __init__(self, max_rows: int, max_pages_per_row: int):
        self.table = np.full((max_rows, max_pages_per_row), -1, dtype=np.int32)
        self.lens = np.zeros(max_rows, dtype=np.int32)

    def apply(self, plan: Plan) -> None:
        rows, keep = plan.truncate_rows, plan.truncate_lens
        if len(rows):
            for row, n in zip(rows.tolist(), keep.tolist(), strict=True):  # rare: finishes, rollbacks
                self.table[row, n:self.lens[row]] = -1
            self.lens[rows] = keep
        if len(plan.new_rows):
            self.lens[plan.new_rows] = 0
        if len(plan.append_rows):
            rows, slots = plan.append_rows, plan.append_slots
            if int(slots.max()) >= self.table.shape[1]:
                raise InvalidArgumentError(f"page table has {self.table.shape[1]} columns; a row needs {int(slots.max()) + 1}")
            self.table[rows, slots] = plan.append_pages
            np.maximum.at(self.lens, rows, slots + 1)

    def row(self, row: int) -> np.ndarray:
        return self.table[row, : self.lens[row]]
