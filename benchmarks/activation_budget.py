"""`minift bench` with the compiled step's activation memory budget set (an experiment, issue 21).

    python3 benchmarks/activation_budget.py BUDGET [minift bench arguments; --no-isolate is added]

torch.compile's partitioner (AOTAutograd) decides which forward tensors the backward keeps and
which it recomputes; ``torch._functorch.config.activation_memory_budget`` (default 1.0: its own
heuristics) below 1 asks it to keep at most that fraction of what it would otherwise save, and to
recompute the rest, cheapest first (pointwise ops such as GELU and LayerNorm's normalization before
any matmul). On a CPU trace of a small GPT-2-shaped model with LoRA on every projection (merged
forward, bf16 autocast; 2 layers, width 128, 2 x 64 tokens) 0.8 kept 71% of the saved activation
bytes (LayerNorm's fp32 normalized inputs and one of the MLP's two wide tensors, the GELU's input
or output, were recomputed instead) and 0.6 kept 46%. On a GPU the question is what it costs in step time: this runs bench's compiled step
(the default plan) under BUDGET in this one process, so that a row per budget compares peak memory
and step time. The row's name should say the budget (``--name bench-...-budget0.8``).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch._functorch.config as functorch_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minift.cli import main  # noqa: E402

if __name__ == "__main__":
    try:
        budget = float(sys.argv[1])
    except (IndexError, ValueError):
        budget = -1.0
    if not 0.0 < budget <= 1.0:
        print(f"activation_budget.py: BUDGET (the first argument) must be a number in (0, 1], got "
              f"{sys.argv[1] if len(sys.argv) > 1 else 'none'!r}", file=sys.stderr)
        sys.exit(2)
    functorch_config.activation_memory_budget = budget  # read when the step compiles, in this process
    sys.exit(main(["bench", *sys.argv[2:], "--no-isolate"]))
