"""Typed exceptions for scheduler status codes; each carries the C++ error text."""

from __future__ import annotations


class SchedulerError(RuntimeError):
    """Base class: a scheduler call failed. ``str(e)`` is the C++ text; ``e.code`` the status."""

    code = 6

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgumentError(SchedulerError, ValueError):
    """An out-of-range value or malformed array (TS_ERR_INVALID_ARGUMENT)."""

    code = 1


class UnknownRequestError(SchedulerError, LookupError):
    """The id was never submitted, or already finished or aborted (TS_ERR_UNKNOWN_REQUEST)."""

    code = 2


class ProtocolError(SchedulerError):
    """step/commit out of order: double commit, commit without step, step twice (TS_ERR_PROTOCOL)."""

    code = 3


class CapacityError(SchedulerError):
    """The request can never fit the KV pool (TS_ERR_CAPACITY)."""

    code = 4


class InvariantError(SchedulerError, AssertionError):
    """check_invariants(raise_on_error=True) found a broken invariant (TS_ERR_INVARIANT)."""

    code = 5


class InternalError(SchedulerError):
    """Unexpected failure inside the scheduler, e.g. out of host memory (TS_ERR_INTERNAL)."""

    code = 6


ERRORS_BY_CODE: dict[int, type[SchedulerError]] = {
    cls.code: cls
    for cls in (InvalidArgumentError, UnknownRequestError, ProtocolError, CapacityError,
                InvariantError, InternalError)
}
