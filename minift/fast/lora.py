"""Faster forwards for plain LoRA layers (``minift.methods.lora.LoRALinear``), switched on by ``enable``.

The reference layer computes h = W0 x + b + s B (A x) as written. Two forwards give the same values
faster (tests/fast/test_lora.py checks outputs and gradients against the reference):

- addmm (``AddmmLoRALinear``): "+ s B (.)" is one ``torch.addmm`` into the (N, out) output, so the
  scaling and the sum happen inside the GEMM instead of as two more passes over the output.
- merged (``MergedLoRALinear``, ``MergedLoRA``): one GEMM through W = W0 + sBA, rebuilt every step,
  and a hand-written backward: one GEMM per layer instead of W0 x, A x and the rank-r update added
  to the output, and one input-gradient GEMM instead of two summed. Gradients of A and B are exact;
  the forward rounds W0 + sBA once to the matmul dtype (bf16 under autocast), like any bf16 weight.
  The rebuild is one Triton pass on CUDA (``minift.fast.kernels``), ``torch.addmm`` elsewhere.
  With ``factor_kernel`` (off by default: docs/benchmarks.md) the backward's two products
  that read the output gradient, g B and g^T (A x), come from one Triton pass over it
  (``kernels.lora_factor_grads``).

``enable`` changes the class of each layer object in place to one of these subclasses, which
override ``forward`` only (``torch.nn.utils.parametrize`` swaps classes the same way): the
Parameters, their state-dict keys and ``isinstance(m, LoRALinear)`` all stay, so merging, saving
and loading adapters work as before. ``disable`` puts the reference class back. DoRA layers keep
the reference forward.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from minift.fast import kernels
from minift.methods.lora import LoRALinear, lora_modules

__all__ = ["AddmmLoRALinear", "MergedLoRALinear", "MergedLoRA", "enable", "disable", "matmul_dtype", "swap_classes"]


def addmm_forward(layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    """W0 x + b + s B (A x), with "+ s B (.)" done by one addmm."""
    base = F.linear(x, layer.weight, layer.bias)  # (..., out)
    ax = F.linear(layer.dropout(x), layer.lora_A)  # (..., r)
    out = torch.addmm(base.reshape(-1, base.shape[-1]), ax.reshape(-1, layer.r), layer.lora_B.t(),
                      alpha=layer.scaling)  # (N, out)
    return out.view(base.shape)


class AddmmLoRALinear(LoRALinear):
    """``LoRALinear`` with the update added inside one addmm (``addmm_forward``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        return addmm_forward(self, x)


class MergedLoRALinear(LoRALinear):
    """``LoRALinear`` through the merged weight W0 + sBA (``MergedLoRA``) whenever ``merges()``;
    otherwise the addmm forward."""

    factor_kernel = False  # enable(model, factor_kernel=True) sets it on the layer: see MergedLoRA

    def merges(self, training: bool | None = None) -> bool:
        """True when the merged forward applies: W0 frozen (``MergedLoRA`` computes no gradient for
        it) and no dropout acting (it hits the adapter's input only, which a merged weight cannot do)
        in the layer's mode, or in training mode if ``training`` says so."""
        training = self.training if training is None else training
        return not self.weight.requires_grad and (isinstance(self.dropout, nn.Identity) or not training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        if not self.merges():
            return addmm_forward(self, x)
        return MergedLoRA.apply(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling,
                                self.factor_kernel)


FAST_LAYERS = (AddmmLoRALinear, MergedLoRALinear)


def enable(model: nn.Module, *, merged: bool = True, factor_kernel: bool = False) -> list[str]:
    """Put every plain LoRA layer of ``model`` on a fast forward. DoRA layers are left as they are.

    Args:
        model: a model with or without LoRA layers.
        merged: the merged forward (``MergedLoRALinear``); False: the addmm forward (``AddmmLoRALinear``).
        factor_kernel: merged layers take A's and B's gradients through ``kernels.lora_factor_grads``.
    Returns:
        The names of the layers switched (``[]`` when there are no plain LoRA layers, or all are
        already on that forward with that backward).
    """
    fast = MergedLoRALinear if merged else AddmmLoRALinear
    want = merged and factor_kernel  # addmm layers have no such backward
    names = []
    for name, m in lora_modules(model):
        switch = type(m) is not fast or getattr(m, "factor_kernel", False) != want
        if type(m) in (LoRALinear, *FAST_LAYERS) and switch:
            m.__class__ = fast
            m.__dict__.pop("factor_kernel", None)
            if want:
                m.factor_kernel = True
            names.append(name)
    return names


def disable(model: nn.Module) -> list[str]:
    """Put every LoRA layer that ``enable`` switched back on the reference forward.

    Returns:
        The names of the layers switched back.
    """
    names = []
    for name, m in lora_modules(model):
        if type(m) in FAST_LAYERS:
            m.__class__ = LoRALinear
            m.__dict__.pop("factor_kernel", None)
            names.append(name)
    return names


class MergedLoRA(torch.autograd.Function):
    """y = x (W0 + s B A)^T + b with W0 frozen: forward and backward written out by hand.

    Forward: W0 + sBA is rebuilt in the matmul dtype (``merged_weight``), one GEMM applies it;
    A x (N x r) is kept for B's gradient. Backward, with g = dL/dy (N x out):
        dx = g (W0 + sBA)        (W0 + sBA rebuilt: cheaper than keeping it for every layer)
        dA = s (g B)^T x         dB = s g^T (A x)         db = sum of g over rows
    With ``factor_kernel``, g B and g^T (A x) come from one pass over g (``kernels.lora_factor_grads``,
    fp32 sums: dB is rounded once, to B's dtype, where the two GEMMs round it to g's first).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scaling: float, factor_kernel: bool = False):
        y, x2, A_, B_, ax = merged_forward(x, weight, bias, A, B, scaling)
        ctx.save_for_backward(x2, weight, A_, B_, ax)
        ctx.scaling, ctx.x_shape, ctx.x_dtype, ctx.factor_kernel = scaling, x.shape, x.dtype, factor_kernel
        ctx.dtypes = (A.dtype, B.dtype, None if bias is None else bias.dtype)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, g):
        if torch.is_grad_enabled():  # create_graph=True: this backward builds no graph of its own
            raise RuntimeError("double backward (create_graph=True) through LoRA's merged forward is not "
                               "supported; call minift.fast.lora.disable(model) first")
        x2, weight, A_, B_, ax = ctx.saved_tensors
        s, (a_dt, b_dt, bias_dt) = ctx.scaling, ctx.dtypes
        g2 = g.reshape(-1, g.shape[-1]).to(x2.dtype)  # (N, out)
        need = ctx.needs_input_grad
        dx = dA = dB = db = None
        if need[0]:
            grad_fn = input_grad_op if torch.compiler.is_compiling() else input_grad
            dx = grad_fn(g2, weight, A_, B_, s).view(ctx.x_shape).to(ctx.x_dtype)
        if ctx.factor_kernel and need[3] and need[4]:  # g B and g^T (A x) in one pass over g
            factors = _factor_grads_op if torch.compiler.is_compiling() else kernels.lora_factor_grads
            gB, gax = factors(g2, B_, ax)  # (N, r), (out, r) in at least fp32
            dA = (gB.t() @ x2).to(a_dt).mul_(s)  # (r, in)
            dB = gax.mul_(s).to(b_dt)  # (out, r), rounded once to B's dtype
        else:
            if need[3]:
                dA = ((g2 @ B_).t() @ x2).to(a_dt).mul_(s)  # (r, in)
            if need[4]:
                dB = (g2.t() @ ax).to(b_dt).mul_(s)  # (out, r)
        if need[2]:
            db = g2.sum(0).to(bias_dt)
        return dx, None, db, dA, dB, None, None


def merged_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                   B: torch.Tensor, scaling: float) -> tuple[torch.Tensor, ...]:
    """The merged forward's products, for ``MergedLoRA`` and ``fast.mlp.ActMergedLoRA``.

    x goes to the matmul dtype (autocast's, except for fp64 inputs: autocast leaves those alone too),
    as x2 (N, in), and so do A and B (A_, B_); y = x2 (W0 + sBA)^T + b (N, out) and A x2 (N, r).

    Returns:
        (y, x2, A_, B_, ax); y is (N, out): the caller gives it x's leading dimensions.
    """
    dt = matmul_dtype(x)
    x2 = x.to(dt).reshape(-1, x.shape[-1])  # (N, in)
    A_, B_ = A.to(dt), B.to(dt)
    y = F.linear(x2, merged_weight(weight, A_, B_, scaling), None if bias is None else bias.to(dt))  # (N, out)
    return y, x2, A_, B_, x2 @ A_.t()


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype x's matmuls run in: autocast's where it is on (fp64 inputs excepted: autocast leaves
    those alone), else x's own."""
    dev = x.device.type
    autocast = torch.is_autocast_enabled(dev) and x.dtype != torch.float64
    return torch.get_autocast_dtype(dev) if autocast else x.dtype


def swap_classes(model: nn.Module, classes: dict, applies) -> list[str]:
    """Give every module of ``model`` whose class is a key of ``classes`` and for which ``applies(module)``
    holds the class it maps to, in place (how ``fast.mlp`` and ``fast.qkv`` switch modules on and off);
    returns their names."""
    names = []
    for name, m in model.named_modules():
        if type(m) in classes and applies(m):
            m.__class__ = classes[type(m)]
            names.append(name)
    return names


def merged_weight(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """W0 + sBA in A's dtype (the matmul dtype) through ``kernels.lora_merged_weight``.

    ``torch.addmm`` would do, but cuBLAS runs it as two kernels (a copy of W0 into the output, then
    a rank-r GEMM that adds into it), twice per layer and step. On CUDA (ranks up to
    ``kernels.MAX_RANK``, Triton installed) ``kernels`` has it as one pass over W0 with an fp32 sum,
    eager and under torch.compile alike (dynamo traces the Triton launch); elsewhere it is addmm.
    Written elementwise instead, W0 + s * sum_k B[:, k] A[k, :], for inductor to fuse, a compiled
    GPT-2 medium LoRA step under CUDA graphs ran about 13% slower than through the kernel
    (``benchmarks/rebuild_ab.py`` times the three ways).
    """
    return kernels.lora_merged_weight(weight, A, B, scaling)


def input_grad(g: torch.Tensor, weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float
               ) -> torch.Tensor:
    """dx = g (W0 + sBA), the merged weight rebuilt from W0, A and B in g's dtype."""
    return g @ merged_weight(weight, A.to(g.dtype), B.to(g.dtype), scaling)


# The same, as one opaque operator for torch.compile. Written out inline, the rebuild of W0 + sBA
# depends on parameters only, so the compiler's forward/backward partitioner moves it into the
# forward graph and keeps its result until backward: a bf16 copy of every adapted weight (0.56 GiB
# for GPT-2 medium with all six projections adapted). Inside an operator that takes g, it has to
# wait for the backward pass.
@torch.library.custom_op("minift::lora_input_grad", mutates_args=())
def input_grad_op(g: torch.Tensor, weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float
                  ) -> torch.Tensor:
    return input_grad(g, weight, A, B, scaling)


@input_grad_op.register_fake
def _(g, weight, A, B, scaling):
    return g.new_empty(g.shape[0], weight.shape[1])


# The factor kernel, opaque to torch.compile as the rebuild above is (inductor leaves it alone)
@torch.library.custom_op("minift::lora_factor_grads", mutates_args=())
def _factor_grads_op(g: torch.Tensor, B: torch.Tensor, ax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return kernels.lora_factor_grads(g, B, ax)


@_factor_grads_op.register_fake
def _(g, B, ax):
    acc = torch.promote_types(g.dtype, torch.float32)
    return g.new_empty(g.shape[0], B.shape[1]), g.new_empty(g.shape[1], B.shape[1], dtype=acc)
