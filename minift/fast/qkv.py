"""q, k and v's LoRA factors A stacked: one GEMM for their three A x, one for their three gradients.

The queries, keys and values are three projections of one input x. Through ``fast.lora``'s merged
forward each adapted one reads x twice for its rank-r factor: A x in the forward (kept for B's
gradient) and dA = s (g B)^T x in the backward. Each pass is a thin GEMM bound by reading x (N, C),
so three of them read x three times where one would do. ``StackedMergedLoRA`` runs the adapted
projections of one attention layer as one autograd node:

    forward    A x  for all of them  = x [A_q; A_k; A_v]^T           one GEMM, (N, r_q + r_k + r_v)
               y_i = x (W0_i + s_i B_i A_i)^T + b_i                   one GEMM each, as fast.lora
    backward   [dA_q; dA_k; dA_v] = [g_q B_q | g_k B_k | g_v B_v]^T x, each scaled by its s_i
               dB_i = s_i g_i^T (A_i x)        dx = sum_i g_i (W0_i + s_i B_i A_i)

Each stacked GEMM costs about what one of the three did (``benchmarks/lora_gemm_shapes.py --layouts``
times both ways; docs/benchmarks.md, "What limits LoRA now", has the numbers).

``enable`` changes the class of each attention module (GPT's and BERT's ``SelfAttention``, Llama's
``Attention``) in place, as ``fast.lora`` does with its layers: the subclass overrides ``qkv`` only.
It stacks the projections that take the merged forward at that moment (``MergedLoRALinear.merges``:
W0 frozen, no LoRA dropout acting, not merged into W0; without the factor kernel), when there are at
least two; the others run their own forward. Ranks and scalings may differ between the three. The
node sums the projections' input gradients in the matmul dtype, as autograd sums those of three
separate layers; the stacked GEMMs add up each A x and dA in their own order, so under bf16 a value
may round differently from the layer-by-layer forward's. Tested against the unstacked merged forward,
outputs and gradients, in tests/fast/test_qkv.py.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from minift.fast import lora as fast_lora
from minift.fast.lora import MergedLoRALinear
from minift.models import layers, llama

__all__ = ["StackedMergedLoRA", "enable", "disable", "stacked", "stacking"]


class StackedMergedLoRA(torch.autograd.Function):
    """The merged LoRA forward (``fast.lora.MergedLoRA``) of k >= 2 projections of one input x.

    ``apply(x, scalings, W_1, b_1, A_1, B_1, ..., W_k, b_k, A_k, B_k)`` returns the k outputs, each
    with x's leading dimensions; W0 frozen, every b may be None.
    """

    @staticmethod
    def forward(ctx, x, scalings: tuple, *params):
        W, b, A, B = (params[i::4] for i in range(4))
        dt = fast_lora.matmul_dtype(x)
        x2 = x.to(dt).reshape(-1, x.shape[-1])  # (N, in)
        A_ = torch.cat([a.to(dt) for a in A])  # (R, in), R = the ranks' sum
        B_ = [m.to(dt) for m in B]
        ax = x2 @ A_.t()  # (N, R): every projection's A x in one GEMM
        ranks = [a.shape[0] for a in A]
        ys = [F.linear(x2, fast_lora.merged_weight(w, a, m, s), None if c is None else c.to(dt))
              for w, c, a, m, s in zip(W, b, A_.split(ranks), B_, scalings)]  # each (N, out_i)
        ctx.save_for_backward(x2, A_, ax, *W, *B_)
        ctx.scalings, ctx.ranks, ctx.x_shape, ctx.x_dtype = scalings, ranks, x.shape, x.dtype
        ctx.dtypes = [(a.dtype, m.dtype, None if c is None else c.dtype) for a, m, c in zip(A, B, b)]
        return tuple(y.view(*x.shape[:-1], y.shape[-1]) for y in ys)

    @staticmethod
    def backward(ctx, *grads):
        if torch.is_grad_enabled():  # create_graph=True: this backward builds no graph of its own
            raise RuntimeError("double backward (create_graph=True) through q, k, v's stacked LoRA is not "
                               "supported; call minift.fast.qkv.disable(model) first")
        x2, A_, ax, *rest = ctx.saved_tensors
        k = len(ctx.ranks)
        W, B_ = rest[:k], rest[k:]
        need = ctx.needs_input_grad[2:]  # per projection: W, b, A, B
        gs = [g.reshape(-1, g.shape[-1]).to(x2.dtype) for g in grads]  # each (N, out_i)
        As, axs = A_.split(ctx.ranks), ax.split(ctx.ranks, dim=1)
        dx = None
        if ctx.needs_input_grad[0]:
            grad_fn = fast_lora.input_grad_op if torch.compiler.is_compiling() else fast_lora.input_grad
            for g, w, a, m, s in zip(gs, W, As, B_, ctx.scalings):
                part = grad_fn(g, w, a, m, s)  # (N, in)
                dx = part if dx is None else dx.add_(part)
            dx = dx.view(ctx.x_shape).to(ctx.x_dtype)
        dA = [None] * k
        if any(need[2::4]):
            gB = torch.cat([g @ m for g, m in zip(gs, B_)], dim=1)  # (N, R)
            dA = (gB.t() @ x2).split(ctx.ranks)  # every projection's (g B)^T x in one GEMM
        out = []
        for i, (g, s, (a_dt, b_dt, bias_dt)) in enumerate(zip(gs, ctx.scalings, ctx.dtypes)):
            dAi = dA[i].to(a_dt).mul_(s) if need[4 * i + 2] else None  # (r_i, in)
            dBi = (g.t() @ axs[i]).to(b_dt).mul_(s) if need[4 * i + 3] else None  # (out_i, r_i)
            dbi = g.sum(0).to(bias_dt) if need[4 * i + 1] else None
            out += [None, dbi, dAi, dBi]
        return (dx, None, *out)


def stacked(attn: nn.Module, training: bool | None = None) -> list[str]:
    """The names of ``attn``'s q/k/v projections that take the stacked forward in their mode (or in
    training mode if ``training`` says so): those that take the merged forward
    (``MergedLoRALinear.merges``, not merged into W0, no factor kernel), if at least two do."""
    names = [n for n in ("q_proj", "k_proj", "v_proj") if _merges(getattr(attn, n), training)]
    return names if len(names) >= 2 else []


def _merges(m: nn.Module, training: bool | None) -> bool:
    return isinstance(m, MergedLoRALinear) and not m.merged and not m.factor_kernel and m.merges(training)


def stacking(model: nn.Module) -> list[str]:
    """The names of the attention modules ``enable`` switched whose training steps stack q, k and v
    (``stacked(..., training=True)``); the others run each projection's own forward there."""
    return [name for name, m in model.named_modules() if type(m) in REFERENCE and stacked(m, training=True)]


