"""Profile one method's training step on CUDA, as `minift bench` runs it: the top kernels by GPU
time, and what the host spends per step.

    python benchmarks/profile_step.py --model gpt2-medium --method lora [--speed default|eager]
        [--[no-]compile] [--compile-mode MODE] [--[no-]lora-merged-forward] [--no-frozen-bf16] [--rows N]

With no speed flag the step is the default path (``minift train``'s speed plan, ``bench_speed.speed_plan``:
on CUDA minift.fast, LoRA's merged forward, torch.compile under CUDA graphs where the method has
no hook between steps); ``--speed eager`` is the eager step. Printed, in order: the plan, the first
step's seconds (compiling, capturing the graphs), then over ``--steps`` steps after the warm-up:
the GPU time per step (CUDA events, steps queued as in a training loop), the host time per step
(until ``step()`` returns, the GPU not waited for: the CPU-side cost of issuing a step; when it
exceeds the GPU time the host is the bound), and the profiler's tables, top CUDA kernels by GPU
time and top host operations by CPU time, over ``--steps`` profiled steps.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minift.studies import bench  # noqa: E402
from minift.training import speed  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--model", default="gpt2-medium")
    p.add_argument("--method", default="lora")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--lora-targets", default="", help="default: every projection (bench's default)")
    p.add_argument("--no-frozen-bf16", action="store_true")
    p.add_argument("--speed", default="default", choices=bench.SPEEDS)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="override the plan's torch.compile (as bench --compile / --no-compile)")
    p.add_argument("--compile-mode", default=None, choices=bench.COMPILE_MODES)
    p.add_argument("--lora-merged-forward", action=argparse.BooleanOptionalAction, default=None,
                   help="LoRA through W0 + sBA (default: the plan's choice)")
    p.add_argument("--lora-recompute-act", action=argparse.BooleanOptionalAction, default=None,
                   help="the MLP's activation recomputed in down_proj's backward (default: the plan's choice)")
    p.add_argument("--warmup", type=int, default=3, help="steps before measuring (the first compiles)")
    p.add_argument("--steps", type=int, default=5, help="steps timed, then steps profiled")
    p.add_argument("--rows", type=int, default=25)
    a = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("profile_step.py needs a CUDA device")
    cfg = bench.BenchConfig(model=a.model, methods=(a.method,), batch=a.batch, seq_len=a.seq_len,
                            frozen_bf16=not a.no_frozen_bf16, speed=a.speed, compile=a.compile,
                            compile_mode=a.compile_mode, lora_merged_forward=a.lora_merged_forward,
                            lora_recompute_act=a.lora_recompute_act,
                            warmup=a.warmup, steps=a.steps, isolate=False,
                            lora_targets=tuple(t for t in a.lora_targets.split(",") if t))
    pr = bench.prepare(cfg, a.method)
    step, i = pr.step, 0
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with speed.compile_context(None, pr.cfg.compile):  # the step compiles as bench's and train's do
        step(i)
    torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    for i in range(1, a.warmup):
        step(i)
    torch.cuda.synchronize()

    # GPU time per step (events between queued steps) and host time per step (until step() returns)
    events = [torch.cuda.Event(enable_timing=True) for _ in range(a.steps + 1)]
    host = []
    events[0].record()
    for k in range(a.steps):
        h0 = time.perf_counter()
        step(a.warmup + k)
        host.append((time.perf_counter() - h0) * 1e3)
        events[k + 1].record()
    torch.cuda.synchronize()
    gpu = [x.elapsed_time(y) for x, y in zip(events, events[1:])]

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for k in range(a.steps):
            step(a.warmup + a.steps + k)
        torch.cuda.synchronize()
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    tokens = cfg.batch * cfg.seq_len
    print(f"== {a.model} {a.method} batch {cfg.batch} x {cfg.seq_len} ({torch.cuda.get_device_name()}, "
          f"torch {torch.__version__})")
    print(f"variant: {bench.variant_name(pr.cfg, a.method)}")
    print(f"speed plan: {pr.plan.describe()}")
    print(f"first step (compiling, capturing CUDA graphs): {first_s:.2f} s")
    print(f"GPU time per step (queued, median of {a.steps}): {med(gpu):.2f} ms "
          f"({tokens / (med(gpu) / 1e3):,.0f} tokens/s); each: {' '.join(f'{t:.1f}' for t in gpu)}")
    print(f"host time per step (until step() returns, median of {a.steps}): {med(host):.2f} ms; "
          f"each: {' '.join(f'{t:.1f}' for t in host)}")
    print(f"peak memory: {torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB")
    ka = prof.key_averages()
    cpu_total = sum(e.self_cpu_time_total for e in ka) / 1e3 / a.steps
    print(f"profiler: host (self CPU) time per step {cpu_total:.2f} ms over {a.steps} profiled steps")
    print(f"\n-- top CUDA kernels and ops by GPU time ({a.steps} steps)")
    print(ka.table(sort_by="cuda_time_total", row_limit=a.rows, max_name_column_width=70))
    print(f"\n-- top host operations by self CPU time ({a.steps} steps)")
    print(ka.table(sort_by="self_cpu_time_total", row_limit=a.rows, max_name_column_width=70))


if __name__ == "__main__":
    main()
