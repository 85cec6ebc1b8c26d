"""A frozen base stored in the autocast dtype: every frozen parameter is kept in bf16 instead of
fp32, as PEFT users load a base model in bf16. ``minift train`` (on CUDA) and ``minift bench`` both
store the base this way.

Under autocast a linear layer's fp32 weight is cast to bf16 each time the layer runs, and a
frozen weight is cast anew every step (autocast's cache keeps casts of trainable leaves only).
For a LoRA run of GPT-2 medium that is a pass over 1.2 GB of fp32 weights and a bf16 copy of
each, every step, to produce the same bf16 values each time. Storing them in bf16 once skips the
casts and holds half the memory:

    reference (fp32 frozen W)                  frozen base in bf16
    step: W (fp32) --cast--> W' (bf16) --> mm   once: W (fp32) --cast--> W (bf16)
                                                step: W (bf16) ----------------> mm

Which parameters: every frozen floating-point one, each once (a head tied to an embedding is one
parameter), except those of a module other than a linear layer that trains one of its own
parameters (BitFit's LayerNorms: a weight and a bias of two dtypes, which CPU autocast's
LayerNorm refuses). Trainable ones stay fp32: the optimizer updates them (master weights).

Numerics, under CUDA autocast, against the fp32 base:
- linear, LoRA and AdaLoRA layers multiply exactly the bf16 weight autocast would have made;
  LoRA's merged forward adds s·BA to W0 already rounded (through ``fast.kernels``' Triton
  kernel on CUDA the sum is rounded once more; addmm, elsewhere, rounds W0 first in the
  reference too);
- LayerNorm weights are rounded to bf16 and the norm computes in fp32; Llama's RMSNorm
  normalizes in fp32 and multiplies by its rounded weight in the input's dtype;
- embeddings are rounded to bf16, so their output, the residual stream, is bf16. In a pre-norm
  model (GPT-2, Llama) it stays bf16 through every block, as in a PEFT model loaded in bf16
  (Llama's rotary cos and sin follow it to bf16); in BERT each block's LayerNorm (fp32 under CUDA
  autocast) returns it to fp32. The bf16 residual stream is most of what this saves over casting
  the linear weights alone (docs/speed.md has the measurement);
- DoRA's row norms of W0 + sBA are taken from the rounded W0, while its magnitudes m were taken
  from the fp32 one: at init f = m / ||W0 + sBA|| is within about 1e-3 of 1, not exactly 1.
CPU autocast runs LayerNorm in its input's dtype, so there a BERT's residual stream stays bf16.
Outside autocast the layers would multiply fp32 inputs by bf16 weights, which PyTorch refuses: the
model then runs under autocast (``training.evaluate`` evaluates a model with bf16 weights so).

Irreversible: the fp32 values are gone (nothing keeps them: that would hold the memory saved).
``disable`` casts the weights back to fp32 so the reference path runs, their values rounded. For
the same reason merging LoRA into a cast W0 (``merge``, then ``unmerge``) does not give W0 back.
Only runs that never save the base nor train a frozen weight later take it
(``training.speed.takes_bf16_frozen_base``: on CUDA, under bf16 autocast, every method but full
fine-tuning, without gradual unfreezing).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from minift.methods.adalora import SVDLinear
from minift.methods.lora import LoRALinear


# modules whose frozen weight may sit beside a trainable fp32 one (a LoRA/DoRA layer's W0, BitFit's
# trained bias): autocast casts every argument of their matmul to bf16
MATMUL = (nn.Linear, LoRALinear, SVDLinear)


def frozen_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """{name: parameter} of the frozen floating-point parameters of ``model``, each once (a
    parameter shared by two modules appears under its first name). Left out: the frozen
    parameters of a module other than a linear layer that trains one of its own (a LayerNorm
    whose bias BitFit trains), which would be given a weight and a bias of two dtypes."""
    mixed = {id(p) for m in model.modules() if not isinstance(m, MATMUL)
             and any(q.requires_grad for q in m.parameters(recurse=False)) for p in m.parameters(recurse=False)}
    return {n: p for n, p in model.named_parameters()
            if not p.requires_grad and p.is_floating_point() and id(p) not in mixed}


def enable(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> list[str]:
    """Store the frozen parameters of ``model`` in ``dtype`` (in place, on their device).

    Returns:
        The names of the parameters cast (``[]`` when none is left to cast).
    """
    names = []
    for name, p in frozen_parameters(model).items():
        if p.dtype != dtype:
            p.data = p.data.to(dtype)
            names.append(name)
    return names


def disable(model: nn.Module) -> list[str]:
    """Cast the frozen parameters held in a 16-bit dtype back to fp32 (their values stay rounded);
    returns their names."""
    names = []
    for name, p in frozen_parameters(model).items():
        if p.dtype in (torch.bfloat16, torch.float16):
            p.data = p.data.float()
            names.append(name)
    return names
