"""Does a frozen base stored in bf16 (``minift.fast.frozen``) cost accuracy? LoRA on MiniLM-L6 sentiment,
the same run twice under bf16 autocast: once with the fp32 base, once with every frozen parameter in bf16.

    python benchmarks/frozen_accuracy.py --model weights/minilm-fp16 [--steps 300] [--seeds 0,1] [--device cpu]

The runs are ``minift compare``'s LoRA run (its recipe's lr, warmup, schedule and options, ``compare_setup``'s
data and model), written out as a plain AdamW loop (``train_steps``, which ``frozen_accuracy_lm.py`` shares) with
every op under bf16 autocast on ``--device`` (``minift train``'s loop enters autocast on CUDA only). On the CPU
autocast also leaves LayerNorm in bf16 where CUDA runs it in fp32, so a CPU run is the harsher test. Prints one
Markdown table: dev and test accuracy per seed, both ways, and their difference. Needs the sentiment data in
MINIFT_CACHE (``minift fetch sentiment``).
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch

from minift.fast import frozen
from minift.methods.registry import build_method
from minift.studies.compare_setup import CompareConfig, load_model, load_task, resolve, train_config
from minift.training.config import TrainConfig, lr_factor
from minift.training.evaluate import evaluate
from minift.training.forward import model_forward
from minift.training.recipes import compare_settings, load_recipe


def autocast(device: str) -> torch.autocast:
    """A bf16 autocast context for ``device`` (CPU or CUDA)."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def train_steps(model: torch.nn.Module, batches: Sequence[dict], tc: TrainConfig, cast: bool) -> list[float]:
    """``tc.steps`` AdamW steps on the trainable parameters of ``model``, moved to ``tc.device``, every op under bf16
    autocast: ``tc.lr`` with its warmup and schedule (``lr_factor``), ``tc.weight_decay``, clipping at
    ``tc.max_grad_norm``, over ``batches`` in an order seeded by ``tc.seed`` (the same order each pass). With
    ``cast`` the frozen parameters are stored in bf16 first (``frozen.enable``).

    Returns:
        The loss of each step.
    """
    model.to(tc.device).train()
    if cast:
        frozen.enable(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(tc.seed)).tolist()
    warmup, losses = tc.warmup_steps(tc.steps), []
    for step in range(tc.steps):
        for g in opt.param_groups:
            g["lr"] = tc.lr * lr_factor(step, tc.steps, warmup, tc.schedule)
        batch = {k: v.to(tc.device) if torch.is_tensor(v) else v for k, v in batches[order[step % len(order)]].items()}
        # one autocast context per step: autocast caches its bf16 casts of the trainable weights until
        # the outermost context exits, so a context around many steps would keep the first step's
        with autocast(tc.device):
            loss = model_forward(model, batch).loss
        loss.backward()
        if tc.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def run(task, cfg: CompareConfig, seed: int, cast: bool) -> dict:
    """One LoRA run (``train_steps``) at the recipe's lr, warmup, linear decay and weight decay, evaluated on the
    dev and test sentences under bf16 autocast."""
    recipe = load_recipe("sentiment-lora")
    lr, options = compare_settings(recipe, full=cfg.full)
    tc = train_config(cfg, recipe, lr, cfg.steps, seed)
    model = load_model(task, seed)
    build_method(model, "lora", options, tokenizer=task.tokenizer, lr=lr, weight_decay=tc.weight_decay,
                 total_steps=cfg.steps)
    t0 = time.perf_counter()
    losses = train_steps(model, task.train, tc, cast)
    model.eval()
    with autocast(cfg.device):
        dev, test = (evaluate(model, getattr(task, s), "classification", cfg.device) for s in ("dev", "test"))
    return {"dev": 100 * dev["accuracy"], "test": 100 * test["accuracy"], "loss": sum(losses[-50:]) / len(losses[-50:]),
            "s": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", default="0")
    p.add_argument("--device", default="cpu")
    p.add_argument("--train-limit", type=int, default=4000)
    p.add_argument("--eval-limit", type=int, default=400)
    p.add_argument("--max-len", type=int, default=64)
    a = p.parse_args()
    cfg = resolve(CompareConfig(methods=("lora",), model=a.model, steps=a.steps, device=a.device, batch_size=16,
                                max_len=a.max_len, train_limit=a.train_limit, eval_limit=a.eval_limit,
                                progress=False), log=lambda *_: None)
    task = load_task(cfg)
    print(f"LoRA (recipe sentiment-lora, compare's settings) on {a.model}: {a.steps} steps of 16 x <= {a.max_len}, "
          f"{a.train_limit} train / {a.eval_limit} dev and test sentences, bf16 autocast on {a.device}, "
          f"torch {torch.__version__}\n")
    print("| seed | base | dev acc | test acc | mean loss, last 50 steps | s |\n|---|---|---|---|---|---|")
    for seed in (int(s) for s in a.seeds.split(",")):
        rows = {cast: run(task, cfg, seed, cast) for cast in (False, True)}
        for cast, r in rows.items():
            print(f"| {seed} | {'bf16 (fast.frozen)' if cast else 'fp32'} | {r['dev']:.1f} | {r['test']:.1f} | "
                  f"{r['loss']:.4f} | {r['s']:.0f} |", flush=True)
        print(f"| {seed} | bf16 - fp32 | {rows[True]['dev'] - rows[False]['dev']:+.1f} | "
              f"{rows[True]['test'] - rows[False]['test']:+.1f} | | |", flush=True)


if __name__ == "__main__":
    main()
