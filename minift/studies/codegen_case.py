"""The code generation case: adapt a ``minift pretrain`` model to the package it never saw
with AdaLoRA, LoRA and full fine-tuning, and write one results table.

    pretrained dir (+ corpus.json) ─► for method in (none, adalora, lora, full):
        fresh copy ─► build_method ─► train on the adapt-train files ─► next_line_eval on the eval files
    ─► <name>.json / <name>.md (trainable, time, perplexity, exact match, ROUGE-L)
       + the final AdaLoRA rank per layer (table; <name>-ranks.png with matplotlib)

AdaLoRA runs with fixed settings (init_r 12, target_r 8, alpha 32, beta1 = beta2 = 0.85,
tinit 200, tfinal 1000, deltaT 10) on every attention and MLP projection; a run shorter than
2000 steps scales tinit and tfinal by steps / 2000 (the table says so). LoRA: r 8, alpha 16 on
the same targets. Every method gets the same steps, batches and seed.

The pretrained directory may hold a GPT-2 or a Llama (``minift pretrain --arch``): it is loaded
as ``minift train`` loads it, by config.json's model_type. The targets are the six projections
GPT-2 has (``TARGETS``), and Llama's seven with its gate (``LLAMA_TARGETS``).
"""
from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from minift.studies.codegen import (DEFAULT_HELD_OUT, SMOKE_PRETRAIN, PretrainConfig, blocks, context_size,
                                    device_name, encode_files, next_line_eval, pretrain, resolve_device)
from minift.training.data import batches, load_tokenizer, pad_id
from minift.methods import adalora
from minift.methods.registry import build_method
from minift.models.llama import Llama
from minift.training.loop import train
from minift.training.config import TrainConfig
from minift.training.run import load_model

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")  # GPT-2's projections
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADALORA_REF_STEPS = 2000  # runs this long use tinit 200 / tfinal 1000 as given; shorter ones scale both


@dataclass
class CaseConfig:
    methods: tuple[str, ...] = ("adalora", "lora", "full")
    steps: int = 2000                 # optimizer steps per method; at 2000 AdaLoRA's schedule is unscaled
    batch_size: int = 8
    block_size: int = 256             # adaptation block (<= the model's)
    lr: dict = field(default_factory=lambda: {"adalora": 1e-3, "lora": 1e-3, "full": 1e-4})
    eval_lines: int = 300
    max_new_tokens: int = 64
    max_eval_blocks: int | None = None
    seed: int = 0
    device: str = "auto"
    progress: bool = True


SMOKE_CASE = dict(steps=30, batch_size=4, block_size=64, eval_lines=6, max_new_tokens=12, max_eval_blocks=8,
                  lr={"adalora": 3e-3, "lora": 3e-3, "full": 1e-3})


def targets_for(model) -> tuple[str, ...]:
    """The projections the methods adapt: ``LLAMA_TARGETS`` on a Llama, else ``TARGETS``."""
    return LLAMA_TARGETS if isinstance(model, Llama) else TARGETS


LORA = dict(r=8, alpha=16)  # the case's LoRA, on targets_for(model)
WARMUP = 0.05  # every method's share of the steps spent warming the learning rate up


def adalora_options(steps: int, targets=TARGETS) -> tuple[dict, str]:
    """The case's AdaLoRA settings; under ADALORA_REF_STEPS, tinit and tfinal scale by steps / 2000."""
    f = min(1.0, steps / ADALORA_REF_STEPS)
    opts = dict(init_r=12, target_r=8, alpha=32, beta1=0.85, beta2=0.85, tinit=int(200 * f),
                tfinal=int(1000 * f), delta_t=10, targets=tuple(targets))
    note = "as given" if f == 1.0 else f"scaled by {steps}/{ADALORA_REF_STEPS} for a short run"
    return opts, f"tinit {opts['tinit']}, tfinal {opts['tfinal']}, deltaT 10 ({note})"


