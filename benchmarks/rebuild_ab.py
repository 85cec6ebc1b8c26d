"""A/B of LoRA's merged-weight rebuild W0 + sBA (``minift.fast.lora.merged_weight``).

Runs ``minift bench`` in this process with the rebuild swapped for one of:
  kernel       minift's own (``minift.fast.kernels``: one Triton pass on CUDA, eager and compiled)
  addmm        ``torch.addmm(W0, B, A)``: cuBLAS copies W0 into the output, then a rank-r GEMM adds
  elementwise  while torch.compile traces (the forward), W0 + s * sum_k B[:, k] A[k, :] written
               out for inductor to fuse; elsewhere the kernel, as with ``kernel`` (the backward's
               rebuild runs eagerly, inside minift::lora_input_grad)
Usage: rebuild_ab.py VARIANT [minift bench arguments; add --no-isolate: a spawned worker would not
see the swap]
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minift.cli import main  # noqa: E402
from minift.fast import lora  # noqa: E402


kernel = lora.merged_weight


def addmm(weight, A, B, scaling):
    return torch.addmm(weight.to(A.dtype), B, A, alpha=scaling)


def elementwise(weight, A, B, scaling):
    if not torch.compiler.is_compiling():  # eagerly this form materializes an (out, r, in) fp32 tensor
        return kernel(weight, A, B, scaling)
    update = (B.float()[:, :, None] * A.float()[None, :, :]).sum(1)  # (out, in); r terms per element
    return (weight.float() + scaling * update).to(A.dtype)


VARIANTS = {"kernel": kernel, "addmm": addmm, "elementwise": elementwise}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in VARIANTS:
        sys.exit(f"usage: rebuild_ab.py {{{','.join(VARIANTS)}}} [minift bench arguments]")
    if "--no-isolate" not in sys.argv:
        sys.exit("rebuild_ab.py needs --no-isolate: a spawned worker process would run the unswapped rebuild")
    lora.merged_weight = VARIANTS[sys.argv[1]]
    raise SystemExit(main(["bench", *sys.argv[2:]]))
