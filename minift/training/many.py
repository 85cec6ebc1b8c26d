"""K LoRA jobs trained together on one frozen base: one forward and backward per step for all.

Each job is what ``minift train`` would run alone: its own adapter (rank, alpha, targets), data,
data order (its seed), learning rate, schedule, warmup, weight decay, gradient clipping and
AdamW state. A step of ``train_many``:

    rows = [job 1's micro-batch | job 2's | ... | job K's]     (padded to one length, masked)
    with mixed_batch(model, [name of each row's job]):          (methods/multi_lora.py)
        logits = model(rows)                                    the base runs once for all rows
    loss = sum over jobs of job k's mean loss on its own rows   (what job k alone would compute)
    loss.backward()                                             job k's A, B get only its rows' gradient
    for each job: clip its gradients, its lr, its AdamW step

Because the rows are disjoint and each adapter acts only on its own rows, the gradient that
reaches job k's adapter is exactly the gradient of job k's loss alone: the K trajectories are
those of K separate runs (tests/training/test_many.py checks them against ``train``, step by
step). What is shared is the work on the base: one pass of W0 over all rows instead of K.

This is the library function; it keeps every job's losses in memory and writes no checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from minift.methods.common import freeze_all
from minift.methods.lora import LoRAConfig
from minift.methods.multi_lora import add_adapter, mixed_batch
from minift.models.gpt import GPT
from minift.training.checkpoint import seed_everything
from minift.training.data import pad_to_longest
from minift.training.forward import model_forward, pick_device, to_device
from minift.training.loop import batch_at, make_optimizer
from minift.training.config import TrainConfig, lr_factor


@dataclass
class Job:
    name: str                    # the adapter's name on the model
    lora: LoRAConfig
    batches: list[dict]          # this job's training batches (``data.batches``)
    cfg: TrainConfig             # lr, steps, schedule, warmup, weight decay, clipping, seed


@dataclass
class ManyResult:
    losses: dict[str, list[float]] = field(default_factory=dict)   # job -> one loss per optimizer step


def add_jobs(model: nn.Module, jobs: list[Job]) -> None:
    """Freeze the base and add each job's adapter. Every adapter starts as ``lora.apply`` makes
    one (A Kaiming-uniform from the job's seed, B zero), so adding them changes no output."""
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        raise ValueError(f"job names must differ, got {', '.join(names)}")
    for j in jobs:
        if j.cfg.grad_accum != 1:
            raise ValueError(f"job {j.name}: train_many runs grad_accum 1 (give a larger batch instead)")
        if j.lora.dropout > 0:  # its rows would draw other dropout masks than the job alone
            raise ValueError(f"job {j.name}: train_many runs adapters without dropout, got dropout {j.lora.dropout}")
        if j.cfg.bf16 != jobs[0].cfg.bf16:
            raise ValueError(f"job {j.name}: every job must agree on bf16 (one forward runs them all)")
    kinds = {j.batches[0]["labels"].dim() for j in jobs}
    if len(kinds) > 1:
        raise ValueError("the jobs mix tasks: every job's labels must be per token (causal LM) or per example")
    freeze_all(model)
    for j in jobs:
        torch.manual_seed(j.cfg.seed)
        add_adapter(model, j.name, j.lora)


def train_many(model: nn.Module, jobs: list[Job], device: str = "cpu") -> ManyResult:
    """Train every job's adapter (``add_jobs`` first) until each has done its ``cfg`` steps."""
    dev = pick_device(device)
    model.to(dev).train()
    opts, totals, base_lrs = {}, {}, {}
    for j in jobs:
        params = [p for n, p in model.named_parameters() if n.endswith(f".{j.name}") and "lora_" in n]
        opts[j.name] = make_optimizer(model, j.cfg, [{"params": params, "weight_decay": j.cfg.weight_decay}],
                                      device=dev)
        totals[j.name] = j.cfg.total_steps(len(j.batches))
        base_lrs[j.name] = j.cfg.lr
    seed_everything(jobs[0].cfg.seed)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda" and jobs[0].cfg.bf16)
    res = ManyResult({j.name: [] for j in jobs})
    step = 0
    while True:
        live = [j for j in jobs if step < totals[j.name]]
        if not live:
            return res
        parts = [batch_at(j.batches, step, j.cfg) for j in live]
        rows = [j.name for j, b in zip(live, parts) for _ in range(b["input_ids"].shape[0])]
        batch = to_device(_concat(parts), dev)
        with autocast, mixed_batch(model, rows):
            logits = model_forward(model, {k: v for k, v in batch.items() if k != "labels"}).logits
        losses = _job_losses(model, logits, batch["labels"], [b["input_ids"].shape[0] for b in parts])
        torch.stack(losses).sum().backward()
        for j, loss in zip(live, losses):
            opt = opts[j.name]
            for g in opt.param_groups:
                g["lr"] = base_lrs[j.name] * lr_factor(step, totals[j.name], j.cfg.warmup_steps(totals[j.name]),
                                                       j.cfg.schedule)
            if j.cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(opt.param_groups[0]["params"], j.cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            res.losses[j.name].append(loss.item())
        step += 1


def _concat(parts: list[dict]) -> dict:
    """The jobs' batches as one: each padded to the longest (masked; no target on padding)."""
    parts = [b if "attention_mask" in b else {**b, "attention_mask": torch.ones_like(b["input_ids"])} for b in parts]
    padded = pad_to_longest(parts)
    keys = set.intersection(*(set(b) for b in padded))
    return {k: torch.cat([b[k] for b in padded]) for k in keys}


def _job_losses(model: nn.Module, logits: torch.Tensor, labels: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """Each job's mean loss on its own rows, as ``model``'s own loss would compute it alone."""
    out, start = [], 0
    for n in sizes:
        lg, y = logits[start:start + n].float(), labels[start:start + n]
        if isinstance(model, GPT) or lg.dim() == 3:  # next-token: position t predicts y[:, t + 1]
            t = y[:, 1:]
            loss = F.cross_entropy(lg[:, :-1].flatten(0, 1), t.flatten(), ignore_index=-100, reduction="sum")
            out.append(loss / (t != -100).sum().clamp_min(1))
        else:
            out.append(F.cross_entropy(lg, y))
        start += n
    return out


__all__ = ["Job", "ManyResult", "add_jobs", "train_many"]
