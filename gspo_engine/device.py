"""Which device a command runs on, in which precision, and how much memory it has used."""

from __future__ import annotations

import resource
import sys

import torch


class DeviceError(ValueError):
    """A device was asked for that this machine does not have."""


def resolve_device(name: str | None) -> torch.device:
    """`auto` (or None): the GPU when one is visible, else the CPU; `cuda` without a GPU is an error."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"{name} was asked for but no GPU is visible")
    return device


def resolve_precision(name: str, device: torch.device) -> str:
    """`auto`: bf16-mixed on a GPU, where bf16 matmuls are fast; fp32 on a CPU, where they are not."""
    if name == "auto":
        return "bf16-mixed" if device.type == "cuda" else "fp32"
    return name


def autocast(device: torch.device, precision: str):
    """bf16 compute under bf16-mixed (fp32 weights stay the master copy); a no-op context otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so a host clock measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mib(device: torch.device) -> float:
    """Peak allocated GPU memory, or on a CPU the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20
