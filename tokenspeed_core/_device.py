"""What the core needs to know about a device: its kind, compute capability and name."""

from __future__ import annotations

import functools

import torch


@functools.cache
def capability(device: torch.device | str) -> tuple[int, int] | None:
    """(major, minor) compute capability of a CUDA device, None elsewhere."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_capability(device)


@functools.cache
def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        import platform

        return f"CPU {platform.machine()} ({torch.get_num_threads()} threads)"
    return str(device)


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
