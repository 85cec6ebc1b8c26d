"""The MLP's activation recomputed in the backward of down_proj's merged LoRA, instead of kept.

In the reference MLP, down_proj(act(up_proj(x))), autograd keeps both the activation's input h (for
the activation's backward) and its output a = act(h) (for the gradient of down_proj's LoRA factor A:
dA = s (g B)^T a). The two are the widest tensors of a block (GPT-2 medium at 8 x 1,024 tokens: 64 MB
each in bf16, 1.5 GiB over 24 layers). ``ActMergedLoRA`` is down_proj's merged LoRA (``fast.lora``)
with the activation inside it: the forward computes a, uses it and drops it, keeping h alone; the
backward computes a again from h for dA and returns the gradient of h through the activation's own
derivative. Recomputing a each layer and step (one elementwise pass over h; SwiGLU's silu(g) is
computed twice there) buys the memory of a. In eager mode SwiGLU also stops keeping silu(g), which
the product kept for its backward; compiled, the reference already recomputes that one.

    activation   model          a                   recomputed from
    GELU         GPT-2 (tanh),  gelu(h)             h = up_proj(x)
                 BERT (exact)
    SwiGLU       Llama          silu(g) * u         g = gate_proj(x), u = up_proj(x)

``enable`` changes the class of each MLP whose down_proj is a merged LoRA layer, in place (as
``fast.lora`` does with its layers): the subclass overrides ``forward`` only, and runs the reference
forward whenever down_proj's merged forward does not apply (``MergedLoRALinear.merges``). The factor
kernel (``fast.lora``'s ``factor_kernel``) is not used on such a down_proj. ``minift train`` turns it
on for compiled runs (``training.speed``; docs/speed.md has what it saves and costs). Tested against
the merged forward alone, outputs and gradients, in tests/fast/test_mlp.py.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from minift.fast import lora as fast_lora
from minift.fast.lora import MergedLoRALinear
from minift.models import bert, gpt, llama

__all__ = ["ActMergedLoRA", "enable", "disable", "recomputing"]


class GELU:
    """gelu(h), and h's gradient by autograd's own formula (``aten.gelu_backward``)."""

    def __init__(self, approximate: str):
        self.approximate = approximate  # "tanh" (GPT-2) or "none" (BERT)

    def __call__(self, h):
        return F.gelu(h, approximate=self.approximate)

    def backward(self, grad, h):
        return (torch.ops.aten.gelu_backward(grad, h, approximate=self.approximate),)


class SwiGLU:
    """silu(g) * u, and the gradients of g and u as autograd takes the product and silu apart."""

    def __call__(self, g, u):
        return F.silu(g) * u

    def backward(self, grad, g, u):
        return torch.ops.aten.silu_backward(grad * u, g), grad * F.silu(g)


# by name: a string is a constant to torch.compile where an object argument of Function.apply may not be
ACTIVATIONS = {"gelu_tanh": GELU("tanh"), "gelu": GELU("none"), "swiglu": SwiGLU()}


class ActMergedLoRA(torch.autograd.Function):
    """y = act(*h) (W0 + s B A)^T + b with W0 frozen, keeping h and not act(*h).

    Forward: a = act(*h) in h's dtype, then as ``fast.lora.MergedLoRA``: a in the matmul dtype
    through the rebuilt W0 + sBA, and A a kept (N x r). Backward, with g = dL/dy:
        da = g (W0 + sBA)                       dh = act's derivative applied to da
        dA = s (g B)^T act(*h)  (a recomputed)  dB = s g^T (A a)        db = sum of g over rows
    """

    @staticmethod
    def forward(ctx, weight, bias, A, B, scaling: float, act_name: str, *h):
        a = ACTIVATIONS[act_name](*h)  # in h's dtype, as the reference MLP computes it
        y, _, A_, B_, ax = fast_lora.merged_forward(a, weight, bias, A, B, scaling)  # a's copy dropped here
        ctx.save_for_backward(weight, A_, B_, ax, *h)
        ctx.scaling, ctx.act_name, ctx.a_shape, ctx.a_dtype = scaling, act_name, a.shape, a.dtype
        ctx.dtypes = (A.dtype, B.dtype, None if bias is None else bias.dtype)
        return y.view(*a.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, g):
        if torch.is_grad_enabled():
            raise RuntimeError("double backward (create_graph=True) through the MLP's recomputed activation is "
                               "not supported; call minift.fast.mlp.disable(model) first")
        weight, A_, B_, ax, *h = ctx.saved_tensors
        s, act, (a_dt, b_dt, bias_dt) = ctx.scaling, ACTIVATIONS[ctx.act_name], ctx.dtypes
        g2 = g.reshape(-1, g.shape[-1]).to(A_.dtype)  # (N, out)
        need = ctx.needs_input_grad  # weight, bias, A, B, scaling, act_name, *h
        db = dA = dB = None
        dh = [None] * len(h)
        if need[2]:  # first, so that a's copy is gone before the input gradient's tensors exist
            again = _act_op(list(h), ctx.act_name) if torch.compiler.is_compiling() else act(*h)
            x2 = again.to(A_.dtype).reshape(-1, ctx.a_shape[-1])  # a again, from h
            dA = ((g2 @ B_).t() @ x2).to(a_dt).mul_(s)  # (r, in)
            del again, x2
        if need[3]:
            dB = (g2.t() @ ax).to(b_dt).mul_(s)  # (out, r)
        if need[1]:
            db = g2.sum(0).to(bias_dt)
        if any(need[6:]):
            grad_fn = fast_lora.input_grad_op if torch.compiler.is_compiling() else fast_lora.input_grad
            da = grad_fn(g2, weight, A_, B_, s).view(ctx.a_shape).to(ctx.a_dtype)
            dh = act.backward(da, *h)
        return (None, db, dA, dB, None, None, *dh)


# The recomputation as one opaque operator for torch.compile. Written out inline, act(*h) in the backward
# is the same expression as in the forward, so the compiler computes it once, in the forward, and keeps
# its output until the backward: the tensor this module exists not to keep. An operator it cannot look
# into has to run in the backward.
@torch.library.custom_op("minift::act_recompute", mutates_args=())
def _act_op(h: list[torch.Tensor], act_name: str) -> torch.Tensor:
    return ACTIVATIONS[act_name](*h)


@_act_op.register_fake
def _(h, act_name):
    return h[0].new_empty(h[0].shape, dtype=functools.reduce(torch.promote_types, [t.dtype for t in h]))


def _down(mlp: nn.Module, act_name: str, *h: torch.Tensor) -> torch.Tensor:
    """down_proj(act(*h)): through ``ActMergedLoRA`` when down_proj's merged forward applies."""
    down = mlp.down_proj
    if isinstance(down, MergedLoRALinear) and not down.merged and down.merges():
        return ActMergedLoRA.apply(down.weight, down.bias, down.lora_A, down.lora_B, down.scaling, act_name, *h)
    return down(ACTIVATIONS[act_name](*h))


