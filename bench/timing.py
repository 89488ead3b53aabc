"""Device choice and interleaved timing, shared by the benchmarks."""
from __future__ import annotations

import contextlib
import gc
import statistics
import time
from typing import Callable


def pick_device(cpu: bool = False):
    """(device, dtype): CUDA in fp16 when there is one and ``cpu`` is not asked for, else the CPU in fp32."""
    import torch

    if torch.cuda.is_available() and not cpu:
        return torch.device("cuda"), torch.float16
    return torch.device("cpu"), torch.float32


def device_name(device) -> str:
    import platform

    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def building_on(device):
    """A context in which new modules are created on ``device``: random init there takes seconds, not minutes on the host.

    Keep explicit CPU generators out of it (they cannot fill CUDA tensors).
    """
    import torch

    return torch.device(device) if device.type == "cuda" else contextlib.nullcontext()


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def seconds(function: Callable[[], object], device) -> float:
    """Wall time of one call, the device's queued work included."""
    synchronize(device)
    started = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - started


def interleaved(functions: dict[str, Callable[[], object]], reps: int, device, warmup: int = 1) -> dict[str, list[float]]:
    """Times of each function over ``reps`` rounds that call every function once in turn.

    Interleaving spreads slow phases of a shared or throttled machine over all functions alike;
    the warm-up calls take first-call allocations and kernel choices out of the figures.
    """
    for function in functions.values():
        for _ in range(warmup):
            function()
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(reps):
        for name, function in functions.items():
            times[name].append(seconds(function, device))
    return times


def median(values) -> float:
    return statistics.median(values)
