"""Profile one method's training step on CUDA: the top kernels by GPU time.

    python benchmarks/profile_step.py --model gpt2-medium --method lora [--no-frozen-bf16] [--compile]
        [--lora-merged-forward]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minift.studies import bench  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="gpt2-medium")
    p.add_argument("--method", default="lora")
    p.add_argument("--no-frozen-bf16", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the model first (as bench --compile)")
    p.add_argument("--lora-merged-forward", action="store_true", help="LoRA through W0 + sBA (MergedLoRA)")
    p.add_argument("--rows", type=int, default=25)
    a = p.parse_args()
    cfg = bench.BenchConfig(model=a.model, methods=(a.method,), frozen_bf16=not a.no_frozen_bf16, compile=a.compile,
                              lora_merged_forward=a.lora_merged_forward)
    model, hooks = bench.build(cfg, a.method)
    if a.compile:
        model.compile()
    batch = bench.make_batch(model, cfg, a.method)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4, fused=True)
    model.train()

    def step(i):
        with bench._autocast(cfg.device):
            loss = bench._loss(model, batch, cfg, hooks)
        loss.backward()
        opt.step()
        if "allocator" in hooks:
            hooks["allocator"].step(model, i)
        opt.zero_grad(set_to_none=True)

    for i in range(3):
        step(i)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(3, 6):
            step(i)
        torch.cuda.synchronize()
    print(f"== {a.model} {a.method} frozen_bf16={cfg.frozen_bf16} compile={a.compile} ({torch.cuda.get_device_name()})")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=a.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
