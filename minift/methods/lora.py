"""LoRA: Low-Rank Adaptation (Hu et al. 2021, https://arxiv.org/abs/2106.09685).

A frozen linear layer W0 (out x in) learns only a low-rank update:

    h = W0 x + b + (alpha / r) * B A x          A: r x in,  B: out x r,  r << min(in, out)

         x ──────────────► [ W0 (frozen) ] ──────────────┐
         │                                               (+) ──► h
         └─► dropout ─► [ A: r x in ] ─► [ B: out x r ] ─┘ x alpha/r

A starts Kaiming-uniform and B starts at zero, so an adapted model computes exactly what
the base model computed until training moves B. After training, ``merge`` folds the
update into W0 (W = W0 + (alpha/r) B A): no extra latency at inference.

Variants, all in this file:
- rsLoRA (Kalajdzievski 2023): scaling alpha / sqrt(r), so larger ranks keep learning.
- DoRA (Liu et al. 2024): W' = m * (W0 + sBA) / ||W0 + sBA||_row, a learnable magnitude m
  (out,) times a unit direction; the row norm is detached (the paper's section 4.3).
- PiSSA (Meng et al. 2024): A and B start from the top-r singular triplets of W0 and the
  base keeps the residual W0 - sBA, so training starts on the principal subspace.
- LoRA+ (Hayou et al. 2024): ``param_groups`` gives B a learning rate ``ratio`` times A's.

A speed option, off by default: ``set_merged_forward(model)`` runs each (plain, undropped) LoRA
layer through the merged weight W0 + sBA, rebuilt every step, and a hand-written backward
(``MergedLoRA``): one GEMM per layer instead of W0 x, A x and the rank-r update added to the
output, and one input-gradient GEMM instead of two summed. Gradients of A and B are exact; the
forward rounds W0 + sBA once to the matmul dtype (bf16 under autocast), like any bf16 weight.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from minift.fast import kernels
from minift.methods.common import (count_trainable, find_modules, freeze_all, replace_with_linear, set_submodule,
                                   summary, unfreeze_modules)

__all__ = ["LoRAConfig", "LoRALinear", "MergedLoRA", "set_merged_forward", "apply", "merge", "unmerge", "unload", "param_groups", "lora_modules",
           "lora_scaling", "count_trainable", "summary"]

INITS = ("default", "gaussian", "pissa")


@dataclass
class LoRAConfig:
    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    rslora: bool = False
    dora: bool = False
    init: str = "default"  # "default" (Kaiming A, zero B) | "gaussian" (N(0, 1/r) A, zero B) | "pissa"
    modules_to_save: tuple[str, ...] = ()  # fully trainable modules, e.g. ("classifier",)

    def __post_init__(self):
        self.targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        self.modules_to_save = ((self.modules_to_save,) if isinstance(self.modules_to_save, str)
                                else tuple(self.modules_to_save))
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoRAConfig.r must be an integer >= 1, got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"LoRAConfig.alpha must be a finite number > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRAConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in INITS:
            raise ValueError(f"LoRAConfig.init must be one of {', '.join(INITS)}; got {self.init!r}")
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise ValueError(f"LoRAConfig.targets must be non-empty module names, e.g. ('q_proj', 'v_proj'); "
                             f"got {self.targets!r}")


def lora_scaling(r: int, alpha: float, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


class LoRALinear(nn.Module):
    """An ``nn.Linear`` plus a low-rank update. ``weight``/``bias`` are the original
    Parameter objects (frozen), so the base state-dict keys are unchanged."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False, dora: bool = False, init: str = "default"):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        if not 1 <= r <= min(self.in_features, self.out_features):
            raise ValueError(f"rank r={r} does not fit a {self.out_features}x{self.in_features} layer "
                             f"(need 1 <= r <= {min(self.in_features, self.out_features)})")
        self.weight, self.bias = base.weight, base.bias
        self.r, self.alpha, self.rslora, self.dora, self.init = r, alpha, rslora, dora, init
        self.scaling = lora_scaling(r, alpha, rslora)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        w = self.weight
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=w.dtype, device=w.device))
        self.merged = False
        self.merged_forward = False  # see set_merged_forward
        self._dora_factor: torch.Tensor | None = None  # m / ||W0 + sBA|| saved by merge for unmerge
        if init == "default":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init; B = 0
        elif init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / r)
        elif init == "pissa":
            self._pissa_init()
        else:
            raise ValueError(f"unknown LoRA init {init!r}; allowed: {', '.join(INITS)}")
        if dora:  # m starts at ||W0 + sBA||_row, so W' = W0 + sBA at init
            self.lora_magnitude = nn.Parameter(self._row_norm().detach().clone())

    @torch.no_grad()
    def _pissa_init(self):
        # W0 = U S Vh. Top-r part U_r S_r Vh_r = s * B A with B = U_r sqrt(S_r/s), A = sqrt(S_r/s) Vh_r;
        # the base keeps the residual W0 - s B A (it moves into the adapter, not out of the model).
        U, S, Vh = torch.linalg.svd(self.weight.float(), full_matrices=False)  # (out,k) (k,) (k,in)
        root = (S[: self.r] / self.scaling).sqrt()
        self.lora_A.copy_(root[:, None] * Vh[: self.r])
        self.lora_B.copy_(U[:, : self.r] * root[None, :])
        self.weight.sub_(self.scaling * self.lora_B @ self.lora_A)

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * self.lora_B @ self.lora_A  # (out, in)

    def _row_norm(self) -> torch.Tensor:
        return torch.linalg.vector_norm(self.weight + self.delta_weight(), dim=1)  # (out,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        if self.merged_forward and self._can_merge_forward():
            return MergedLoRA.apply(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling)
        if not self.dora:
            # W0 x + b + s B (A x), with "+ s B (.)" done by one addmm: the scaling and the
            # sum happen inside the GEMM instead of as two passes over the (..., out) output.
            base = F.linear(x, self.weight, self.bias)  # (..., out)
            ax = F.linear(self.dropout(x), self.lora_A)  # (..., r)
            out = torch.addmm(base.reshape(-1, base.shape[-1]), ax.reshape(-1, self.r), self.lora_B.t(),
                              alpha=self.scaling)  # (N, out)
            return out.view(base.shape)
        lora = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling  # (..., out)
        # DoRA: f (W0 x + sBA x) + b with f = m / ||W0 + sBA|| (the norm treated as a constant),
        # written as base + (f - 1) W0 x + f sBA x: at init f == 1 and the output is the base's, bit for bit.
        with torch.no_grad():  # a constant: no graph (a detached view would keep its base's graph,
            norm = self._row_norm()  # W0 + sBA included, alive through the division below)
        factor = self.lora_magnitude / norm  # (out,), fp32
        base = F.linear(x, self.weight, self.bias)
        # the factor takes the activations' dtype (bf16 under autocast), not the other way round: an
        # fp32 factor would promote every (..., out) product, and the layer's output, to fp32.
        # f - 1 is formed in fp32 first, so a small change of the magnitude survives the rounding.
        dt = base.dtype
        base_nobias = base - self.bias.to(dt) if self.bias is not None else base
        return base + (factor - 1).to(dt) * base_nobias + factor.to(dt) * lora

    def _can_merge_forward(self) -> bool:
        """The merged forward covers plain LoRA over a frozen weight, without dropout in training."""
        return (not self.dora and not self.weight.requires_grad
                and (isinstance(self.dropout, nn.Identity) or not self.training))

    @torch.no_grad()
    def merged_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W0 + sBA, None), or for DoRA (f * (W0 + sBA), f) with f = m / ||W0 + sBA||_row."""
        if not self.dora:
            return self.weight + self.delta_weight(), None
        factor = self.lora_magnitude / self._row_norm()  # (out,)
        return factor[:, None] * (self.weight + self.delta_weight()), factor

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        new, self._dora_factor = self.merged_weight()
        self.weight.copy_(new)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        if self.dora:
            self.weight.div_(self._dora_factor[:, None])
        self.weight.sub_(self.delta_weight())
        self._dora_factor = None
        self.merged = False

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, r={self.r}, scaling={self.scaling:.4g}, "
                f"dora={self.dora}, merged={self.merged}")


class MergedLoRA(torch.autograd.Function):
    """y = x (W0 + s B A)^T + b with W0 frozen: forward and backward written out by hand.

    Forward: W0 + sBA is rebuilt in the matmul dtype (``_merged_weight``: one Triton pass on CUDA),
    one GEMM applies it; A x (N x r) is kept for B's gradient. Backward, with g = dL/dy (N x out):
        dx = g (W0 + sBA)        (W0 + sBA rebuilt: cheaper than keeping it for every layer)
        dA = s (g B)^T x         dB = s g^T (A x)         db = sum of g over rows
    """

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scaling: float):
        dev = x.device.type
        # autocast's matmul dtype, except for fp64 inputs (autocast leaves those alone too)
        autocast = torch.is_autocast_enabled(dev) and x.dtype != torch.float64
        dt = torch.get_autocast_dtype(dev) if autocast else x.dtype
        x2 = x.to(dt).reshape(-1, x.shape[-1])  # (N, in)
        A_, B_ = A.to(dt), B.to(dt)
        w = _merged_weight(weight, A_, B_, scaling)  # (out, in)
        y = F.linear(x2, w, None if bias is None else bias.to(dt))  # (N, out)
        ax = x2 @ A_.t()  # (N, r)
        ctx.save_for_backward(x2, weight, A_, B_, ax)
        ctx.scaling, ctx.x_shape, ctx.x_dtype = scaling, x.shape, x.dtype
        ctx.dtypes = (A.dtype, B.dtype, None if bias is None else bias.dtype)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, g):
        if torch.is_grad_enabled():  # create_graph=True: this backward builds no graph of its own
            raise RuntimeError("double backward (create_graph=True) through LoRA's merged forward is not "
                               "supported; call lora.set_merged_forward(model, False) first")
        x2, weight, A_, B_, ax = ctx.saved_tensors
        s, (a_dt, b_dt, bias_dt) = ctx.scaling, ctx.dtypes
        g2 = g.reshape(-1, g.shape[-1]).to(x2.dtype)  # (N, out)
        need = ctx.needs_input_grad
        dx = dA = dB = db = None
        if need[0]:
            grad_fn = _input_grad_op if torch.compiler.is_compiling() else _input_grad
            dx = grad_fn(g2, weight, A_, B_, s).view(ctx.x_shape).to(ctx.x_dtype)
        if need[3]:
            dA = ((g2 @ B_).t() @ x2).to(a_dt).mul_(s)  # (r, in)
        if need[4]:
            dB = (g2.t() @ ax).to(b_dt).mul_(s)  # (out, r)
        if need[2]:
            db = g2.sum(0).to(bias_dt)
        return dx, None, db, dA, dB, None


def _merged_weight(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """W0 + sBA in A's dtype (the matmul dtype) through ``kernels.lora_merged_weight``.

    ``torch.addmm`` would do, but cuBLAS runs it as two kernels (a copy of W0 into the output, then
    a rank-r GEMM that adds into it), twice per layer and step. On CUDA (ranks up to
    ``kernels.MAX_RANK``, Triton installed) ``kernels`` has it as one pass over W0 with an fp32 sum,
    eager and under torch.compile alike (dynamo traces the Triton launch); elsewhere it is addmm.
    Written elementwise instead, W0 + s * sum_k B[:, k] A[k, :], for inductor to fuse, a GPT-2
    medium LoRA step under CUDA graphs took 42.2 ms against 37.2 ms through the kernel (H200 calls
    l and k, one machine; ``benchmarks/results/H200-CALLS.md``).
    """
    return kernels.lora_merged_weight(weight, A, B, scaling)


def _input_grad(g: torch.Tensor, weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float
                ) -> torch.Tensor:
    """dx = g (W0 + sBA), the merged weight rebuilt from W0, A and B in g's dtype."""
    return g @ _merged_weight(weight, A.to(g.dtype), B.to(g.dtype), scaling)