def run_case(out, pretrained=None, corpus="stdlib", held_out=None, smoke: bool = False,
             case: CaseConfig | None = None, pre: PretrainConfig | None = None, name: str | None = None,
             log=print) -> dict:
    """Pretrain (or load ``pretrained``), adapt to the held-out package with each method, evaluate,
    and write ``<name>.json`` / ``.md`` (and ``<name>-ranks.png``) under ``out``. ``held_out``
    defaults to what the pretrained directory held out (when pretraining here: asyncio)."""
    case = case or (CaseConfig(**SMOKE_CASE) if smoke else CaseConfig())
    out = Path(out)
    if pretrained is None:
        pretrained = out / "pretrained"
        pre = pre or PretrainConfig(**(SMOKE_PRETRAIN if smoke else {}), device=case.device, progress=case.progress)
        pretrain(corpus, pretrained, held_out or DEFAULT_HELD_OUT, pre, log)
    pretrained = Path(pretrained)
    rec, held = read_split(pretrained, held_out)
    root = Path(rec["corpus"])
    train_files, eval_files = [root / f for f in rec["adapt_train"]], [root / f for f in rec["adapt_eval"]]
    tok = load_tokenizer(pretrained)
    device = resolve_device(case.device)
    probe = load_model(pretrained, "causal-lm")  # GPT-2 or Llama, by config.json's model_type
    block, targets, arch = min(case.block_size, context_size(probe)), targets_for(probe), type(probe).__name__
    del probe
    data = batches(blocks(encode_files(tok, train_files), block), case.batch_size, shuffle=True,
                   seed=case.seed, pad_id=pad_id(tok))
    evaluate = lambda m: next_line_eval(m, tok, eval_files, case.eval_lines, case.max_new_tokens,  # noqa: E731
                                        case.seed, device, max_eval_blocks=case.max_eval_blocks)
    rows, ranks = [], None
    for method in ("pretrained",) + tuple(case.methods):
        row, method_ranks = _adapt(method, pretrained, data, case, device, evaluate, targets, log)
        rows.append(row)
        if method == "adalora":
            ranks = method_ranks
    ada_note = adalora_options(case.steps)[1]
    meta = {"device": device_name(device), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "held_out": ", ".join(held), "adapt_train_files": len(train_files), "eval_files": len(eval_files),
            "adapt_batches": len(data), "steps": case.steps, "batch": f"{case.batch_size} x {block} tokens",
            "lr": case.lr, "adalora": f"init_r 12, target_r 8, alpha 32, b1 = b2 = 0.85, {ada_note}",
            "lora": f"r {LORA['r']}, alpha {LORA['alpha']}", "targets": ", ".join(targets),
            "eval_lines": rows[0]["lines"],
            "pretrained": f"{arch}, {rec['params']:,} params, {rec['steps']} steps on {rec['pretrain_tokens']:,} "
                          f"tokens of {len(rec['pretrain_packages'])} packages ({rec['device']}, "
                          f"{rec['time_s'] / 60:.1f} min, final loss {rec['final_loss']:.3f})"}
    name = name or ("codegen-smoke" if smoke else f"codegen-{'cuda' if device.startswith('cuda') else 'cpu'}")
    result = {"meta": meta, "rows": rows, "rank_pattern": ranks}
    log(f"wrote {', '.join(str(p) for p in save(result, out, name))}")
    return result


def read_split(pretrained: Path, held_out: str | Sequence[str] | None) -> tuple[dict, tuple[str, ...]]:
    """``corpus.json`` of a pretrained directory, and the held-out packages, checked: the model
    never saw them, and they are what it held out.

    Args:
        pretrained: a directory ``minift pretrain`` wrote.
        held_out: a package or packages to adapt to; None or empty: the ones the directory held out.
    Returns:
        The directory's corpus record, and the held-out packages.
    Raises:
        FileNotFoundError: no ``corpus.json`` there.
        ValueError: a package the model was pretrained on, or not the ones it held out.
    """
    rec_file = pretrained / "corpus.json"
    if not rec_file.is_file():
        raise FileNotFoundError(f"{pretrained} has no corpus.json (written by `minift pretrain`): "
                                f"without it the held-out split cannot be checked")
    rec = json.loads(rec_file.read_text())
    held = tuple(rec["held_out"]) if not held_out else (held_out,) if isinstance(held_out, str) else tuple(held_out)
    seen = sorted(set(held) & set(rec["pretrain_packages"]))
    if seen:
        raise ValueError(f"{pretrained} was pretrained on {', '.join(seen)}: hold it out at pretraining")
    if set(held) != set(rec["held_out"]):
        raise ValueError(f"{pretrained} holds out {', '.join(rec['held_out'])}, not {', '.join(held)}")
    return rec, held


