"""Trace `minift train`'s steps: what the host does between steps and where it waits.

    python benchmarks/trace_train.py --out DIR [--from-step 100] [--steps 10] -- TRAIN ARGS...

Runs `minift train TRAIN ARGS` in this process with torch.profiler recording optimizer steps
``from-step`` to ``from-step + steps - 1`` (host activity, and CUDA's where there is a GPU), and
every collection of Python's garbage collector over the whole run. Writes:

    DIR/trace.md       the top host operations by self CPU time over the profiled steps (a call that waits for
                       the GPU, cudaStreamSynchronize or a blocking copy, shows up here), the top
                       CUDA kernels, and the garbage collections by generation: how many, their
                       milliseconds, those that fell while steps ``from-step`` to the last ran, and
                       those after the last step (the final evaluation and checkpoint)
    DIR/gc.json        each collection: generation, milliseconds, the optimizer steps done
    DIR/trace.json.gz  the profiled steps as a Chrome trace (chrome://tracing, Perfetto)

The steps are the loop's own (``training/loop.py``): the profiler's schedule advances after each
``_Run.update``, which this script wraps; nothing else in the loop changes.
"""
from __future__ import annotations

import argparse
import gc
import gzip
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minift.cli import main as minift_main  # noqa: E402
from minift.training import loop  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--from-step", type=int, default=100, help="the first profiled optimizer step (1-based)")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps profiled")
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("train", nargs=argparse.REMAINDER, help="-- then minift train's arguments")
    a = p.parse_args()
    args = a.train[1:] if a.train[:1] == ["--"] else a.train
    if a.from_step < 2 or a.steps < 1:
        sys.exit("trace_train.py: need --from-step >= 2 and --steps >= 1")
    if "--resume" in args:  # the profiler counts steps from this call's first, the loop from the checkpoint
        sys.exit("trace_train.py: trace a fresh run (no --resume)")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    done = [0]  # optimizer steps finished, as the loop counts them
    collections, started = [], [0.0]

    def on_gc(phase, info):
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            collections.append({"generation": info["generation"], "ms": (time.perf_counter() - started[0]) * 1e3,
                                "steps_done": done[0]})

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    prof = profile(activities=activities, schedule=schedule(wait=a.from_step - 2, warmup=1, active=a.steps, repeat=1))
    update = loop._Run.update

    def traced_update(self):  # the loop's update, then one tick of the profiler's schedule
        update(self)
        done[0] = self.step + 1
        prof.step()

    loop._Run.update = traced_update
    gc.callbacks.append(on_gc)
    prof.start()
    try:
        rc = minift_main(["train", *args])
    finally:
        prof.stop()
        gc.callbacks.remove(on_gc)
        loop._Run.update = update
    if done[0] < a.from_step + a.steps - 1:
        sys.exit(f"trace_train.py: the run did {done[0]} steps, fewer than the {a.from_step + a.steps - 1} "
                 f"to profile (minift train exited {rc})")
    ka = prof.key_averages()
    lines = [f"# minift train {' '.join(args)}", "",
             f"torch {torch.__version__}, {torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}; "
             f"optimizer steps {a.from_step}-{a.from_step + a.steps - 1} profiled", "",
             f"## top host operations by self CPU time ({a.steps} steps; divide by {a.steps} for one)", "", "```",
             ka.table(sort_by="self_cpu_time_total", row_limit=a.rows, max_name_column_width=70), "```", ""]
    if torch.cuda.is_available():
        lines += [f"## top CUDA kernels and ops by GPU time ({a.steps} steps)", "", "```",
                  ka.table(sort_by="cuda_time_total", row_limit=a.rows, max_name_column_width=70), "```", ""]
    lines += gc_table(collections, a.from_step, done[0])
    (out / "trace.md").write_text("\n".join(lines) + "\n")
    (out / "gc.json").write_text(json.dumps(collections, indent=1) + "\n")
    trace = out / "trace.json"
    prof.export_chrome_trace(str(trace))
    with open(trace, "rb") as src, gzip.open(str(trace) + ".gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    trace.unlink()
    print(f"wrote {out / 'trace.md'}, {out / 'gc.json'}, {trace}.gz (minift train exited {rc})")


def gc_table(collections: list[dict], from_step: int, last: int) -> list[str]:
    """Markdown lines: the collections by generation, in all, while steps ``from_step``..``last``
    ran (``steps_done`` from ``from_step - 1`` to ``last - 1``: inside the loop's steps), and once
    the last step was done (the final evaluation and checkpoint)."""
    lines = ["## Python's garbage collections", "",
             f"| generation | collections | ms in all | longest ms | during steps {from_step}-{last} | ms there "
             f"| after step {last} | ms there |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for g in (0, 1, 2):
        cs = [c for c in collections if c["generation"] == g]
        during = [c for c in cs if from_step - 1 <= c["steps_done"] < last]
        after = [c for c in cs if c["steps_done"] >= last]
        lines.append(f"| {g} | {len(cs)} | {sum(c['ms'] for c in cs):.1f} | "
                     f"{max((c['ms'] for c in cs), default=0):.1f} | {len(during)} | "
                     f"{sum(c['ms'] for c in during):.1f} | {len(after)} | {sum(c['ms'] for c in after):.1f} |")
    return lines


if __name__ == "__main__":
    main()
