"""Does a frozen base stored in bf16 (``minift.fast.frozen``) cost a pre-norm causal LM anything? LoRA adapting a
small GPT-2 or Llama pretrained on the standard library to the package it held out, the same run twice under
bf16 autocast: once with the fp32 base, once with every frozen parameter (embeddings and norms too) in bf16.

    python benchmarks/frozen_accuracy_lm.py --pretrained runs/frozen-lm/gpt2 [--arch gpt2] [--steps 300] [--seeds 0,1]

A ``--pretrained`` directory without a model is first filled by ``minift.studies.codegen.pretrain`` with
``SMALL_PRETRAIN`` (a model the CPU pretrains in minutes; ``minift pretrain``'s sizes are the GPU's), asyncio held out;
a ``minift pretrain`` directory is used as it is. The runs are the codegen case's LoRA run (its data, r, alpha,
targets, lr, warmup and schedule: ``minift.studies.codegen_case``) written out as ``frozen_accuracy.py``'s plain AdamW
loop with every op under bf16 autocast on ``--device``. In a pre-norm model the bf16 base makes the residual stream
bf16 through every block. Prints one Markdown table: the eval files' loss, perplexity and next-token accuracy per
seed, both ways, and their difference.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from minift.fast import frozen
from minift.methods.registry import build_method
from minift.studies.codegen import (DEFAULT_HELD_OUT, PretrainConfig, blocks, context_size, encode_files,
                                    next_line_eval, pretrain)
from minift.studies.codegen_case import LORA, WARMUP, CaseConfig, read_split, targets_for
from minift.training.config import TrainConfig
from minift.training.data import batches, load_tokenizer, pad_id
from minift.training.run import load_model

from frozen_accuracy import autocast, train_steps  # the benchmark beside this one: its folder is on sys.path

# 6 layers of width 256 (4 heads), a 4,096-token BPE, 128-token blocks of 16: ~5.8M parameters; on 2 CPU cores
# in fp32 about 0.5 s a step, so --pretrain-steps 900 takes under 10 minutes
SMALL_PRETRAIN = dict(vocab_size=4096, n_layer=6, n_head=4, n_embd=256, block_size=128, dropout=0.0, batch_size=16)


def ensure_pretrained(path: Path, arch: str, steps: int, device: str, log=print) -> Path:
    """``path``; when it holds no ``minift pretrain`` directory, ``SMALL_PRETRAIN`` of ``arch`` is first pretrained
    there for ``steps`` steps on the standard library, asyncio held out."""
    if not (path / "corpus.json").is_file():
        cfg = PretrainConfig(**SMALL_PRETRAIN, arch=arch, steps=steps, device=device, progress=False)
        rec = pretrain("stdlib", path, DEFAULT_HELD_OUT, cfg, log)
        log(f"pretrained {path}: {rec['params']:,} parameters, {rec['steps']} steps in {rec['time_s'] / 60:.1f} min, "
            f"final loss {rec['final_loss']:.3f}")
    return path


@dataclass
class Adaptation:
    """The codegen case's adaptation of one pretrained directory: its tokenizer, the adapt-train files' batches
    (blocks of ``min(case.block_size, the model's context)``) and the eval files of the held-out package."""
    pretrained: Path
    case: CaseConfig
    tok: object
    batches: list[dict]
    eval_files: list[Path]


def load_adaptation(pretrained: Path, case: CaseConfig) -> Adaptation:
    """The held-out package's split as ``corpus.json`` records it, tokenized and batched as ``run_case`` does."""
    rec, _ = read_split(pretrained, None)
    root, tok = Path(rec["corpus"]), load_tokenizer(pretrained)
    block = min(case.block_size, context_size(load_model(pretrained, "causal-lm")))
    data = batches(blocks(encode_files(tok, [root / f for f in rec["adapt_train"]]), block), case.batch_size,
                   shuffle=True, seed=case.seed, pad_id=pad_id(tok))
    return Adaptation(pretrained, case, tok, data, [root / f for f in rec["adapt_eval"]])


def run(ad: Adaptation, seed: int, cast: bool, adapt: bool = True) -> dict:
    """A fresh copy of the pretrained model, with LoRA trained ``ad.case.steps`` steps (``train_steps``; with
    ``adapt`` False: none, the pretrained model as it is), its base in bf16 when ``cast``, evaluated on the eval
    files under bf16 autocast (``next_line_eval``: perplexity, next-line exact match and ROUGE-L)."""
    case = ad.case
    model = load_model(ad.pretrained, "causal-lm", seed=seed)  # seeds torch first: LoRA's init follows the seed
    t0, losses = time.perf_counter(), []
    if adapt:
        build_method(model, "lora", dict(LORA, targets=targets_for(model)), lr=case.lr["lora"], total_steps=case.steps)
        tc = TrainConfig(lr=case.lr["lora"], steps=case.steps, warmup=WARMUP, device=case.device, seed=seed)
        losses = train_steps(model, ad.batches, tc, cast)
    elif cast:
        frozen.enable(model.requires_grad_(False))  # nothing trains: every parameter is frozen
    with autocast(case.device):
        ev = next_line_eval(model, ad.tok, ad.eval_files, case.eval_lines, case.max_new_tokens, case.seed,
                            case.device, max_eval_blocks=case.max_eval_blocks)
    return {"loss": math.log(ev["perplexity"]), "ppl": ev["perplexity"], "em": 100 * ev["exact_match"],
            "rouge": ev["rouge_l"], "train": sum(losses[-50:]) / len(losses[-50:]) if losses else None,
            "s": time.perf_counter() - t0}


def row(seed: str, base: str, r: dict) -> str:
    train = "" if r["train"] is None else f"{r['train']:.4f}"
    return (f"| {seed} | {base} | {r['loss']:.4f} | {r['ppl']:.3f} | {r['em']:.1f} | {r['rouge']:.3f} | {train} | "
            f"{r['s']:.0f} |")


def diff_row(seed: str, fp32: dict, bf16: dict) -> str:
    d = {k: bf16[k] - fp32[k] for k in ("loss", "ppl", "em", "rouge")}
    train = "" if fp32["train"] is None else f"{bf16['train'] - fp32['train']:+.4f}"
    return (f"| {seed} | bf16 - fp32 | {d['loss']:+.4f} | {d['ppl']:+.3f} | {d['em']:+.1f} | {d['rouge']:+.3f} | "
            f"{train} | |")


def header(ad: Adaptation) -> str:
    rec, case = json.loads((ad.pretrained / "corpus.json").read_text()), ad.case
    b = ad.batches[0]["input_ids"].shape
    return (f"LoRA r {LORA['r']}, alpha {LORA['alpha']} (the codegen case's) on {ad.pretrained} ({rec['arch']}, "
            f"{rec['params']:,} parameters, pretrained {rec['steps']} steps on {rec['pretrain_tokens']:,} tokens, "
            f"final loss {rec['final_loss']:.3f}), adapted to {', '.join(rec['held_out'])}: {case.steps} steps of "
            f"{b[0]} x {b[1]} tokens ({len(ad.batches)} batches of {len(rec['adapt_train'])} files), lr "
            f"{case.lr['lora']}, evaluated on {len(ad.eval_files)} files ({case.eval_lines} lines for next-line "
            f"completion, at most {case.max_new_tokens} new tokens), bf16 autocast on {case.device}, "
            f"torch {torch.__version__}\n\n"
            "| seed | base | eval loss | perplexity | next-line exact % | ROUGE-L | train loss, last 50 steps | s |\n"
            "|---|---|---|---|---|---|---|---|")


def compare(ad: Adaptation, seed, adapt: bool) -> None:
    """Print the fp32 and bf16 rows of one seed (``adapt`` False: the pretrained model) and their difference."""
    label = str(seed) if adapt else "pretrained"
    fp32, bf16 = (run(ad, seed, cast, adapt) for cast in (False, True))
    print(f"{row(label, 'fp32', fp32)}\n{row(label, 'bf16 (fast.frozen)', bf16)}\n{diff_row(label, fp32, bf16)}",
          flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pretrained", required=True, help="a `minift pretrain` directory, or where to pretrain one")
    p.add_argument("--arch", choices=("gpt2", "llama"), default="gpt2", help="the model pretrained when there is none")
    p.add_argument("--pretrain-steps", type=int, default=900)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", default="0")
    p.add_argument("--eval-lines", type=int, default=200)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    pretrained = ensure_pretrained(Path(a.pretrained), a.arch, a.pretrain_steps, a.device, log)
    case = CaseConfig(methods=("lora",), steps=a.steps, eval_lines=a.eval_lines, max_new_tokens=a.max_new_tokens,
                      device=a.device, progress=False)
    ad = load_adaptation(pretrained, case)
    print(header(ad), flush=True)
    compare(ad, 0, adapt=False)
    for seed in (int(s) for s in a.seeds.split(",")):
        compare(ad, seed, adapt=True)


if __name__ == "__main__":
    main()
