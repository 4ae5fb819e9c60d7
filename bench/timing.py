"""Interleaved, synchronised wall-clock timing.

Machines are noisy (2 shared CPU cores here): candidates are timed in alternating order, repetition by
repetition, so that a slow phase of the machine hits all of them, and medians are compared.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so that a timer measures it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of `fn` takes, device work included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def interleaved_times(
    candidates: dict[str, Callable[[], object]],
    device: torch.device,
    warmup: int,
    reps: int,
    on_rep: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Raw seconds of each candidate over `reps` rounds, after `warmup` untimed rounds.

    Round r runs the candidates rotated by r (A B, B A, ...), so no candidate always runs first or last.
    """
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(time_call(candidates[name], device))
        if on_rep is not None:
            on_rep()
    return times


def summarize(seconds: list[float]) -> dict[str, float | list[float]]:
    """Median (what ratios use), min and max of raw timings, with the raw list."""
    return {
        "median_s": statistics.median(seconds),
        "min_s": min(seconds),
        "max_s": max(seconds),
        "raw_s": [round(s, 6) for s in seconds],
    }
