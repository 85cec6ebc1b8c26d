"""``minift bench --nproc N``: bench's step on N GPUs, one torchrun rank per GPU.

``minift bench --nproc N`` checks the machine (CUDA, at least N GPUs) and launches

    python -m torch.distributed.run --standalone --nproc-per-node N -m minift.studies.bench_dist ...

(``command``); every rank runs ``main``. Each row is one layout of ``minift train`` under torchrun
(``minift.training.distributed``), with the global ``--batch`` split over the ranks (B/N rows each):

  - ``full``: full fine-tuning, data parallel (``replicate``, then ``sum_gradients`` after the backward);
  - ``full-shard``: full fine-tuning, FSDP2-sharded (``shard``: bf16 compute, fp32 reduction), eager and
    without ``minift.fast``, as ``minift train --shard`` runs it;
  - ``lora``: LoRA, data parallel.

The model is bench's (``bench.build``: random weights, frozen ones in bf16) and every row runs eager
(no torch.compile: the sharded path has none, and the rows share one process). Steps are timed as
bench times them (``bench_timing.time_steps``, on each rank); the row's step time is the slowest
rank's median, its tokens/s the global batch's tokens over it, and its peak memory each rank's
``max_memory_allocated`` over the timed window. Rank 0 writes the rows as JSON (``--out``).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from minift.files import InputError as UsageError  # bad usage: one line, exit code 2

ROWS = ("full", "full-shard", "lora")


def command(nproc: int, model: str, rows: tuple[str, ...], batch: int, seq_len: int, steps: int, warmup: int,
            out: str) -> list[str]:
    """The torchrun command line that runs ``rows`` on ``nproc`` local GPUs."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "minift.studies.bench_dist", f"--model={model}", f"--rows={','.join(rows)}",
            f"--batch={batch}", f"--seq-len={seq_len}", f"--steps={steps}", f"--warmup={warmup}", f"--out={out}"]


def run_row(cfg, row: str) -> dict:
    """One row on this rank; every rank calls it. ``cfg``: a ``BenchConfig`` with the global batch."""
    import torch

    from minift.methods.common import count_trainable
    from minift.studies import bench, bench_timing
    from minift.training import distributed
    n, shard = distributed.world_size(), row == "full-shard"
    method = row.split("-")[0]
    rc = replace(cfg, methods=(method,), batch=cfg.batch // n, speed="eager", compile=False, isolate=False,
                 fast=cfg.fast and not shard)
    torch.manual_seed(rc.seed)  # one base on every rank (replicate syncs only the trainable weights)
    model, hooks, _ = bench.build(rc, method)
    trainable, total = count_trainable(model)
    if shard:
        distributed.shard(model, torch.device(rc.device), bf16=True)
    else:
        distributed.replicate(model)
    torch.manual_seed(rc.seed + distributed.rank())  # each rank its own rows
    batch = bench.make_batch(model, rc, method)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=rc.device.startswith("cuda") and not shard)  # not on DTensors
    model.train()

    def step(i):
        with bench._autocast(rc.device):
            loss = bench._loss(model, batch, rc, hooks) / n  # each rank's share of the global batch
        loss.backward()
        distributed.sum_gradients(params)  # data parallel; FSDP2 reduced the sharded ones already
        opt.step()
        opt.zero_grad(set_to_none=True)
    ms, peak, _ = bench_timing.time_steps(step, rc)
    every = [None] * n
    torch.distributed.all_gather_object(every, (ms, peak))
    slowest = max(m for m, _ in every)
    del model, opt, params, batch
    torch.cuda.empty_cache()
    return {"row": row, "method": method, "layout": "FSDP2-sharded" if shard else "data parallel", "ranks": n,
            "model": cfg.model, "batch": cfg.batch, "seq_len": cfg.seq_len, "trainable_params": trainable,
            "total_params": total, "step_ms": round(slowest, 2), "tokens_per_s": round(cfg.batch * cfg.seq_len /
                                                                                      (slowest / 1e3), 1),
            "peak_gib_per_rank": [round(p, 3) for _, p in every]}


