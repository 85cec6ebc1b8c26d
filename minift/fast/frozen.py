"""A frozen base stored in the autocast dtype: the frozen weights that only a matmul reads are kept
in bf16 instead of fp32, where every step would cast them to bf16 anyway.

Under autocast a linear layer's fp32 weight is cast to bf16 each time the layer runs, and a
frozen weight is cast anew every step (autocast's cache keeps casts of trainable leaves only).
For a LoRA run of GPT-2 medium that is a pass over 1.2 GB of fp32 weights and a bf16 copy of
each, every step, to produce the same bf16 values each time. Storing them in bf16 once gives the
matmuls exactly the tensors autocast would have made, holds half the memory and skips the casts:

    reference (fp32 frozen W)                  frozen base in bf16
    step: W (fp32) --cast--> W' (bf16) --> mm   once: W (fp32) --cast--> W (bf16)
                                                step: W (bf16) ----------------> mm

Which weights: the frozen ``weight`` and ``bias`` of every ``nn.Linear``, LoRA layer and AdaLoRA
layer, none of which reads them other than through a matmul (``F.linear``, an addmm, or the merged
forward's W0 + sBA). Left in fp32: anything trainable; embeddings, and a head tied to one (an
embedding's output is the residual stream, which stays fp32); LayerNorm weights (autocast runs
LayerNorm in fp32); and every weight of a model with DoRA layers (their magnitudes and norms read
W0 outside a matmul). A model with none of these layers is left as it is.

Numerics, under autocast: a linear layer computes exactly what it computed before (the same bf16
weight). LoRA's merged forward rebuilds W0 + s·BA: through ``fast.kernels``' Triton kernel (CUDA,
ranks up to ``kernels.MAX_RANK``) it now adds s·BA to W0 already rounded to bf16 and rounds the sum
again, where the reference rounded W0 + s·BA once (within one bf16 rounding per element); through
addmm (elsewhere) the reference rounds W0 to bf16 first as well, so nothing changes. Outside
autocast the layers would multiply fp32 inputs by bf16 weights, which PyTorch refuses: the model
then runs under autocast (``training.evaluate`` evaluates a model with bf16 weights so).

Irreversible: the fp32 values are gone (nothing keeps them: that would hold the memory saved).
``disable`` casts the weights back to fp32 so the reference path runs, their values rounded. For
the same reason merging LoRA into a cast W0 (``merge``, then ``unmerge``) does not give W0 back.
Only runs that never save the base nor train a frozen weight later take it
(``training.speed.takes_bf16_frozen_linears``: on CUDA, under bf16 autocast, every method but full
fine-tuning, without gradual unfreezing).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from minift.methods.adalora import SVDLinear
from minift.methods.lora import LoRALinear

# the modules whose weight and bias only a matmul reads
MATMUL_ONLY = (nn.Linear, LoRALinear, SVDLinear)


def applies(model: nn.Module) -> str | None:
    """None when ``enable`` may cast ``model``'s frozen weights, else why not."""
    if any(m.dora for m in model.modules() if isinstance(m, LoRALinear)):
        return "DoRA layers read W0 outside a matmul"
    return None


def frozen_matmul_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """{name: parameter} of the frozen weights and biases that ``enable`` casts (see the module's
    docstring), each once (a parameter shared by two modules appears under its first name)."""
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    found: dict[int, tuple[str, nn.Parameter]] = {}
    for name, m in model.named_modules():
        if not isinstance(m, MATMUL_ONLY):
            continue
        for attr in ("weight", "bias"):
            p = getattr(m, attr, None)
            if isinstance(p, nn.Parameter) and not p.requires_grad and id(p) not in tied \
                    and p.is_floating_point():
                found.setdefault(id(p), (f"{name}.{attr}" if name else attr, p))
    return dict(found.values())


def enable(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> list[str]:
    """Store the frozen matmul-only weights of ``model`` in ``dtype`` (in place, on their device).

    Returns:
        The names of the parameters cast (``[]`` when none is left to cast, or when ``applies``
        says no).
    """
    if applies(model) is not None:
        return []
    names = []
    for name, p in frozen_matmul_weights(model).items():
        if p.dtype != dtype:
            p.data = p.data.to(dtype)
            names.append(name)
    return names


def disable(model: nn.Module) -> list[str]:
    """Cast the frozen matmul-only weights held in a 16-bit dtype back to fp32 (their values stay
    rounded); returns their names."""
    names = []
    for name, p in frozen_matmul_weights(model).items():
        if p.dtype in (torch.bfloat16, torch.float16):
            p.data = p.data.float()
            names.append(name)
    return names
