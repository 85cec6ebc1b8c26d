"""Step times of `minift train` runs, read back from their metrics.jsonl files, and their summary lines.

    python3 benchmarks/train_speed.py RUN_DIR|LOG [RUN_DIR|LOG ...] [--skip N] > table.md

A LOG (a file: what `minift train` printed, as benchmarks/gpu.sh keeps it in OUT/NAME.log) gives
the run's summary line, the JSON object it prints last: ``steady_step_ms`` and
``steady_tokens_per_s`` (after the warm-up steps, speed.WARMUP_STEPS, evaluations and checkpoints left out),
``first_step_s`` (compiling included), ``tokens_per_s`` (the whole run), ``peak_gib``, the final
evaluation's accuracy where there is one, and the speed plan from the run's first line.
``minift train`` counts the tokens of a batch's attention mask (padding left out), so a
classification run's tokens/s is of real tokens. One Markdown table of those, then, for the
RUN_DIRs, the table below.

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


def summary(log: Path) -> tuple[dict | None, str]:
    """(the last JSON summary line of a `minift train` log or None, the speed plan it printed or "")."""
    found, plan = None, ""
    for line in log.read_text(errors="replace").splitlines():
        if "; speed: " in line and line.startswith("minift train:"):
            plan = line.split("; speed: ", 1)[1].strip()
        if line.startswith("{") and "steady_tokens_per_s" in line:
            try:
                found = json.loads(line)
            except json.JSONDecodeError:
                pass
    return found, plan


def summaries(logs: list[Path]) -> None:
    print("| run | steps | steady step ms | steady tokens/s | first step s | tokens/s (whole run) | peak GiB | accuracy "
          "| speed plan |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for log in logs:
        s, plan = summary(log)
        if s is None:
            print(f"| {log.stem} | no summary line (failed or cut short: see the log) | | | | | | | {plan} |")
            continue
        acc = (s.get("eval") or {}).get("accuracy")
        print(f"| {log.stem} | {s.get('steps')} | {s.get('steady_step_ms') or '-'} | {s.get('steady_tokens_per_s', 0):,.0f} "
              f"| {s.get('first_step_s')} "
              f"| {s.get('tokens_per_s', 0):,.0f} | {s.get('peak_gib', '-')} | "
              f"{'-' if acc is None else f'{acc:.4f}'} | {plan} |")
    print()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--tokens-per-step", type=int, default=8 * 1024, help="batch x block size (default 8 x 1024)")
    p.add_argument("--skip", type=int, default=10)
    args = p.parse_args()
    logs = [r for r in args.runs if r.is_file()]
    if logs:
        summaries(logs)
    args.runs = [r for r in args.runs if not r.is_file()]
    if not args.runs:
        return
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
