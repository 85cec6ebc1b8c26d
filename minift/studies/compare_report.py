"""The report of `minift compare`: a terminal table, Markdown, JSON and a PNG chart.

    rows (one per method) + meta (device, data, budget) ─► to_text   (stdout)
                                                      ─► save      <out>/<name>.json, .md, .png
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

COLUMNS = ("method", "trainable", "% of all", "lr", "wall s", "tokens/s", "peak MiB", "dev acc", "dev F1",
           "test acc", "test F1", "note")


LEGEND = ("wall s: training time (probe: feature extraction of every split + one probe per layer); "
          "tokens/s: real (unpadded) training tokens per second (probe: forward tokens per second); "
          "lr: peak learning rate (the recipe's [compare] lr, else its [train] lr); peak MiB: see memory above; accuracy and macro-F1 in %, of the final weights (no early stopping); "
          "trainable % of all parameters, classification head included.\n")


def _cells(r) -> list[str]:
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    return [r.method, f"{r.trainable:,}", f"{r.trainable_pct:.3g}%", "-" if r.lr is None else f"{r.lr:g}",
            f"{r.wall_s:.1f}", f"{r.tokens_per_s:,.0f}",
            f"{r.peak_mib:,.0f}", pct(r.dev_acc), pct(r.dev_f1), pct(r.test_acc), pct(r.test_f1), r.note]


def to_markdown(rows: list) -> str:
    head = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    return head + "".join("| " + " | ".join(_cells(r)) + " |\n" for r in rows)


def to_text(rows: list) -> str:
    """A plain-text table for the terminal (aligned columns)."""
    table = [list(COLUMNS)] + [_cells(r) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i in (0, len(COLUMNS) - 1) else c.rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths))).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n"


def save(rows: list, meta: dict, out: Path, name: str) -> list[Path]:
    """``<name>.json``, ``<name>.md`` and (with matplotlib) ``<name>.png`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.json", out / f"{name}.md"]
    paths[0].write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=1))
    md = (f"# minift compare — {meta['device']}\n\n" + "".join(f"- {k}: {v}\n" for k, v in meta.items())
          + "\n" + to_markdown(rows) + "\n" + LEGEND)
    paths[1].write_text(md)
    if plot(rows, meta, out / f"{name}.png"):
        paths.append(out / f"{name}.png")
    return paths


def plot(rows: list, meta: dict, path: Path) -> bool:
    """Test accuracy, wall time and trainable share per method; False without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    fig = Figure(figsize=(13, 4))
    ax = fig.subplots(1, 3)
    x = range(len(rows))
    names = [r.method for r in rows]
    ax[0].bar(x, [100 * r.test_acc for r in rows])
    ax[0].set_ylim(max(0, min(100 * r.test_acc for r in rows) - 10), 100)
    ax[0].set_title("test accuracy %")
    ax[1].bar(x, [r.wall_s for r in rows], color="tab:orange")
    ax[1].set_title("training wall time (s)")
    ax[2].bar(x, [max(r.trainable_pct, 1e-4) for r in rows], color="tab:green")
    ax[2].set_yscale("log")
    ax[2].set_title("trainable parameters (% of all)")
    for a in ax:
        a.set_xticks(list(x), names, rotation=45, fontsize=8)
    fig.suptitle(f"minift compare — {meta['device']}, {meta['steps']} steps, {meta['examples']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True
