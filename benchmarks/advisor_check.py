"""Check minift.studies.advisor.estimate_memory against the measured peak of real training steps.

For GPT-2 small and medium shapes (random init), B=8, T=1024, every method: the model is
built on the GPU and the method applied exactly as ``minift.studies.bench`` does (frozen weights
stored in bf16, bf16 autocast, chunked cross-entropy, fused AdamW, zero_grad(set_to_none));
two warm-up steps create the optimizer state, then ``torch.cuda.reset_peak_memory_stats()``
and one more step: ``torch.cuda.max_memory_allocated()`` is the peak of a whole
steady-state step (weights, optimizer state, activations, gradients, the optimizer update),
which is what ``estimate_memory(...).peak`` predicts. Writes ``advisor_check.md`` and
``.json`` (device name, torch version, estimate vs measurement and the error per row; the
target is |error| <= 15%).

    python benchmarks/advisor_check.py                      # on a CUDA machine, ~1-2 minutes
    python benchmarks/advisor_check.py --device cpu --tiny  # smoke test of the script itself

On CPU nothing is measured (there is no max_memory_allocated): the smoke mode only proves
the script runs end to end; the estimate is checked on CPU by tests/test_advisor.py.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minift.studies import advisor  # noqa: E402
from minift.studies import bench  # noqa: E402

TOLERANCE = 0.15


def method_options(method: str, cfg: bench.BenchConfig) -> dict:
    """The estimate's knobs for the method as ``bench.build`` applies it."""
    if method in ("lora", "dora"):
        return dict(r=8, targets=cfg.lora_targets)
    if method == "adalora":
        return dict(init_r=12, targets=cfg.lora_targets, orth_penalty=True)
    if method in ("prefix", "prompt"):
        return dict(num_virtual_tokens=bench.VIRTUAL_TOKENS)
    return {}


def check(model: str, method: str, args) -> dict | None:
    cfg = bench.BenchConfig(model=model, methods=(method,), batch=args.batch, seq_len=args.seq_len, steps=1,
                            warmup=2, device=args.device, frozen_bf16=args.device != "cpu",
                            lora_targets=bench.ALL_PROJ, speed="eager")
    cuda = args.device.startswith("cuda")
    est = advisor.estimate_memory(replace(bench.PRESETS[model]), method, cfg.batch, cfg.seq_len,
                                  "bf16" if cuda else "fp32", frozen_dtype="bf16" if cfg.frozen_bf16 else None,
                                  device="cuda" if cuda else "cpu", **method_options(method, cfg))
    try:
        row = bench.run_minift(cfg, method, None)
    except ImportError as e:  # a method module that has not landed yet
        print(f"  skipped {method}: {e}", file=sys.stderr)
        return None
    measured = row.peak_gib * 2 ** 30 if cuda else float("nan")
    err = est.peak / measured - 1 if cuda else float("nan")
    if row.trainable != est.trainable_params:
        print(f"  note: {method} trainable {row.trainable:,} != estimated {est.trainable_params:,}", file=sys.stderr)
    return dict(model=model, method=method, batch=cfg.batch, seq_len=cfg.seq_len, trainable=row.trainable,
                est_trainable=est.trainable_params, est_peak_gib=est.peak / 2 ** 30,
                measured_peak_gib=measured / 2 ** 30, error=err, within=bool(abs(err) <= TOLERANCE) if cuda else None,
                phase=est.phase, terms_gib={k: getattr(est, k) / 2 ** 30 for k in
                                            ("weights", "gradients", "optimizer_state", "activations", "logits",
                                             "extras")})


def to_markdown(rows: list[dict], meta: dict) -> str:
    out = ["# advisor check: estimated vs measured peak memory", ""]
    out += [f"- {k}: {v}" for k, v in meta.items()] + [""]
    out.append("| model | method | trainable | estimated GiB | measured GiB | error | within 15% | peak at |")
    out.append("|---|---|---|---|---|---|---|---|")
    for r in rows:
        m = "-" if r["measured_peak_gib"] != r["measured_peak_gib"] else f"{r['measured_peak_gib']:.2f}"
        e = "-" if r["error"] != r["error"] else f"{100 * r['error']:+.1f}%"
        w = "-" if r["within"] is None else ("yes" if r["within"] else "**no**")
        out.append(f"| {r['model']} | {r['method']} | {r['trainable']:,} | {r['est_peak_gib']:.3g} | {m} | {e} | {w} | "
                   f"{r['phase']} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (measures) or cpu (smoke test)")
    p.add_argument("--tiny", action="store_true", help="tiny GPT, batch 2 x 64 (with --device cpu)")
    p.add_argument("--models", default=None, help="comma-separated presets (default: gpt2,gpt2-medium)")
    p.add_argument("--methods", default=",".join(advisor.METHODS))
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--out", default="benchmarks/results", help="directory for advisor_check.{md,json}")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("no CUDA device: use --device cpu --tiny for the smoke test")
    models = (args.models or ("tiny-gpt" if args.tiny else "gpt2,gpt2-medium")).split(",")
    args.batch = args.batch or (2 if args.tiny else 8)
    args.seq_len = args.seq_len or (64 if args.tiny else 1024)
    t0 = time.time()
    rows = []
    for model in models:
        for method in args.methods.split(","):
            print(f"{model} {method}", file=sys.stderr)
            r = check(model, method, args)
            if r is not None:
                rows.append(r)
    cuda = args.device.startswith("cuda")
    meta = {"device": torch.cuda.get_device_name() if cuda else "cpu (smoke test: nothing measured)",
            "torch": torch.__version__, "dtype": "bf16 autocast, frozen weights bf16" if cuda else "fp32",
            "batch x seq_len": f"{args.batch} x {args.seq_len}", "date": time.strftime("%Y-%m-%d"),
            "measured": "max_memory_allocated over one steady-state step (after 2 warm-up steps)",
            "seconds": round(time.time() - t0, 1)}
    if cuda:
        bad = [r for r in rows if not r["within"]]
        meta["within 15%"] = f"{len(rows) - len(bad)}/{len(rows)}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "advisor_check" if cuda else "advisor_check_cpu_smoke"
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / f"{stem}.md").write_text(to_markdown(rows, meta))
    print(to_markdown(rows, meta))
    print(f"wrote {out / stem}.md and .json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
