"""Does a frozen base stored in bf16 (``minift.fast.frozen``) cost accuracy? LoRA on MiniLM-L6 sentiment,
the same run twice under bf16 autocast: once with the fp32 base, once with every frozen parameter in bf16.

    python benchmarks/frozen_accuracy.py --model weights/minilm-fp16 [--steps 300] [--seeds 0,1] [--device cpu]

The runs are ``minift compare``'s LoRA run (its recipe's lr and options, ``compare_setup``'s data and
model), with the loop wrapped in bf16 autocast on ``--device`` (``minift train``'s loop enters autocast on
CUDA only; on the CPU this script does). On the CPU autocast also leaves LayerNorm in bf16 where CUDA runs
it in fp32, so a CPU run is the harsher test. Prints one Markdown table: dev and test accuracy per seed,
both ways, and their difference. Needs the sentiment data in MINIFT_CACHE (``minift fetch sentiment``).
"""
from __future__ import annotations

import argparse
import time

import torch

from minift.fast import frozen
from minift.methods.registry import build_method
from minift.studies.compare_setup import CompareConfig, load_model, load_task, resolve, train_config
from minift.training.evaluate import evaluate
from minift.training.loop import train
from minift.training.recipes import compare_settings, load_recipe


def run(task, cfg: CompareConfig, seed: int, cast: bool) -> dict:
    recipe = load_recipe("sentiment-lora")
    lr, options = compare_settings(recipe, full=cfg.full)
    model = load_model(task, seed)
    state = build_method(model, "lora", options, tokenizer=task.tokenizer, lr=lr,
                         weight_decay=recipe["train"].get("weight_decay", 0.0), total_steps=cfg.steps)
    model.to(cfg.device)
    if cast:
        frozen.enable(model)
    t0 = time.perf_counter()
    with torch.autocast(torch.device(cfg.device).type, dtype=torch.bfloat16):
        res = train(model, task.train, train_config(cfg, recipe, lr, cfg.steps, seed), **state.train_hooks())
        dev, test = (evaluate(model, getattr(task, s), "classification", cfg.device) for s in ("dev", "test"))
    return {"dev": 100 * dev["accuracy"], "test": 100 * test["accuracy"], "loss": res.losses[-1],
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
    print("| seed | base | dev acc | test acc | last loss | s |\n|---|---|---|---|---|---|")
    for seed in (int(s) for s in a.seeds.split(",")):
        rows = {cast: run(task, cfg, seed, cast) for cast in (False, True)}
        for cast, r in rows.items():
            print(f"| {seed} | {'bf16 (fast.frozen)' if cast else 'fp32'} | {r['dev']:.1f} | {r['test']:.1f} | "
                  f"{r['loss']:.4f} | {r['s']:.0f} |", flush=True)
        print(f"| {seed} | bf16 - fp32 | {rows[True]['dev'] - rows[False]['dev']:+.1f} | "
              f"{rows[True]['test'] - rows[False]['test']:+.1f} | | |", flush=True)


if __name__ == "__main__":
    main()
