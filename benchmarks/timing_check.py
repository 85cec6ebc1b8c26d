"""The bench's two CUDA timings of one step, alternating in one process (one compile, one card).

Wraps ``minift.studies.bench_timing.time_steps`` so that each timed run is followed by four more windows
of the same step: timed with the host synchronizing after every step, then queued, twice. Prints
each window's median and step times, and writes them with the run's metadata (``bench.meta``) to
OUT/timing-check-NAME.json; ``run`` numbers the timed runs (one per method) in order.
Usage: timing_check.py NAME minift|peft OUT [minift bench (add --no-isolate) | peft_baseline.py arguments]
"""
from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minift.studies import bench  # noqa: E402
from minift.studies import bench_timing  # noqa: E402


def main() -> None:
    if len(sys.argv) < 4 or sys.argv[2] not in ("minift", "peft"):
        sys.exit(__doc__.strip().splitlines()[-1])
    name, impl, out = sys.argv[1:4]
    rest = sys.argv[4:]
    if impl == "minift" and "--no-isolate" not in rest:
        sys.exit("timing_check.py minift needs --no-isolate: a spawned worker would run the unwrapped timer")
    timed = bench_timing.time_steps
    windows, meta = [], {}

    def both(step, cfg):
        run = len({w["run"] for w in windows})
        meta.update(bench.meta(cfg))
        result = timed(step, cfg)
        mine = [{"run": run, "sync_each_step": cfg.sync_each_step, "median_ms": result[0], "step_ms": result[2]}]
        for sync in (True, False, True, False):
            ms, _, each = timed(step, replace(cfg, sync_each_step=sync, warmup=0))
            mine.append({"run": run, "sync_each_step": sync, "median_ms": ms, "step_ms": each})
        for w in mine:
            print(f"run {run} sync_each_step={w['sync_each_step']!s:5} median {w['median_ms']:.2f} ms: "
                  + " ".join(f"{t:.1f}" for t in w["step_ms"]), flush=True)
        windows.extend(mine)
        return result

    bench_timing.time_steps = both
    if impl == "minift":
        from minift.cli import main as cli
        rc = cli(["bench", *rest])
    else:
        import peft_baseline
        sys.argv = ["peft_baseline.py", *rest]
        peft_baseline.main()
        rc = 0
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"timing-check-{name}.json").write_text(json.dumps({"meta": meta, "windows": windows}, indent=1))
    raise SystemExit(rc)


if __name__ == "__main__":
    main()
