"""The per-step host cost of a run profiled with cProfile: the functions called at least
``--min-calls`` times (once a step or more: compiling, which happens once, falls out), by time
spent in the function itself, with microseconds per call.

    python -m cProfile -o train.prof -m minift train ... --steps 300
    python benchmarks/profile_calls.py train.prof --min-calls 290 [--max-calls 1300] [--top 40]

``--max-calls`` (a few calls a step) leaves out what torch.compile calls thousands of times while
compiling.

Per-call times are cProfile's, which adds a few microseconds to each Python call: compare two
runs profiled the same way (``minift train`` against ``minift bench`` at one shape), not with
unprofiled step times.
"""
from __future__ import annotations

import argparse
import pstats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("prof", nargs="+")
    p.add_argument("--min-calls", type=int, default=290)
    p.add_argument("--max-calls", type=int, default=None)
    p.add_argument("--top", type=int, default=40)
    a = p.parse_args()
    for path in a.prof:
        stats = pstats.Stats(path).stats  # {(file, line, name): (primitive calls, calls, tottime, cumtime, callers)}
        rows = [(tt, ct, nc, f"{fn.split('site-packages/')[-1]}:{line}({name})")
                for (fn, line, name), (_, nc, tt, ct, _) in stats.items() if nc >= a.min_calls and (a.max_calls is None or nc <= a.max_calls)]
        rows.sort(reverse=True)
        span = f">= {a.min_calls}" + (f" and <= {a.max_calls}" if a.max_calls else "")
        print(f"## {path}: {len(rows)} functions called {span} times, "
              f"{sum(r[0] for r in rows):.3f} s in them (own time)\n")
        print("| own s | own us/call | cum us/call | calls | function |\n|---|---|---|---|---|")
        for tt, ct, nc, name in rows[:a.top]:
            print(f"| {tt:.3f} | {tt / nc * 1e6:.1f} | {ct / nc * 1e6:.1f} | {nc} | `{name}` |")
        print()


if __name__ == "__main__":
    main()
