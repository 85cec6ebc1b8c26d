"""Peak host memory of one training step of 8 LoRA jobs together, on the CPU (issue 22's budget).

    python3 benchmarks/many_step_memory.py [--out FILE.json]

One forward and backward of 8 jobs x 2 rows x 256 tokens on a 2-layer, 1024-wide GPT (LoRA r=8,
alpha 16, all six projections, fp32, minift.fast on), each variant in a fresh process, measured as
the rise of the process's peak resident set (``ru_maxrss``) over the step:

- ``together``: ``train_many``'s step (mixed batch, block path as ``fast.multi_lora.BlockLoRA``);
- ``together, plain ops``: the same with the block path written as plain ops,
  ``h + bmm(bmm(x, A^T), B^T)`` (autograd then holds the sum and adds two input gradients);
- ``one job of the 16 rows``: one LoRA adapter on all rows, ``train``'s step.

Resident memory is a host-side proxy for the GPU's allocator peak (large tensors are mapped and
unmapped as they come and go); the GPU row is ``benchmarks/many_adapters.py --parts train``.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

VARIANTS = ("together", "together, plain ops", "one job of the 16 rows")
T, K, TARGETS = 256, 8, ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")


def plain_block(x, weight, bias, A, B):
    """The block path as plain ops (what BlockLoRA replaced)."""
    import torch
    import torch.nn.functional as F
    h = F.linear(x, weight, bias)
    xk = x.reshape(A.shape[0], -1, x.shape[-1])
    return h + torch.bmm(torch.bmm(xk, A.transpose(1, 2)), B.transpose(1, 2)).view(h.shape)


def measure(variant: str) -> float:
    """MiB the peak resident set rises by over one step of ``variant`` (run in a fresh process)."""
    import torch
    from minift import fast
    from minift.fast import multi_lora as fast_multi
    from minift.methods import lora
    from minift.methods.lora import LoRAConfig
    from minift.methods.multi_lora import mixed_batch
    from minift.models.gpt import GPT, GPTConfig
    from minift.training.config import TrainConfig
    from minift.training.forward import model_forward
    from minift.training.many import Job, _concat, _job_losses, add_jobs
    torch.set_num_threads(2)
    cfg = LoRAConfig(r=8, alpha=16, targets=TARGETS)
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=2, n_head=16, n_embd=1024, vocab_size=1000, block_size=T, dropout=0.0))
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": (t := torch.randint(0, 1000, (2, T), generator=g)), "labels": t.clone(),
             "attention_mask": torch.ones(2, T, dtype=torch.long)} for _ in range(K)]
    batch, rows = _concat(data), [f"j{i}" for i in range(K) for _ in range(2)]
    if variant == "one job of the 16 rows":
        lora.apply(m, cfg)
        fast.enable(m)

        def step():
            model_forward(m, batch).loss.backward()
    else:
        if variant == "together, plain ops":
            fast_multi.BlockLoRA.apply = staticmethod(plain_block)
        add_jobs(m, [Job(f"j{i}", cfg, [data[i]], TrainConfig(lr=1e-4, steps=1, batch_size=2, seed=i))
                     for i in range(K)])
        fast.enable(m)

        def step():
            with mixed_batch(m, rows):
                total = _job_losses(m, batch, [2] * K)[0]
            total.backward()
    m.train()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="JSON file for the results")
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one measurement, in this process
    a = p.parse_args()
    if a.variant:
        print(measure(a.variant))
        return 0
    rows = {v: float(subprocess.run([sys.executable, __file__, "--variant", v], check=True, capture_output=True,
                                    text=True).stdout.split()[-1]) for v in VARIANTS}
    out = {"peak_rss_rise_mib": rows, "shape": f"{K} jobs x 2 rows x {T} tokens, GPT 2 x 1024, LoRA r=8 on "
           f"{', '.join(TARGETS)}, fp32, CPU"}
    text = json.dumps(out, indent=1)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
