"""Count the aten ops one training step dispatches: LoRA vs AdaLoRA, by phase.

    python benchmarks/adalora_ops.py [--layers 24] [--detail]

Eager training of a small adapter on a big GPU is CPU-launch bound: the Python/C++ side
issues kernels more slowly than the GPU runs them, so ops per step is the cost to cut.
This counts them on the CPU with a ``TorchDispatchMode``, twice: every aten op that reaches
a backend (views included: each costs dispatch time), and the ones that run a kernel (views
left out: each of those is a launch on CUDA). The model is a GPT with 24 layers but tiny
width, so the counts match GPT-2 medium's (144 adapted modules) while running in seconds.
It is built with ``build_method`` and stepped with the calls ``minift.training.loop.train`` makes
(its ``train_hooks``: penalty, forward context, allocator), set up as they run on CUDA:
bf16 autocast (CPU autocast stands in), fused AdamW, foreach gradient clipping.
``--frozen-bf16`` stores frozen weights in bf16 as ``minift.studies.bench`` and ``minift train`` on
CUDA do; by default frozen weights are fp32, as ``train`` keeps them with ``--fast false``.

AdaLoRA is counted at a step inside the pruning window (tinit < t < T - tfinal) where it
prunes, one inside it where it only updates the scores, and one in the final phase (the
fixed pattern re-applied); LoRA is r=8, AdaLoRA init_r 12 -> target_r 8, both on
q/k/v/o/up/down. The script prints the totals per optimizer step and, with ``--detail``, the
ops per phase.

What keeps AdaLoRA's count near LoRA's: SVDLinear adds s P (ΛQ x) with one addmm; inside
``adalora.batched_factors`` (train's ``forward_context``) ΛQ is one multiply per shape group
and the orthogonal penalty reuses the forward's stacks of P and Q, so autograd does not sum two
gradients per P and per Q; the penalty runs all Gram matrices through one
subtract/square/sum; applying the masks is one stack instead of two ops per module. What
still grows with the module count is views: a select per factor (the stacks' backward) and
AccumulateGrad's detach of Λ, a third parameter per module. On CUDA the counts differ in
detail (attention kernels; a foreach op may launch a few chunks), not in what AdaLoRA adds.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minift.fast import frozen  # noqa: E402
from minift.methods.registry import build_method  # noqa: E402
from minift.models.gpt import GPT, GPTConfig  # noqa: E402
from minift.training.loop import make_optimizer, model_forward  # noqa: E402
from minift.training.config import TrainConfig

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")
PHASES = ("forward", "penalty", "backward", "clip", "optimizer", "allocator", "zero_grad")
METADATA = {"_unsafe_view"}  # not marked a view in its schema, but it copies nothing either


class OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched while active, under the current ``phase``, and
    separately the ones that run a kernel (not views such as view/t/select/detach)."""

    def __init__(self):
        super().__init__()
        self.phase, self.ops, self.kernels = "", Counter(), Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "aten":  # not the profiler's record_function markers
            name = func.overloadpacket.__name__
            self.ops[(self.phase, name)] += 1
            if not func.is_view and name not in METADATA:
                self.kernels[(self.phase, name)] += 1
        return func(*args, **(kwargs or {}))

    def total(self, phase: str | None = None, kernels: bool = False) -> int:
        ops = self.kernels if kernels else self.ops
        return sum(n for (p, _), n in ops.items() if phase is None or p == phase)


def build(method: str, layers: int, opts: dict, frozen_bf16: bool):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, block_size=64, n_layer=layers, n_head=4, n_embd=64))
    st = build_method(model, method, {"targets": TARGETS, **opts})
    if frozen_bf16:  # as minift.studies.bench does: frozen weights need no per-step cast under autocast
        frozen.enable(model)
    return model, st.train_hooks()


def count_step(model, hooks, step: int, batch: dict) -> OpCounter:
    """One optimizer step as ``train`` runs it on CUDA, counted phase by phase."""
    cfg = TrainConfig(steps=1)
    opt = make_optimizer(model, cfg, hooks["param_groups"], device=torch.device("cuda"))  # fused AdamW
    params = [p for g in opt.param_groups for p in g["params"]]
    penalty, allocator = hooks["penalty"], hooks["allocator"]
    context = hooks.get("forward_context") or (lambda m: contextlib.nullcontext())
    model.train()

    def run(c: OpCounter | None):
        def phase(name):
            if c is not None:
                c.phase = name
        phase("forward")
        with torch.autocast("cpu", dtype=torch.bfloat16), context(model):  # stands in for CUDA's autocast
            loss = model_forward(model, batch).loss
            phase("penalty")
            if penalty is not None:
                loss = loss + penalty(model)
        phase("backward")
        loss.backward()
        loss.item()
        phase("clip")
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm, foreach=True)  # CUDA's default
        phase("optimizer")
        opt.step()
        phase("allocator")
        if allocator is not None:
            allocator.step(model, step)
        phase("zero_grad")
        opt.zero_grad(set_to_none=True)

    run(None)  # warm-up: the optimizer state and the allocator EMAs exist from here on
    counter = OpCounter()
    with counter:
        run(counter)
    return counter


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--frozen-bf16", action="store_true", help="frozen weights in bf16, as minift.studies.bench")
    p.add_argument("--detail", action="store_true", help="kernel ops by name, per phase")
    a = p.parse_args()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (2, 32), generator=g)
    batch = {"input_ids": ids, "attention_mask": None, "labels": ids}
    # tinit=10, tfinal=10, total=40: steps 11..29 update the scores, multiples of 5 also prune.
    ada = {"init_r": 12, "target_r": 8, "tinit": 10, "tfinal": 10, "delta_t": 5, "total_step": 40}
    runs = [("lora", "lora", {"r": 8, "alpha": 16}, 0),
            ("adalora prune", "adalora", ada, 20),
            ("adalora update", "adalora", ada, 21),
            ("adalora final", "adalora", ada, 35)]
    counts = {}
    for label, method, opts, step in runs:
        model, hooks = build(method, a.layers, opts, a.frozen_bf16)
        counts[label] = count_step(model, hooks, step, batch)
    print(f"{a.layers} layers, {len(TARGETS) * a.layers} adapted modules, frozen_bf16={a.frozen_bf16}; "
          f"per optimizer step")
    for kernels in (False, True):
        lora = counts["lora"].total(kernels=kernels)
        print("\n" + ("ops that run a kernel (views left out)" if kernels else "all aten ops"))
        print(f"{'method':<16}" + "".join(f"{ph:>10}" for ph in PHASES) + f"{'total':>8}{'/ LoRA':>8}")
        for label, c in counts.items():
            print(f"{label:<16}" + "".join(f"{c.total(ph, kernels):>10}" for ph in PHASES)
                  + f"{c.total(kernels=kernels):>8}{c.total(kernels=kernels) / lora:>7.2f}x")
    if a.detail:
        for label in ("lora", "adalora prune"):
            print(f"\n{label}:")
            for ph in PHASES:
                top = sorted(((n, op) for (p_, op), n in counts[label].kernels.items() if p_ == ph), reverse=True)
                print(f"  {ph:<10} " + ", ".join(f"{op} {n}" for n, op in top[:12]))


if __name__ == "__main__":
    main()