class GPTMLP(gpt.MLP):
    def forward(self, x):
        return self.dropout(_down(self, "gelu_tanh", self.up_proj(x)))


class BertMLP(bert.MLP):
    def forward(self, x):
        return _down(self, "gelu", self.up_proj(x))


class LlamaMLP(llama.MLP):
    def forward(self, x):
        return _down(self, "swiglu", self.gate_proj(x), self.up_proj(x))


FAST = {gpt.MLP: GPTMLP, bert.MLP: BertMLP, llama.MLP: LlamaMLP}
REFERENCE = {fast: ref for ref, fast in FAST.items()}


def enable(model: nn.Module) -> list[str]:
    """Recompute the activation in down_proj's merged LoRA backward in every MLP of ``model`` whose
    down_proj is a merged LoRA layer (``fast.lora.enable`` first).

    Args:
        model: a GPT, Llama, Bert or BertClassifier, with LoRA's merged forward on.
    Returns:
        The names of the MLPs switched (``[]`` when none has a merged LoRA down_proj).
    """
    return fast_lora.swap_classes(model, FAST, lambda m: isinstance(m.down_proj, MergedLoRALinear))


def recomputing(model: nn.Module) -> list[str]:
    """The names of the MLPs ``enable`` switched whose training steps recompute the activation: those
    whose down_proj takes the merged forward while training (W0 frozen, no LoRA dropout, not merged
    into W0). The others run the reference forward there."""
    return [name for name, m in model.named_modules()
            if type(m) in REFERENCE and not m.down_proj.merged and m.down_proj.merges(training=True)]


def disable(model: nn.Module) -> list[str]:
    """Put every MLP ``enable`` switched back on the reference forward; returns their names."""
    return fast_lora.swap_classes(model, REFERENCE, lambda m: True)
