"""The report of `minift compare`: a terminal table, Markdown, JSON, predictions and a PNG chart.

    rows (one per method and seed) ─► summarize ─► one Summary per method: mean and 95% interval
                                                   of each metric over the seeds, and the paired
                                                   differences to the reference method
                                   ─► to_text (stdout); save: <out>/<name>.json, .md, .png and
                                      <name>-predictions.jsonl (every evaluated example)

The interval of a mean over n seeds is the t interval, mean +- t_{0.975, n-1} s / sqrt(n)
(``minift.metrics.mean_interval``). A difference to the reference is paired: both methods ran
with the same seeds, so the same data order and, for the new parameters they share (the
classification head), the same initialization; the interval is that of the n per-seed
differences, and the difference is marked significant when its interval excludes zero.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from minift.metrics import mean_interval

COLUMNS = ("method", "trainable", "% of all", "lr", "wall s", "tokens/s", "peak MiB", "dev acc", "dev F1",
           "test acc", "test F1", "note")
METRICS = ("dev_acc", "dev_f1", "test_acc", "test_f1")
DIFF_METRICS = ("test_acc", "test_f1")

LEGEND = ("wall s: training time (probe: feature extraction of every split + one probe per layer); "
          "tokens/s: real (unpadded) training tokens per second (probe: forward tokens per second); "
          "lr: peak learning rate (the recipe's [compare.full] lr under --full, else its [compare] lr, else its "
          "[train] lr); peak MiB: see memory above; "
          "accuracy and macro-F1 in %, of the final weights (no early stopping); with several seeds: the mean "
          "over seeds +- the half-width of its 95% t interval, and wall s, tokens/s the mean, peak MiB the "
          "largest; trainable % of all parameters, classification head included.\n")


@dataclass
class Summary:
    """One method over its seeds."""
    method: str
    seeds: list[int]
    first: object                                   # the first seed's Row (trainable counts, lr, note)
    wall_s: float
    tokens_per_s: float
    peak_mib: float
    metrics: dict[str, tuple[float, float | None]]  # name -> (mean, half-width or None)
    diffs: dict[str, tuple[float, float | None, bool]] = field(default_factory=dict)  # vs the reference


def summarize(rows: list, reference: str | None = None) -> list[Summary]:
    """One Summary per method, in the order the rows first name them. ``diffs`` (to
    ``reference``, over the seeds both ran) are filled for every method but the reference."""
    by_method: dict[str, list] = {}
    for r in rows:
        by_method.setdefault(r.method, []).append(r)
    out = []
    for method, rs in by_method.items():
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        out.append(Summary(method, [r.seed for r in rs], rs[0], mean([r.wall_s for r in rs]),
                           mean([r.tokens_per_s for r in rs]), max(r.peak_mib for r in rs),
                           {m: mean_interval([getattr(r, m) for r in rs]) for m in METRICS}))
    ref = by_method.get(reference)
    if ref is not None:
        ref_by_seed = {r.seed: r for r in ref}
        for s in out:
            if s.method == reference:
                continue
            pairs = [(r, ref_by_seed[r.seed]) for r in by_method[s.method] if r.seed in ref_by_seed]
            for m in DIFF_METRICS if len(pairs) >= 2 else ():  # fewer than two paired seeds: no difference
                d, half = mean_interval([getattr(a, m) - getattr(b, m) for a, b in pairs])
                s.diffs[m] = (d, half, half is not None and abs(d) > half)
    return out


def _pct(v: tuple[float, float | None]) -> str:
    mean, half = v
    return f"{100 * mean:.1f}" if half is None else f"{100 * mean:.1f} ± {100 * half:.1f}"


def _cells(s: Summary) -> list[str]:
    r = s.first
    return [r.method, f"{r.trainable:,}", f"{r.trainable_pct:.3g}%", "-" if r.lr is None else f"{r.lr:g}",
            f"{s.wall_s:.1f}", f"{s.tokens_per_s:,.0f}", f"{s.peak_mib:,.0f}",
            *(_pct(s.metrics[m]) for m in METRICS), r.note]


def _diff_lines(summaries: list[Summary], reference: str | None) -> list[list[str]]:
    """The paired-difference table: header row, then one row per method with differences."""
    rows = [[s.method, *(f"{100 * d:+.1f}" + ("" if h is None else f" ± {100 * h:.1f}") + (" *" if sig else "")
                        for d, h, sig in (s.diffs[m] for m in DIFF_METRICS))]
            for s in summaries if s.diffs]
    return [[f"method - {reference}", "test acc", "test F1"]] + rows if rows else []


DIFF_NOTE = ("paired differences in points (same seeds, same data order), mean +- the half-width of its 95% "
             "t interval; * marks an interval that excludes zero")


def to_markdown(rows: list, reference: str | None = None) -> str:
    summaries = summarize(rows, reference)
    head = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    md = head + "".join("| " + " | ".join(_cells(s)) + " |\n" for s in summaries)
    diff = _diff_lines(summaries, reference)
    if diff:
        md += ("\n" + "| " + " | ".join(diff[0]) + " |\n|" + "---|" * len(diff[0]) + "\n"
               + "".join("| " + " | ".join(r) + " |\n" for r in diff[1:]) + "\n" + DIFF_NOTE + ".\n")
    return md


def _aligned(table: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.ljust(w) if i in (0, len(widths) - 1) else c.rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths))).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n"


def to_text(rows: list, reference: str | None = None) -> str:
    """Plain-text tables for the terminal (aligned columns): the methods, then the differences."""
    summaries = summarize(rows, reference)
    text = _aligned([list(COLUMNS)] + [_cells(s) for s in summaries])
    diff = _diff_lines(summaries, reference)
    if diff:
        text += "\n" + _aligned(diff) + DIFF_NOTE + "\n"
    return text


def save(rows: list, meta: dict, out: Path, name: str) -> list[Path]:
    """``<name>.json``, ``<name>.md``, ``<name>-predictions.jsonl`` and (with matplotlib)
    ``<name>.png`` under ``out``; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    reference = meta.get("reference")
    summaries = summarize(rows, reference)
    paths = [out / f"{name}.json", out / f"{name}.md", out / f"{name}-predictions.jsonl"]
    summary = [{"method": s.method, "seeds": s.seeds,
                **{m: {"mean": mean, "ci95": half} for m, (mean, half) in s.metrics.items()},
                "diff_to_reference": {m: {"mean": d, "ci95": h, "significant": sig} for m, (d, h, sig) in
                                      s.diffs.items()}} for s in summaries]
    plain = [{k: v for k, v in asdict(r).items() if k != "predictions"} for r in rows]
    paths[0].write_text(json.dumps({"meta": meta, "rows": plain, "summary": summary}, indent=1))
    md = (f"# minift compare — {meta['device']}\n\n" + "".join(f"- {k}: {v}\n" for k, v in meta.items())
          + "\n" + to_markdown(rows, reference) + "\n" + LEGEND)
    paths[1].write_text(md)
    labels = meta.get("labels")
    name_of = (lambda i: labels[i]) if labels else (lambda i: i)  # noqa: E731
    with paths[2].open("w") as f:
        for r in rows:
            for split, records in r.predictions.items():
                for p in records:
                    f.write(json.dumps({"method": r.method, "seed": r.seed, "split": split, "id": p["id"],
                                        "gold": name_of(p["gold"]), "pred": name_of(p["pred"]),
                                        "score": p["score"]}) + "\n")
    if plot(rows, meta, out / f"{name}.png"):
        paths.append(out / f"{name}.png")
    return paths


