"""Cast-once: under autocast, the input of each attention and MLP is cast to the autocast
dtype once, before the module runs, instead of once per matmul that reads it.

Autocast casts a matmul's fp32 activation input anew for every matmul: in the reference
blocks the same LayerNorm output (BERT: the residual stream) is cast by q_proj, k_proj and
v_proj, and by each LoRA's A or AdaLoRA factor reading it, and every cast copy is kept for
backward. Casting once makes one bf16 copy that all of them read:

    reference (autocast per use)             cast-once
    x (fp32) --cast--> q_proj                x (fp32) --cast--> x' (bf16) --> q_proj
             --cast--> k_proj                                             --> k_proj
             --cast--> v_proj                                             --> v_proj
             --cast--> lora_A (each)                                      --> lora_A ...

The mechanism is PyTorch's documented forward pre-hook (``nn.Module.register_forward_pre_hook``)
on every ``layers.SelfAttention``, Llama ``Attention`` and GPT / BERT / Llama ``MLP`` (Llama's
SwiGLU reads its input twice, by gate_proj and up_proj): the hook returns the module's first
input cast to the autocast dtype, and the module's own ``forward`` runs unchanged on it.
Nothing is replaced or patched: the module tree, the state-dict keys and the reference
``forward`` code stay exactly as they are, and the hook does nothing outside autocast. In BERT
the attention and MLP read the residual stream itself; the cast copy lives only inside the
module, so the residual keeps its own dtype. ``disable`` removes the hooks by their handles.

Numerics: the forward pass is identical (the one copy holds the same values as each per-use
cast). In backward, the gradients that q, k and v (and the adapters) send to their shared
input are summed in the autocast dtype and converted to fp32 once, where the reference
converts each to fp32 and sums in fp32: equal up to bf16 rounding (the equivalence test
compares with a tolerance under autocast, exactly in fp32).
"""
from __future__ import annotations

import weakref

import torch
import torch.nn as nn

from minift.models import bert, gpt, llama
from minift.models.layers import SelfAttention

# the modules whose first input is cast once
CAST_INPUT = (SelfAttention, gpt.MLP, bert.MLP, llama.Attention, llama.MLP)

_handles: weakref.WeakKeyDictionary[nn.Module, torch.utils.hooks.RemovableHandle] = weakref.WeakKeyDictionary()


def cast_input(module: nn.Module, args: tuple):
    """The forward pre-hook: ``args`` with its first tensor in the autocast dtype when autocast
    is on for that tensor's device (else ``None``: the arguments unchanged)."""
    x = args[0]
    device = x.device.type
    if device in ("cpu", "cuda") and torch.is_autocast_enabled(device) and x.is_floating_point():
        return (x.to(torch.get_autocast_dtype(device)),) + args[1:]
    return None


def enable(model: nn.Module) -> list[str]:
    """Cast the input of every attention and MLP in ``model`` once per forward under autocast.

    Args:
        model: a GPT, Llama, Bert or BertClassifier (any module holding them).
    Returns:
        The names of the modules that got the hook (``[]`` when it is already on everywhere).
    """
    names = []
    for name, m in model.named_modules():
        if isinstance(m, CAST_INPUT) and m not in _handles:
            _handles[m] = m.register_forward_pre_hook(cast_input)
            names.append(name)
    return names


def disable(model: nn.Module) -> list[str]:
    """Remove the hooks ``enable`` added to ``model``; returns the names of those modules."""
    names = []
    for name, m in model.named_modules():
        handle = _handles.pop(m, None)
        if handle is not None:
            handle.remove()
            names.append(name)
    return names
