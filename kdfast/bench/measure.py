"""Timing and memory measurement used by every benchmark, identical for every implementation.

Time: warm-up calls, then the median of repeats; CUDA events on GPU, a synchronized
``perf_counter`` on CPU. Memory: the peak of live tensor bytes during one call, above what was
live before it (``max_memory_allocated`` on CUDA; the profiler's allocator events on CPU).
"""
from __future__ import annotations

import gc
import statistics
import time
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one ``fn()`` in milliseconds (CUDA events on GPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int = 2, repeats: int = 5) -> float:
    """Median wall time of ``fn()`` in milliseconds."""
    return interleaved_median_ms({"fn": fn}, device, warmup, repeats)["fn"]


def interleaved_median_ms(fns: dict, device: torch.device, warmup: int = 2, repeats: int = 5) -> dict:
    """Median milliseconds of each ``fns[name]()``, timed in rotation (one call of each per round), so
    a change in machine load during the run hits every implementation alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(time_ms(fn, device))
    return {name: statistics.median(values) for name, values in times.items()}


class PhaseTimer:
    """Milliseconds between named marks (``mark("start")`` opens a span, any other name closes the span
    since the previous mark and adds it to that name), the device synchronised at each mark."""

    def __init__(self, device: torch.device):
        self.device = device
        self.ms: dict = {}
        self._last = 0.0

    def mark(self, name: str) -> None:
        synchronize(self.device)
        now = time.perf_counter()
        if name != "start":
            self.ms[name] = self.ms.get(name, 0.0) + (now - self._last) * 1e3
        self._last = now


def peak_mb(fn: Callable[[], object], device: torch.device) -> float:
    """Peak extra MiB of live tensors while ``fn()`` runs (results are dropped at the end)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak / 2**20


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (absolute error when ref is 0)."""
    out, ref = out.detach().double(), ref.detach().double()
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / denom if denom > 0 else diff
