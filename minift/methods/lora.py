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
- DoRA (Liu et al. 2024), ``DoRALinear``: W' = m * (W0 + sBA) / ||W0 + sBA||_row, a learnable
  magnitude m (out,) times a unit direction; the row norm is detached (the paper's section 4.3).
- PiSSA (Meng et al. 2024): A and B start from the top-r singular triplets of W0 and the
  base keeps the residual W0 - sBA, so training starts on the principal subspace.
- LoRA+ (Hayou et al. 2024): ``param_groups`` gives B a learning rate ``ratio`` times A's.

The forwards here are the reference. ``minift.fast.lora`` runs plain LoRA layers faster (one
GEMM through the merged weight W0 + sBA), switched on by an explicit call and tested against
these forwards, outputs and gradients.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from minift.methods.common import (count_trainable, find_modules, freeze_all, replace_with_linear, set_submodule,
                                   summary, unfreeze_modules)

__all__ = ["LoRAConfig", "LoRALinear", "DoRALinear", "apply", "merge", "unmerge", "unload", "param_groups",
           "lora_modules", "lora_scaling", "count_trainable", "summary"]

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
    """An ``nn.Linear`` plus a low-rank update: h = W0 x + b + s B A x, s = ``scaling``.
    ``weight``/``bias`` are the original Parameter objects (frozen), so the base state-dict keys
    are unchanged; the adapter adds ``lora_A`` (r, in) and ``lora_B`` (out, r)."""

    dora = False  # DoRALinear says True; the adapter files record it

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False, init: str = "default"):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        if not 1 <= r <= min(self.in_features, self.out_features):
            raise ValueError(f"rank r={r} does not fit a {self.out_features}x{self.in_features} layer "
                             f"(need 1 <= r <= {min(self.in_features, self.out_features)})")
        self.weight, self.bias = base.weight, base.bias
        self.r, self.alpha, self.rslora, self.init = r, alpha, rslora, init
        self.scaling = lora_scaling(r, alpha, rslora)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        w = self.weight
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=w.dtype, device=w.device))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=w.dtype, device=w.device))  # (out, r)
        self.merged = False
        if init == "default":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init; B = 0
        elif init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / r)
        elif init == "pissa":
            self._pissa_init()
        else:
            raise ValueError(f"unknown LoRA init {init!r}; allowed: {', '.join(INITS)}")

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.weight, self.bias)  # W0 x + b (once merged, W0 holds W0 + sBA)
        if self.merged:
            return h
        return h + self.scaling * F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)  # + s B A x

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W0 + sBA: the weight ``merge`` writes."""
        return self.weight + self.delta_weight()

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight.copy_(self.merged_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.sub_(self.delta_weight())
            self.merged = False

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, r={self.r}, scaling={self.scaling:.4g}, "
                f"dora={self.dora}, merged={self.merged}")


class DoRALinear(LoRALinear):
    """DoRA: W' = m * (W0 + sBA) / ||W0 + sBA||_row, with the magnitude m (``lora_magnitude``, (out,))
    learned beside A and B. Forward, with f = m / ||W0 + sBA||_row and the norm a constant:

        h = f * (W0 x + s B A x) + b
    """

    dora = True

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False, init: str = "default"):
        super().__init__(base, r, alpha, dropout, rslora, init)
        self._merged_factor: torch.Tensor | None = None  # f at merge time, divided out again by unmerge
        # m starts at ||W0 + sBA||_row, so f == 1 and W' = W0 + sBA at init
        self.lora_magnitude = nn.Parameter(self._row_norm().detach().clone())

    def _row_norm(self) -> torch.Tensor:
        return torch.linalg.vector_norm(self.weight + self.delta_weight(), dim=1)  # (out,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.weight, self.bias)  # W0 x + b (once merged, W0 holds W')
        if self.merged:
            return h
        lora = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling  # s B A x
        with torch.no_grad():  # a constant: no graph (a detached view would keep its base's graph,
            norm = self._row_norm()  # W0 + sBA included, alive through the division below)
        f = self.lora_magnitude / norm  # (out,); m gets its gradient here
        # f (W0 x + sBA x) + b, written as h + (f - 1) W0 x + f sBA x: at init f == 1 and the output
        # is the base's, bit for bit (while W0 is the one m was taken from: rounded afterwards, as a
        # frozen base cast to bf16 is, its norms move f by about 1e-3). f takes the activations'
        # dtype (bf16 under autocast), not the other way round: an fp32 f would promote every
        # (..., out) product, and the output, to fp32. f - 1 is formed in fp32 first, so a small
        # change of m survives the rounding.
        dt = h.dtype
        w0x = h - self.bias.to(dt) if self.bias is not None else h
        return h + (f - 1).to(dt) * w0x + f.to(dt) * lora

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W' = f * (W0 + sBA), f = m / ||W0 + sBA||_row."""
        return (self.lora_magnitude / self._row_norm())[:, None] * (self.weight + self.delta_weight())

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self._merged_factor = self.lora_magnitude / self._row_norm()
            super().merge()

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.div_(self._merged_factor[:, None])  # W0 + sBA
            self._merged_factor = None
            super().unmerge()  # W0


def lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def apply(model: nn.Module, cfg: LoRAConfig, *, ranks: dict[str, tuple[int, float]] | None = None
          ) -> list[str]:
    """Swap every target ``nn.Linear`` for a ``LoRALinear`` (a ``DoRALinear`` with ``cfg.dora``);
    freeze all but the adapters and ``cfg.modules_to_save``. Returns the adapted module names.

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
        layer = DoRALinear if cfg.dora else LoRALinear
        # in the mode the layer was in: LoRA on a model in eval mode draws no dropout
        set_submodule(model, name, layer(m, r, alpha, cfg.dropout, cfg.rslora, cfg.init).train(m.training))
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
            if not m.merged and not torch.isfinite(m.merged_weight()).all():
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