def _adapt(method: str, pretrained: Path, data, case: CaseConfig, device: str, evaluate, targets,
           log) -> tuple[dict, dict | None]:
    """A fresh copy of the pretrained model, adapted with ``method`` ("pretrained": as it is) and
    evaluated: its results row, and its final rank pattern (AdaLoRA; else None)."""
    model = load_model(pretrained, "causal-lm", seed=case.seed)  # seeds torch with case.seed first
    row = {"method": method, "trainable": 0, "params": sum(p.numel() for p in model.parameters()),
           "steps": 0, "time_s": 0.0, "train_loss": None}
    ranks = None
    if method != "pretrained":
        log(f"codegen-case: {method}")
        opts = {"adalora": adalora_options(case.steps, targets)[0], "lora": dict(**LORA, targets=targets),
                "full": {}}[method]
        st = build_method(model, method, opts, lr=case.lr[method], total_steps=case.steps)
        row["trainable"], row["params"] = st.trainable(model)
        t0 = time.perf_counter()
        res = train(model, data, TrainConfig(lr=case.lr[method], steps=case.steps, warmup=WARMUP, device=device,
                                             seed=case.seed, progress=case.progress, plot=False),
                    **st.train_hooks())
        row.update(steps=res.steps, time_s=time.perf_counter() - t0,
                   train_loss=sum(res.losses[-10:]) / len(res.losses[-10:]))
        if method == "adalora":
            ranks = adalora.rank_pattern(model)
    row.update(evaluate(model))
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return row, ranks



# ---------------------------------------------------------------------------- reporting

def rank_table(ranks: dict[str, list[bool]]) -> tuple[list[int], list[str], list[list[int]]]:
    """(layers, targets, kept rank per layer x target) from ``adalora.rank_pattern``'s {name: flags}.
    Names are "layers.<i>.<block>.<target>" (GPT-2: attn / mlp; Llama: self_attn / mlp)."""
    kept = {(int(n.split(".")[1]), n.rsplit(".", 1)[1]): sum(f) for n, f in ranks.items()}
    layers = sorted({i for i, _ in kept})
    targets = [t for t in LLAMA_TARGETS if t in {k for _, k in kept}]  # in the models' order
    return layers, targets, [[kept.get((i, t), 0) for t in targets] for i in layers]


def to_markdown(result: dict) -> str:
    rows = ["Train loss: mean of the last 10 steps (AdaLoRA's includes its orthogonal penalty); perplexity, exact "
            "match and ROUGE-L on the held-out eval files.\n",
            "| method | trainable | time s | train loss | perplexity | exact match | ROUGE-L |", "|" + "---|" * 7]
    for r in result["rows"]:
        loss = "-" if r["train_loss"] is None else f"{r['train_loss']:.3f}"
        rows.append(f"| {r['method']} | {r['trainable']:,} of {r['params']:,} | {r['time_s']:.1f} | {loss} | "
                    f"{r['perplexity']:.2f} | {100 * r['exact_match']:.1f}% | {r['rouge_l']:.3f} |")
    md = "\n".join(rows) + "\n"
    if result["rank_pattern"]:
        layers, targets, grid = rank_table(result["rank_pattern"])
        md += ("\nFinal AdaLoRA rank per layer (kept singular values of init_r 12; budget: target_r 8 on "
               "average):\n\n| layer | " + " | ".join(targets) + " | total |\n|" + "---|" * (len(targets) + 2) + "\n")
        md += "".join(f"| {i} | " + " | ".join(map(str, g)) + f" | {sum(g)} |\n" for i, g in zip(layers, grid))
    return md


def save(result: dict, out: Path, name: str) -> list[Path]:
    """Write ``<name>.json``, ``<name>.md`` and, with matplotlib and an AdaLoRA rank pattern,
    ``<name>-ranks.png`` under ``out`` (a ``<name>-ranks.png`` of an earlier run is removed otherwise).

    Returns:
        The paths written, in that order: only the files that exist now.
    """
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    meta = "".join(f"- {k}: {v}\n" for k, v in result["meta"].items())
    (out / f"{name}.md").write_text(f"# {name}\n\n{meta}\n{to_markdown(result)}")
    written = [out / f"{name}.json", out / f"{name}.md"]
    (out / f"{name}-ranks.png").unlink(missing_ok=True)  # an earlier run's ranks never stand beside these rows
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written  # the PNG needs the plot extra (matplotlib)
    if result["rank_pattern"]:
        layers, targets, grid = rank_table(result["rank_pattern"])
        fig, ax = plt.subplots(figsize=(6, 1 + 0.45 * len(layers)))
        im = ax.imshow(grid, vmin=0, vmax=12, cmap="viridis")
        ax.set_xticks(range(len(targets)), targets, fontsize=8)
        ax.set_yticks(range(len(layers)), [f"layer {i}" for i in layers], fontsize=8)
        for i, g in enumerate(grid):
            for j, v in enumerate(g):
                ax.text(j, i, v, ha="center", va="center", color="w", fontsize=8)
        ax.set_title(f"AdaLoRA final ranks ({result['meta']['device']})", fontsize=9)
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(out / f"{name}-ranks.png", dpi=110)
        plt.close(fig)
        written.append(out / f"{name}-ranks.png")
    return written
