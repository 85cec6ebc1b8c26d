"""Step times of `minift train` runs, read back from their metrics.jsonl files.

    python3 benchmarks/train_speed.py RUN_DIR [RUN_DIR ...] [--skip N] > table.md

The loop logs each step's cumulative throughput, ``tok_s = tokens so far / seconds since the
first step began``. For causal-lm runs every step has the same number of tokens, so the time
at the end of step k is ``k * tokens_per_step / tok_s``; the differences are the step times.
Intervals that begin before step ``--skip`` (default 10: allocator warm-up, autotuning) are left out of the
median. Prints one Markdown row per run directory.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def step_times(metrics: Path, tokens_per_step: int, skip: int) -> list[float]:
    """Seconds per step after step ``skip``, one value per logged interval, from one run's metrics.jsonl.

    An interval between two logged steps a < b gives (time at b - time at a) / (b - a)."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    points = [(r["step"], r["step"] * tokens_per_step / r["tok_s"]) for r in rows if r.get("tok_s", 0) > 0]
    points = [(0, 0.0)] + sorted(points)
    return [(tb - ta) / (sb - sa) for (sa, ta), (sb, tb) in zip(points, points[1:]) if sa >= skip and sb > sa]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--tokens-per-step", type=int, default=8 * 1024, help="batch x block size (default 8 x 1024)")
    p.add_argument("--skip", type=int, default=10)
    args = p.parse_args()
    print("| run | intervals timed | median step (ms) | min-max (ms) | tokens/s |")
    print("| --- | --- | --- | --- | --- |")
    for run in args.runs:
        path = run / "metrics.jsonl"
        if not path.is_file():
            print(f"| {run.name} | no metrics.jsonl | | | |")
            continue
        times = step_times(path, args.tokens_per_step, args.skip)
        if not times:
            print(f"| {run.name} | 0 (fewer than {args.skip + 1} steps) | | | |")
            continue
        med = statistics.median(times)
        print(f"| {run.name} | {len(times)} | {med * 1e3:.1f} | {min(times) * 1e3:.1f}-{max(times) * 1e3:.1f} "
              f"| {args.tokens_per_step / med:,.0f} |")


if __name__ == "__main__":
    main()
