"""What a training run writes besides its checkpoints: ``metrics.jsonl``, one JSON record per
optimizer step (``{"step", "loss", "lr", "tok_s"}``) and per evaluation (``{"step", "eval"}``),
cut back to a checkpoint's step when a run resumes; and ``loss.png``, the loss curves."""
from __future__ import annotations

import json
from pathlib import Path

from minift.files import InputError, read_text


def append(path, *records: dict) -> None:
    """One JSON line per record at the end of the log, in one write (none without a path)."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in records))


def truncate(path, step: int, drop_eval: bool = False) -> None:
    """Keep the log lines up to ``step``; with ``drop_eval``, not the evaluation of ``step``.
    A half-written last line (a crash mid-append) is dropped; a bad line before it is an error."""
    if path and Path(path).is_file():
        lines = [line for line in read_text(path, "metrics log").splitlines() if line.strip()]
        records = []
        for i, line in enumerate(lines, 1):
            try:
                r = json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                r = None
            if not isinstance(r, dict) or not isinstance(r.get("step", 0), int):
                if i == len(lines):
                    break  # the line a crash cut short
                raise InputError(f"{path}:{i}: not a metrics record; move the file away to resume without it")
            records.append((line, r))
        keep = [line for line, r in records if r.get("step", 0) < step or r.get("step", 0) == step
                and not (drop_eval and "eval" in r)]
        Path(path).write_text("".join(line + "\n" for line in keep))


def plot_losses(losses: list[float], evals: list[dict], path) -> bool:
    """Training (and eval) loss curves as a PNG; False if matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(range(1, len(losses) + 1), losses, label="train loss")
    ev = [e for e in evals if "loss" in e]
    if ev:
        ax.plot([e["step"] for e in ev], [e["loss"] for e in ev], "o-", label="eval loss")
    ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
