"""Exceptions of the kernel contract. Every message names the argument and what was expected."""

from __future__ import annotations


class TokenSpeedError(Exception):
    """Base class of every error raised by tokenspeed_core."""


class ArgumentError(TokenSpeedError, ValueError):
    """An op was called with a bad argument (shape, dtype, device, contiguity, value).

    Subclasses ValueError so callers that catch the standard exception keep working.
    """

    def __init__(self, op: str, arg: str, message: str):
        self.op = op
        self.arg = arg
        super().__init__(f"{op}: argument '{arg}': {message}")


class KernelSelectionError(TokenSpeedError, RuntimeError):
    """No implementation can run this call, or a forced backend cannot run it."""


class PluginError(TokenSpeedError):
    """A plugin misbehaved while registering (reported, never fatal to the host)."""