# The same, as one opaque operator for torch.compile. Written out inline, the rebuild of W0 + sBA
# depends on parameters only, so the compiler's forward/backward partitioner moves it into the
# forward graph and keeps its result until backward: a bf16 copy of every adapted weight (0.56 GiB
# for GPT-2 medium with all six projections adapted). Inside an operator that takes g, it has to
# wait for the backward pass.
@torch.library.custom_op("minift::lora_input_grad", mutates_args=())
def _input_grad_op(g: torch.Tensor, weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float
                   ) -> torch.Tensor:
    return _input_grad(g, weight, A, B, scaling)


@_input_grad_op.register_fake
def _(g, weight, A, B, scaling):
    return g.new_empty(g.shape[0], weight.shape[1])


def set_merged_forward(model: nn.Module, on: bool = True) -> int:
    """Switch every LoRA layer to (or back from) the merged forward of ``MergedLoRA``; DoRA
    layers, trainable base weights and dropout in training keep the exact path. Returns the
    number of layers that will take the merged path."""
    mods = lora_modules(model)
    if not mods:
        raise ValueError("model has no LoRA layers; apply LoRA first")
    for _, m in mods:
        m.merged_forward = on
    return sum(m._can_merge_forward() for _, m in mods) if on else 0


def lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def apply(model: nn.Module, cfg: LoRAConfig, *, ranks: dict[str, tuple[int, float]] | None = None
          ) -> list[str]:
    """Swap every target ``nn.Linear`` for a ``LoRALinear``; freeze all but the adapters and
    ``cfg.modules_to_save``. Returns the adapted module names.

    ``ranks`` optionally overrides (r, alpha) per full module name (the adapter loader uses
    it: a PEFT GPT-2 ``c_attn`` LoRA of rank R becomes q/k/v LoRAs of rank R). ``cfg`` is
    recorded as ``model.lora_config`` so ``save_adapter`` can write it out.
    """
    if lora_modules(model):
        raise ValueError("model already has LoRA layers; call lora.unload(model) before applying again")
    ranks = ranks or {}
    found = find_modules(model, cfg.targets, kind=nn.Linear)
    for name, m in found:  # validate every layer before changing any
        r = ranks.get(name, (cfg.r, cfg.alpha))[0]
        if r > min(m.in_features, m.out_features):
            raise ValueError(f"LoRA rank r={r} is too large for {name} ({m.out_features}x{m.in_features}); "
                             f"it allows at most r={min(m.in_features, m.out_features)}")
    freeze_all(model)
    for name, m in found:
        r, alpha = ranks.get(name, (cfg.r, cfg.alpha))
        set_submodule(model, name, LoRALinear(m, r, alpha, cfg.dropout, cfg.rslora, cfg.dora, cfg.init))
    for _, m in lora_modules(model):
        for pn, p in m.named_parameters():
            p.requires_grad_(pn.startswith("lora_"))
    if cfg.modules_to_save:
        unfreeze_modules(model, cfg.modules_to_save)
    model.lora_config = cfg
    return [n for n, _ in found]