def plot(rows: list, meta: dict, path: Path) -> bool:
    """Test accuracy (with its 95% interval over seeds as error bars), wall time and trainable
    share per method; False without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    summaries = summarize(rows, meta.get("reference"))
    fig = Figure(figsize=(13, 4))
    ax = fig.subplots(1, 3)
    x = range(len(summaries))
    names = [s.method for s in summaries]
    acc = [100 * s.metrics["test_acc"][0] for s in summaries]
    err = [100 * (s.metrics["test_acc"][1] or 0.0) for s in summaries]
    ax[0].bar(x, acc, yerr=err, capsize=3)
    ax[0].set_ylim(max(0, min(a - e for a, e in zip(acc, err)) - 10), 100)
    n = len(meta.get("seeds", [0]))
    ax[0].set_title("test accuracy %" + (f" (mean of {n} seeds, 95% interval)" if n > 1 else ""))
    ax[1].bar(x, [s.wall_s for s in summaries], color="tab:orange")
    ax[1].set_title("training wall time (s)")
    ax[2].bar(x, [max(s.first.trainable_pct, 1e-4) for s in summaries], color="tab:green")
    ax[2].set_yscale("log")
    ax[2].set_title("trainable parameters (% of all)")
    for a in ax:
        a.set_xticks(list(x), names, rotation=45, fontsize=8)
    fig.suptitle(f"minift compare — {meta['device']}, {meta['steps']} steps, {meta['examples']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True
