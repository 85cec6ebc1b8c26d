"""Gradient clipping by the global norm in a fixed handful of kernels, however many parameters,
for a training step whose host is the bound (a small model under CUDA graphs, where each step's
Python work is its time).

The reference is ``torch.nn.utils.clip_grad_norm_``, which the training loop calls otherwise. It
computes the same thing for any mix of devices, dtypes and tensor subclasses, and pays for that
generality on every step: it groups the gradients by device and dtype and moves each tensor's
norm to one device in a Python loop, one call per parameter. When every gradient is a plain
tensor of one device and dtype (the parameters decide that, so ``applies`` is asked once per run),
none of that is needed:

    norms = _foreach_norm(grads)                       # one norm per tensor, in few kernels
    total = vector_norm(stack(norms))                  # the global L2 norm
    _foreach_mul_(grads, clamp(max_norm / (total + 1e-6), max=1))   # scale down, never up

which is what the reference does for such gradients, so the two agree to the last bit
(tests/fast/test_clip.py). The total norm stays on the device: reading it would wait for the GPU.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


def applies(params: Sequence[torch.Tensor]) -> bool:
    """Whether ``clip_grad_norm_`` may clip these parameters' gradients: plain tensors (no DTensor
    or other subclass), all on one device and of one floating dtype."""
    params = list(params)
    return bool(params) and all(type(p) in (torch.Tensor, torch.nn.Parameter) for p in params) \
        and len({(p.device, p.dtype) for p in params}) == 1 and params[0].is_floating_point()


def chosen(params: Sequence[torch.Tensor], fast: bool):
    """The clipping a run of ``params`` takes: this module's ``clip_grad_norm_`` with ``fast`` on
    CUDA where it ``applies``, torch's otherwise (the CPU keeps the reference). The same numbers."""
    params = list(params)
    lean = fast and bool(params) and params[0].device.type == "cuda" and applies(params)
    return clip_grad_norm_ if lean else torch.nn.utils.clip_grad_norm_


def global_norm(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all of ``grads`` together (plain tensors of one device and dtype), on their device."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def clip_grad_norm_(params: Sequence[torch.Tensor], max_norm: float) -> torch.Tensor | None:
    """Scale the gradients of ``params`` (those that have one) in place so that their global L2
    norm is at most ``max_norm``; returns that norm before clipping (None: no gradient).
    ``applies(params)`` must hold."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    total = global_norm(grads)
    torch._foreach_mul_(grads, torch.clamp(max_norm / (total + 1e-6), max=1.0))
    return total