def merge(model: nn.Module, safe: bool = False) -> list[str]:
    """Fold every LoRA update into its base weight (W0 <- W0 + sBA). With ``safe=True`` each
    merged weight is checked to be finite before it is written. Returns the merged names."""
    mods = lora_modules(model)
    if not mods:
        raise ValueError("model has no LoRA layers to merge")
    if safe:  # check every layer before writing any, so a failure leaves the model untouched
        for name, m in mods:
            if not m.merged and not torch.isfinite(m.merged_weight()[0]).all():
                raise ValueError(f"merging LoRA into {name} gives non-finite weights; nothing was merged")
    for _, m in mods:
        m.merge()
    return [n for n, _ in mods]


def unmerge(model: nn.Module) -> list[str]:
    """Undo ``merge``: W0 <- W - sBA (and DoRA's magnitude scaling)."""
    mods = lora_modules(model)
    for _, m in mods:
        m.unmerge()
    return [n for n, _ in mods]


def unload(model: nn.Module) -> nn.Module:
    """Merge, then put plain ``nn.Linear`` modules (holding the merged weights) back in place
    of every ``LoRALinear``. Returns the same model object, now without adapters."""
    return replace_with_linear(model, lora_modules(model), "lora_config")


def param_groups(model: nn.Module, lr: float, ratio: float = 16.0, weight_decay: float = 0.0) -> list[dict]:
    """LoRA+ optimizer groups: ``lora_B`` learns at ``lr * ratio``, every other trainable
    parameter at ``lr``. Weight decay applies to matrices only (not biases, norms or DoRA
    magnitudes). Pass the result straight to ``torch.optim.AdamW``."""
    if ratio <= 0 or lr <= 0:
        raise ValueError(f"param_groups needs lr > 0 and ratio > 0, got lr={lr}, ratio={ratio}")
    groups = {("A", True): [], ("A", False): [], ("B", True): [], ("B", False): []}
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        groups[("B" if name.endswith("lora_B") else "A", p.ndim >= 2)].append(p)
    out = []
    for (which, decay), ps in groups.items():
        if ps:
            out.append({"params": ps, "lr": lr * ratio if which == "B" else lr,
                        "weight_decay": weight_decay if decay else 0.0,
                        "name": "lora_B" if which == "B" else "other"})
    return out
