"""Full fine-tuning: every parameter is trained — the baseline every other method is measured against.

    θ ← θ - η · ∇_θ L(θ)        for all θ (embeddings, every block, final norm / pooler, head)

    input ─► [embeddings]* ─► [block 0]* ─► ... ─► [block L-1]* ─► [head]* ─► loss
             (* = trainable; the optimizer holds a moment estimate for each of them)

Costs the most: gradients and optimizer state for all N parameters, and every layer's
activations kept for backward. Parameter-efficient methods report their memory and speed
as a ratio to this.
"""
from __future__ import annotations

import torch.nn as nn


def apply(model: nn.Module) -> list[str]:
    """Make every parameter of ``model`` trainable; return their names.

    Also resets the model's ``grad_from_layer`` (the no-autograd shortcut for a frozen
    bottom, see ``freeze.py``) to 0, since nothing is frozen any more.
    """
    names = []
    for name, p in model.named_parameters():
        p.requires_grad_(True)
        names.append(name)
    for m in model.modules():  # GPT / Llama / Bert (also the Bert inside a BertClassifier)
        if hasattr(m, "grad_from_layer"):
            m.grad_from_layer = 0
    return names
