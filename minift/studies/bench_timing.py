"""How ``minift bench`` times a training step: warm-up, then a window of timed steps (CUDA events on
a GPU, the wall clock on the CPU); the median, the peak memory and each step's time."""
from __future__ import annotations

import statistics
import time
from typing import Protocol

import torch


class TimingSettings(Protocol):
    """What the timer reads of a bench config (``minift.studies.bench.BenchConfig`` has it all)."""
    device: str
    steps: int
    warmup: int
    compile: bool | None        # None (a bench config before its plan): not compiled
    compile_mode: str | None
    sync_each_step: bool


def time_steps(step, cfg: TimingSettings) -> tuple[float, float, list[float]]:
    """Run warm-up then timed steps; returns (median step ms, peak GiB over the timed window, each
    step's ms).

    On CUDA the timed window runs as a training loop that reads nothing back each step does: the
    host queues step after step without waiting for the GPU, an event is recorded between steps,
    and the host synchronizes once, at the end; step i's time is the GPU time between events i and
    i + 1, so host overhead the GPU can hide behind queued work costs nothing, and what it cannot
    hide shows as idle time. ``sync_each_step`` (for comparison with older results) waits for the
    GPU after every step instead, so each step also pays the host's latency before its first
    kernel starts.

    Under CUDA graphs (compile mode reduce-overhead) the graphs' memory pool is allocated while
    recording, in the warm-up, and replays allocate nothing: the peak then covers the warm-up too
    (an upper bound, compilation's own buffers included) instead of reading near zero."""
    cuda = cfg.device.startswith("cuda")
    graphs = cfg.compile and cfg.compile_mode == "reduce-overhead"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for i in range(cfg.warmup):
        step(i)
    if cuda:
        torch.cuda.synchronize()
        if not graphs:
            torch.cuda.reset_peak_memory_stats()
    times = []
    if cuda and cfg.sync_each_step:
        for i in range(cfg.steps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            step(cfg.warmup + i)
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e))
    elif cuda:
        events = [torch.cuda.Event(enable_timing=True) for _ in range(cfg.steps + 1)]
        events[0].record()
        for i in range(cfg.steps):
            step(cfg.warmup + i)
            events[i + 1].record()
        torch.cuda.synchronize()
        times = [a.elapsed_time(b) for a, b in zip(events, events[1:])]
    else:
        for i in range(cfg.steps):
            t0 = time.perf_counter()
            step(cfg.warmup + i)
            times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else float("nan")
    return statistics.median(times), peak, times


def describe(cfg: TimingSettings) -> str:
    """How ``time_steps`` timed the steps, for the results' metadata."""
    if not cfg.device.startswith("cuda"):
        return "wall clock per step"
    if cfg.sync_each_step:
        return "CUDA events, host synchronized after every step"
    return "CUDA events between queued steps, host synchronized once after the window"