def to_markdown(rows: list[dict]) -> str:
    head = "| row | layout | ranks | trainable | step ms | tokens/s (all ranks) | peak GiB per rank (max) |\n" \
           "| --- | --- | --- | --- | --- | --- | --- |\n"
    return head + "".join(f"| {r['row']} | {r['layout']} | {r['ranks']} | {r['trainable_params']:,} | "
                          f"{r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | {max(r['peak_gib_per_rank']):.2f} |\n"
                          for r in rows)


def cli(args) -> int:
    """``minift bench --nproc N`` (``args``: bench's parsed flags): check them and the machine, then launch
    ``main`` on every rank under torchrun and print the rows (``--dry-run``: print the command instead).
    Raises InputError (exit 2) for a bad flag or fewer than N CUDA GPUs."""
    import shlex
    import subprocess

    import torch

    from minift.methods.registry import METHODS
    from minift.studies.presets import PRESETS
    n = args.nproc
    if n < 2:
        raise UsageError(f"--nproc must be >= 2 (without it bench runs in one process), got {n}")
    methods = ("full", "lora") if args.methods == ",".join(METHODS) else tuple(m for m in args.methods.split(",") if m)
    if not methods or any(m not in ("full", "lora") for m in methods):
        raise UsageError(f"--nproc runs full fine-tuning and LoRA; --methods {args.methods!r} is not a subset of "
                         f"full,lora")
    model = args.model or "gpt2-medium"
    if model not in PRESETS:
        raise UsageError(f"unknown model preset {model!r}; choose from {', '.join(PRESETS)}")
    batch, seq_len = args.batch or 8, args.seq_len or 1024
    if batch % n:
        raise UsageError(f"--batch {batch} is the global batch and must divide evenly over --nproc {n}")
    if args.steps < 1 or args.warmup < 0:
        raise UsageError(f"need --steps >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    rows = tuple(r for m in methods for r in ((m, f"{m}-shard") if m == "full" else (m,)))
    out = Path(args.out)
    name = args.name or f"bench-{model}-{n}gpu"
    cmd = command(n, model, rows, batch, seq_len, args.steps, args.warmup, str(out / f"{name}.json"))
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    if args.device not in (None, "cuda"):
        raise UsageError(f"--nproc runs on CUDA GPUs only; got --device {args.device}")
    if torch.cuda.device_count() < n:
        raise UsageError(f"--nproc {n} runs one rank per GPU and needs {n} CUDA GPUs; this machine has "
                         f"{torch.cuda.device_count()}")
    out.mkdir(parents=True, exist_ok=True)
    if subprocess.run(cmd).returncode:
        raise RuntimeError(f"the ranks failed (torchrun's output above); command: {shlex.join(cmd)}")
    rows_out = json.loads((out / f"{name}.json").read_text())["rows"]
    (out / f"{name}.md").write_text(to_markdown(rows_out))
    print(to_markdown(rows_out), end="")
    print(f"wrote {out / (name + '.json')}, {out / (name + '.md')}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m minift.studies.bench_dist")
    for k, t in (("--model", str), ("--rows", str), ("--batch", int), ("--seq-len", int), ("--steps", int),
                 ("--warmup", int), ("--out", str)):
        p.add_argument(k, type=t, required=True)
    args = p.parse_args(argv)
    import torch

    from minift.studies.bench import BenchConfig
    from minift.training import distributed
    distributed.init()
    if not (torch.cuda.is_available() and distributed.world_size() > 1):
        print("bench_dist: run it under torchrun, one rank per GPU (minift bench --nproc N)", file=sys.stderr)
        return 2
    cfg = BenchConfig(model=args.model, methods=(), batch=args.batch, seq_len=args.seq_len, steps=args.steps,
                      warmup=args.warmup, device="cuda")
    rows = []
    for row in args.rows.split(","):
        rows.append(run_row(cfg, row))
        if distributed.is_main():
            print(f"bench --nproc {distributed.world_size()}: {row} done", file=sys.stderr)
            with open(args.out, "w") as f:  # after each row, so a failure keeps the finished ones
                json.dump({"torch": torch.__version__, "device": torch.cuda.get_device_name(), "rows": rows}, f,
                          indent=1)
    distributed.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
