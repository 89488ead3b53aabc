"""The process's memory as Linux counts it (``/proc/self/status``), for the CPU benchmarks."""
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
