"""The report of `minift bench`: tokens/s and peak memory as ratios to full fine-tuning, a Markdown
table, and a run's files (``<out>/<name>.json``, ``.md``, ``.png``) from the rows ``minift.studies.bench`` measures.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class Row:
    """One measured run: a method (or PEFT's) on one model, shape and mode."""
    impl: str  # "minift" or "peft"
    model: str
    method: str
    variant: str
    device: str
    dtype: str
    batch: int
    seq_len: int
    trainable: int
    total: int
    step_ms: float
    tokens_per_s: float
    peak_gib: float
    mfu: float
    ratio_tokens_vs_full: float = float("nan")
    ratio_mem_vs_full: float = float("nan")
    extra: dict = field(default_factory=dict)
    first_step_s: float = float("nan")  # the first step on the host clock: compiling, capturing CUDA graphs
    speed: str = ""                     # the speed plan the row ran (``SpeedPlan.describe()``); PEFT: empty


METHOD_FLAGS = ("merged_forward",)  # variant flags that change one method only (LoRA's merged forward)


def shared_variant(variant: str) -> str:
    """The variant without method-only flags: what full fine-tuning ran with."""
    return "+".join(f for f in variant.split("+") if f not in METHOD_FLAGS) or "eager-fp32-base"


def add_ratios(rows: list[Row]) -> list[Row]:
    """Ratio of tokens/s and peak memory to minift full fine-tuning of the same model and variant.

    A method whose speed plan differs from full fine-tuning's in the same run (AdaLoRA runs eager
    where full fine-tuning is compiled) compares with full fine-tuning as its plan ran it: the
    ratio of what ``minift train`` runs by default for each."""
    base = {(r.model, r.variant): r for r in rows if r.impl == "minift" and r.method == "full"}
    planned = {r.model: r for r in rows if r.impl == "minift" and r.method == "full" and r.speed}
    for r in rows:
        b = base.get((r.model, shared_variant(r.variant)))
        if b is None and r.impl == "minift" and r.speed:
            b = planned.get(r.model)
        if b is None and r.impl == "peft":  # PEFT rows compare with PEFT's own full run
            b = next((x for x in rows if x.impl == "peft" and x.method == "full" and x.model == r.model
                      and x.variant == r.variant), None)
        if b is not None:
            r.ratio_tokens_vs_full = r.tokens_per_s / b.tokens_per_s
            r.ratio_mem_vs_full = r.peak_gib / b.peak_gib if b.peak_gib == b.peak_gib else float("nan")
    return rows


def to_markdown(rows: list[Row]) -> str:
    head = ("| impl | model | method | variant | batch x seq | trainable | tokens/s | step ms | peak GiB "
            "| MFU | tok/s vs full | mem vs full | first step s |\n|" + "---|" * 13 + "\n")
    lines = []
    for r in rows:
        mfu = "-" if math.isnan(r.mfu) else f"{100 * r.mfu:.1f}%"
        pk = "-" if math.isnan(r.peak_gib) else f"{r.peak_gib:.2f}"
        rt = "-" if math.isnan(r.ratio_tokens_vs_full) else f"{r.ratio_tokens_vs_full:.2f}x"
        rm = "-" if math.isnan(r.ratio_mem_vs_full) else f"{r.ratio_mem_vs_full:.2f}x"
        fs = "-" if math.isnan(r.first_step_s) else f"{r.first_step_s:.1f}"
        lines.append(f"| {r.impl} | {r.model} | {r.method} | {r.variant} | {r.batch}x{r.seq_len} | "
                     f"{r.trainable:,} | {r.tokens_per_s:,.0f} | {r.step_ms:.1f} | {pk} | {mfu} | {rt} | {rm} | {fs} |")
    plans = [f"- {r.model} {r.method}: {r.speed}" for r in rows if r.speed]
    return (head + "\n".join(lines) + "\n"
            + ("\nSpeed plan per row (step ms: the steady median; first step s: compiling included):\n\n"
               + "\n".join(plans) + "\n" if plans else ""))


def save(rows: list[Row], out: Path, name: str, meta: dict) -> list[Path]:
    """Write ``<name>.json``, ``<name>.md`` and, with matplotlib and a minift row to draw,
    ``<name>.png`` under ``out`` (a ``<name>.png`` of an earlier run is removed otherwise).

    Returns:
        The paths written, in that order: only the files that exist now.
    """
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=1))
    md = f"# {name}\n\n" + "".join(f"- {k}: {v}\n" for k, v in meta.items()) + "\n" + to_markdown(rows)
    (out / f"{name}.md").write_text(md)
    written = [out / f"{name}.json", out / f"{name}.md"]
    (out / f"{name}.png").unlink(missing_ok=True)  # an earlier run's plot never stands beside these rows
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written  # the PNG needs the plot extra (matplotlib)
    mine = [r for r in rows if r.impl == "minift"]
    if not mine:
        return written
    fig, ax = plt.subplots(1, 2, figsize=(12, 4))
    labels = [f"{r.model}\n{r.method}" if len({x.model for x in mine}) > 1 else r.method for r in mine]
    ax[0].bar(range(len(mine)), [r.tokens_per_s for r in mine])
    ax[0].set_title(f"tokens/s ({meta.get('device', '')})")
    ax[1].bar(range(len(mine)), [r.peak_gib for r in mine], color="tab:orange")
    ax[1].set_title("peak GiB")
    for a in ax:
        a.set_xticks(range(len(mine)), labels, rotation=60, fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=110)
    plt.close(fig)
    return written + [out / f"{name}.png"]
