"""The C++ control plane, from Python: ``Scheduler``, its ``Plan`` and typed errors.

    sched = Scheduler(page_size=64, num_pages=4096)
    rid = sched.submit(prompt_tokens, max_new_tokens=256, stop_ids=[eos])
    plan = sched.step()             # flat int32 numpy arrays + page-table deltas
    finished = sched.commit(plan, sampled_tokens)
"""

from tokenspeed.scheduler._errors import (
    CapacityError,
    InternalError,
    InvalidArgumentError,
    InvariantError,
    ProtocolError,
    SchedulerError,
    UnknownRequestError,
)
from tokenspeed.scheduler._page_table import PageTable
from tokenspeed.scheduler._plan import Finished, Plan
from tokenspeed.scheduler._scheduler import Scheduler, SchedulerConfig, SchedulerStats

__all__ = [
    "CapacityError", "Finished", "InternalError", "InvalidArgumentError", "InvariantError", "PageTable", "Plan",
    "ProtocolError", "Scheduler", "SchedulerConfig", "SchedulerError", "SchedulerStats",
    "UnknownRequestError",
]
