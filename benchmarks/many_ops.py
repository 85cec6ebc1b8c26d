"""Operations one forward and backward of train_many issues, against one adapter on the same rows (CPU).

    python benchmarks/many_ops.py [--jobs 8] [--rows 2] [--seq-len 128]

A 4-layer, 256-wide GPT with LoRA r=8 on all six projections, minift.fast on. Counts the aten
operations ``torch.profiler`` records for one step's forward and backward (the optimizers left
out): ``jobs`` adapters on a mixed batch of ``jobs`` x ``rows`` rows laid out as train_many lays
them (each job's rows together), against one adapter on the same rows. The count (nested
operations and views included, so not a count of GPU kernels) measures the host's work per step
without a device; what it costs in GPU time needs a GPU.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from minift import fast  # noqa: E402
from minift.methods import lora  # noqa: E402
from minift.methods.common import freeze_all  # noqa: E402
from minift.methods.lora import LoRAConfig  # noqa: E402
from minift.methods.multi_lora import add_adapter, mixed_batch  # noqa: E402
from minift.models.gpt import GPT, GPTConfig  # noqa: E402
from minift.training.many import _job_losses  # noqa: E402

ADAPTER = LoRAConfig(r=8, alpha=16, targets=("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"))


def count(fn) -> int:
    fn()  # warm-up: first-call work is not a step's
    with profile(activities=[ProfilerActivity.CPU]) as p:
        fn()
    return sum(e.count for e in p.key_averages() if e.key.startswith("aten::"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=8)
    p.add_argument("--rows", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    a = p.parse_args()
    torch.manual_seed(0)
    base = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=256, vocab_size=8000, block_size=a.seq_len))
    ids = torch.randint(0, 8000, (a.jobs * a.rows, a.seq_len))
    many = copy.deepcopy(base)
    names = [f"j{i}" for i in range(a.jobs)]
    freeze_all(many)  # the base frozen, as train_many's add_jobs leaves it
    for n in names:
        add_adapter(many, n, ADAPTER)
    one = copy.deepcopy(base)
    lora.apply(one, ADAPTER)
    for m in (many, one):
        fast.enable(m)
        m.train()
    rows = [n for n in names for _ in range(a.rows)]

    def step_many():
        with mixed_batch(many, rows):
            total, _ = _job_losses(many, {"input_ids": ids, "labels": ids}, [a.rows] * a.jobs)
        total.backward()

    def step_one():
        x = one(input_ids=ids, output_hidden_states=True, compute_logits=False).hidden_states[-1]
        one.lm_loss(x, one.wte.weight, ids).backward()

    print(f"aten operations, one forward and backward of {a.jobs} x {a.rows} rows of {a.seq_len} tokens: "
          f"{a.jobs} adapters (train_many's mixed batch) {count(step_many):,}; one adapter {count(step_one):,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
