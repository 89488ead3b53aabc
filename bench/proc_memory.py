"""Memory readings for the benchmarks: the process's as Linux counts it (``/proc/self/status``) on the CPU, the CUDA allocator's on a GPU."""
from __future__ import annotations

import ctypes
import gc
from pathlib import Path


def release_memory() -> None:
    """Collect garbage and hand freed heap back to the OS, so later allocations show in the resident size."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def status_bytes(field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (its peak) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak(device) -> None:
    """Start a new peak-memory reading: the CUDA allocator's on a GPU, else the process's ``VmHWM``."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        release_memory()
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def peak_bytes(device) -> int:
    """Peak since ``reset_peak``: ``torch.cuda.max_memory_allocated`` on a GPU, else ``VmHWM``."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return status_bytes("VmHWM")


def current_bytes(device) -> int:
    """Memory in use now: CUDA tensors on a GPU, else the resident size (heap trimmed first)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device)
    release_memory()
    return status_bytes("VmRSS")