def _qkv(attn: nn.Module, x: torch.Tensor):
    """q, k, v of x, the projections in ``stacked(attn)`` through one ``StackedMergedLoRA``."""
    names = stacked(attn)
    if not names:
        return attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    ms = [getattr(attn, n) for n in names]
    params = [t for m in ms for t in (m.weight, m.bias, m.lora_A, m.lora_B)]
    ys = dict(zip(names, StackedMergedLoRA.apply(x, tuple(m.scaling for m in ms), *params)))
    return tuple(ys[n] if n in ys else getattr(attn, n)(x) for n in ("q_proj", "k_proj", "v_proj"))


class StackedSelfAttention(layers.SelfAttention):
    def qkv(self, x):
        return _qkv(self, x)


class StackedLlamaAttention(llama.Attention):
    def qkv(self, x):
        return _qkv(self, x)


FAST = {layers.SelfAttention: StackedSelfAttention, llama.Attention: StackedLlamaAttention}
REFERENCE = {fast: ref for ref, fast in FAST.items()}


def enable(model: nn.Module) -> list[str]:
    """Stack q, k and v's LoRA factors in every attention module of ``model`` where at least two of the
    three are merged LoRA layers (``fast.lora.enable`` first).

    Returns:
        The names of the attention modules switched (``[]`` when none has two merged LoRA projections).
    """
    def applies(m):
        return sum(isinstance(getattr(m, n), MergedLoRALinear) for n in ("q_proj", "k_proj", "v_proj")) >= 2
    return fast_lora.swap_classes(model, FAST, applies)


def disable(model: nn.Module) -> list[str]:
    """Put every attention module ``enable`` switched back on the reference forward; returns their names."""
    return fast_lora.swap_classes(model, REFERENCE, lambda m: True)
