"""`minift train`'s steady step against `minift bench`'s, from runs made in alternation on one machine.

    python3 benchmarks/train_vs_bench.py DIR > table.md

DIR holds, for each method M (full, lora) and round R (1, 2, ...), what `benchmarks/gpu.sh
issue21-pairs` writes: ``train-M-rR.log`` (what `minift train` printed; its last line is the
summary with ``steady_step_ms``) and ``bench-M-rR.json`` (`minift bench --out DIR --name
bench-M-rR` at the run's shape, dropout and clipping). A small model's step is bound by the host,
and one process's step can differ from the next's by more than the loop's own cost, so one pair
says little: the rounds alternate bench and train, and the table gives each round's ratio and
their median, lowest and highest.

Train's step is the mean after its warm-up steps (``speed.WARMUP_STEPS``), evaluations and
checkpoints left out; bench's is the mean of its timed steps (``extra.step_ms_each``).
"""
from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import summary  # noqa: E402  (the summary line of a `minift train` log)


def pairs(folder: Path) -> dict[str, list[tuple[int, float | None, float | None]]]:
    """{method: [(round, train steady step ms or None, bench mean step ms or None), ...]}"""
    found: dict[str, dict[int, list]] = {}
    for f in folder.iterdir():
        m = re.fullmatch(r"(train|bench)-(\w+)-r(\d+)\.(log|json)", f.name)
        if m is None or (m[1] == "train") != (m[4] == "log"):
            continue
        slot = found.setdefault(m[2], {}).setdefault(int(m[3]), [None, None])
        if m[1] == "train":
            s, _ = summary(f)
            slot[0] = s.get("steady_step_ms") if s else None
        else:
            rows = json.loads(f.read_text()).get("rows") or [{}]  # (no rows: bench was cut before its method ended)
            each = rows[0].get("extra", {}).get("step_ms_each") or []
            slot[1] = statistics.fmean(each) if each else None
    return {method: [(r, *v) for r, v in sorted(rounds.items())] for method, rounds in sorted(found.items())}


def table(found: dict) -> str:
    lines = ["| method | round | train steady step ms | bench mean step ms | train / bench |",
             "| --- | --- | --- | --- | --- |"]
    summary_lines = ["| method | rounds | train / bench median | lowest | highest |", "| --- | --- | --- | --- | --- |"]
    for method, rows in found.items():
        ratios = []
        for r, t, b in rows:
            ratio = t / b if t and b else None
            if ratio is not None:
                ratios.append(ratio)
            lines.append(f"| {method} | {r} | {f'{t:.2f}' if t is not None else 'missing'} | "
                         f"{f'{b:.2f}' if b is not None else 'missing'} | {f'{ratio:.3f}x' if ratio else '-'} |")
        if ratios:
            summary_lines.append(f"| {method} | {len(ratios)} | {statistics.median(ratios):.3f}x | "
                                 f"{min(ratios):.3f}x | {max(ratios):.3f}x |")
    return "\n".join(lines) + "\n\n" + "\n".join(summary_lines) + "\n"


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not Path(args[0]).is_dir():
        print("usage: train_vs_bench.py DIR (a folder of train-M-rR.log and bench-M-rR.json)", file=sys.stderr)
        return 2
    found = pairs(Path(args[0]))
    if not found:
        print(f"train_vs_bench.py: no train-M-rR.log or bench-M-rR.json in {args[0]}", file=sys.stderr)
        return 2
    sys.stdout.write(table(found))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
