"""Time `minift train` with one piece of the loop's per-step host work taken out at a time.

    python benchmarks/loop_ablation.py --out DIR [--variants baseline,no-clip,...] -- TRAIN ARGS...

Each variant runs `minift train TRAIN ARGS` in a fresh process (one model under CUDA graphs per
process), with one change to the loop (``training/loop.py``), made by this script and nowhere else:

    baseline      the loop as it is
    no-clip       the optimizer step without gradient clipping (as with ``max_grad_norm`` None)
    one-group     AdamW over one parameter group (weight decay on every trainable parameter)
                  instead of the two (decay, no decay) ``make_optimizer`` builds: one fused call
    no-rng        the per-step RNG snapshot (``checkpoint.rng_state``: torch, CUDA, Python, NumPy)
                  taken once and handed back every step after
    no-readback   the losses read back once, at the end (``--log-every`` beyond the run's steps)

These are measurements, not settings: a variant's run trains other numbers (no-clip, one-group) or
would checkpoint a wrong RNG state (no-rng). Writes DIR/ablation.md (each variant's steady step
and its difference from the baseline's, one table per call, so one machine) and DIR/<variant>.json
(the run's summary line). The steady step is ``steady_step_ms``: the mean step after the warm-up
steps, evaluations and checkpoints left out (``TrainResult``).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

VARIANTS = ("baseline", "no-clip", "one-group", "no-rng", "no-readback")


def patch(variant: str, args: list[str]) -> list[str]:
    """Make ``variant``'s change in this process; returns the train arguments to run with."""
    import torch

    from minift.fast import adamw as fast_adamw
    from minift.training import loop
    if variant == "no-clip":
        chosen = fast_adamw.chosen
        fast_adamw.chosen = lambda opt, fast: (lambda max_norm, update=chosen(opt, fast): update(None))
    elif variant == "one-group":
        def one_group(model, cfg, param_groups=None, all_params=False, device=None):
            ps = [p for p in model.parameters() if all_params or p.requires_grad]
            fused = device is not None and device.type == "cuda"
            return torch.optim.AdamW(ps, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)
        loop.make_optimizer = one_group
    elif variant == "no-rng":
        real, first = loop.rng_state, []

        def once():
            if not first:
                first.append(real())
            return first[0]
        loop.rng_state = once
    elif variant == "no-readback":
        args = [*args, "--log-every", "1000000000"]
    elif variant != "baseline":
        raise SystemExit(f"loop_ablation.py: unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    return args


def child(variant: str, args: list[str]) -> int:
    from minift.cli import main as minift_main
    return minift_main(["train", *patch(variant, args)])


def table(results: dict[str, dict]) -> str:
    base = results.get("baseline", {}).get("steady_step_ms")
    lines = ["| variant | steady step ms | vs baseline ms | steady tokens/s | first step s |",
             "| --- | --- | --- | --- | --- |"]
    for v, r in results.items():
        ms = r.get("steady_step_ms")
        diff = f"{ms - base:+.2f}" if ms is not None and base is not None and v != "baseline" else "-"
        lines.append(f"| {v} | {ms if ms is not None else r.get('error', '-')} | {diff} | "
                     f"{r.get('steady_tokens_per_s', '-')} | {r.get('first_step_s', '-')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--child", help=argparse.SUPPRESS)  # one variant's run, in this fresh process
    p.add_argument("train", nargs=argparse.REMAINDER, help="-- then minift train's arguments")
    a = p.parse_args()
    args = a.train[1:] if a.train[:1] == ["--"] else a.train
    if a.child:
        sys.exit(child(a.child, args))
    variants = [v for v in a.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        sys.exit(f"loop_ablation.py: unknown variant {bad[0] if bad else '(none)'!r}; choose from {', '.join(VARIANTS)}")
    if "--out" in args or "--resume" in args:
        sys.exit("loop_ablation.py: give the train arguments without --out or --resume (each variant has its own run)")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for v in variants:
        cmd = [sys.executable, __file__, "--out", str(out), "--child", v, "--",
               *args, "--out", str(out / f"run-{v}"), "--overwrite"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        (out / f"{v}.log").write_text(r.stderr)
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
        results[v] = json.loads(lines[-1]) if r.returncode == 0 and lines else \
            {"error": f"exit {r.returncode}: {(r.stderr.strip().splitlines() or ['?'])[-1][:200]}"}
        (out / f"{v}.json").write_text(json.dumps(results[v], indent=1) + "\n")
        print(f"{v}: {results[v].get('steady_step_ms', results[v].get('error'))}", file=sys.stderr)
    text = f"# minift train {' '.join(args)}\n\n" + table(results)
    (out / "ablation.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
