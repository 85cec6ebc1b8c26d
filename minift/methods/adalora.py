"""AdaLoRA: adaptive budget allocation (Zhang et al., ICLR 2023, https://arxiv.org/abs/2303.10512).

Each adapted weight learns an update in SVD form, a sum of r triplets (P_i, lambda_i, Q_i):

    h = W0 x + b + s * P Λ Q x        P: out x r (``lora_B``), Λ = diag(lambda) (``lora_E``, r x 1),
                                      Q: r x in (``lora_A``), s = alpha / (ranknum + 1e-5)

         x ──────────────► [ W0 (frozen) ] ───────────────────────┐
         │                                                       (+) ──► h
         └─► dropout ─► [ Q: r x in ] ─► (* Λ) ─► [ P: out x r ] ─┘ x s

and a rank allocator (``adalora_alloc.py``) moves a fixed budget of live singular values to
where they matter. For every adapter entry w (of P, Λ or Q), after backward:

    I(w)   = |w * dL/dw|                              sensitivity
    I_bar  = b1 * I_bar + (1 - b1) * I                smoothed importance
    U_bar  = b2 * U_bar + (1 - b2) * |I - I_bar|      uncertainty
    s(w)   = I_bar * U_bar                            score
    S_i    = s(lambda_i) + mean_j s(P_ji) + mean_j s(Q_ij)    score of triplet i

The budget (live triplets, over all modules) follows a cubic schedule over optimizer steps t:

    b(t) = b_0                                        t <= t_init          (b_0 = n * init_r)
    b(t) = b_T + (b_0 - b_T) (1 - (t - t_init) / (T - t_final - t_init))^3   (then int())
    b(t) = b_T                                        t >  T - t_final     (b_T = n * target_r)

In between, every delta_t steps, the lowest-scored triplets are pruned (lambda_i <- 0) so
that b(t) stay live; at t = T - t_final a last prune fixes the pattern, which is then
re-applied every step until the end. A pruned lambda_i still gets a gradient (P and Q are
kept), so until the pattern is fixed a triplet can regrow and win its place back. The loss
gets a penalty keeping P and Q close to orthogonal (averaged over the 2n matrices):

    R = 1/(2n) sum_k ( ||P_k^T P_k - I||_F^2 + ||Q_k Q_k^T - I||_F^2 )

PEFT conventions kept here (so its files and schedule match): Λ starts at 0 (the adapter
is a no-op at init) and P, Q ~ N(0, 0.02); ``ranknum`` is the rank the layer was created
with and PEFT never lowers it, so s = alpha / (init_r + 1e-5) for the whole run and after
``finalize``; the allocator runs after ``optimizer.step()`` and before ``zero_grad()``.
PEFT's penalty uses the unsquared norm; the square used here is smooth at R = 0.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from minift.methods.common import find_modules, freeze_all, replace_with_linear, set_submodule, unfreeze_modules


@dataclass
class AdaLoRAConfig:
    init_r: int = 12
    target_r: int = 8                 # average rank left per module at the end
    alpha: float = 32
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    beta1: float = 0.85               # EMA of the sensitivity
    beta2: float = 0.85               # EMA of the uncertainty
    tinit: int = 200                  # steps at the full budget before pruning starts
    tfinal: int = 1000                # last steps with the pattern fixed
    delta_t: int = 10                 # steps between two prunes
    total_step: int | None = None     # optimizer steps of the whole run (required)
    orth_reg_weight: float = 0.5
    modules_to_save: tuple[str, ...] = ()  # fully trainable modules, e.g. ("classifier",)

    def __post_init__(self):
        self.targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        self.modules_to_save = ((self.modules_to_save,) if isinstance(self.modules_to_save, str)
                                else tuple(self.modules_to_save))

        def integer(name, low):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"AdaLoRAConfig.{name} must be an integer >= {low}, got {v!r}")
        for name, low in (("init_r", 1), ("target_r", 1), ("tinit", 0), ("tfinal", 0), ("delta_t", 1)):
            integer(name, low)
        if self.target_r > self.init_r:
            raise ValueError(f"AdaLoRAConfig.target_r={self.target_r} must be <= init_r={self.init_r}")
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"AdaLoRAConfig.alpha must be a finite number > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"AdaLoRAConfig.dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("beta1", "beta2"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"AdaLoRAConfig.{name} must be in (0, 1), got {getattr(self, name)!r}")
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise ValueError(f"AdaLoRAConfig.targets must be non-empty module names, e.g. ('q_proj', 'v_proj'); "
                             f"got {self.targets!r}")
        if self.total_step is None:
            raise ValueError("AdaLoRAConfig.total_step must be set to the number of optimizer steps of the run")
        integer("total_step", 1)
        if self.tinit + self.tfinal >= self.total_step:
            raise ValueError(f"AdaLoRA schedule cannot fit: tinit={self.tinit} + tfinal={self.tfinal} must be < "
                             f"total_step={self.total_step} to leave steps for pruning")
        if self.tfinal == 0 and (self.tinit // self.delta_t + 1) * self.delta_t >= self.total_step:
            raise ValueError(f"AdaLoRA schedule cannot fit: no step in ({self.tinit}, {self.total_step}) is a "
                             f"multiple of delta_t={self.delta_t} and tfinal=0, so nothing would ever be pruned")
        if not isinstance(self.orth_reg_weight, (int, float)) or not self.orth_reg_weight >= 0:
            raise ValueError(f"AdaLoRAConfig.orth_reg_weight must be >= 0, got {self.orth_reg_weight!r}")


def budget(cfg: AdaLoRAConfig, step: int, n_modules: int = 1) -> int:
    """b(step): live singular values allowed over ``n_modules`` adapted modules (PEFT's
    ``budget_schedule``, its ``int()`` truncation included)."""
    b0, bT = cfg.init_r * n_modules, cfg.target_r * n_modules
    if step <= cfg.tinit:
        return b0
    if step > cfg.total_step - cfg.tfinal:
        return bT
    mul = 1 - (step - cfg.tinit) / (cfg.total_step - cfg.tfinal - cfg.tinit)
    return int((b0 - bT) * (mul ** 3) + bT)


def prunes_at(cfg: AdaLoRAConfig, step: int) -> bool:
    """Does the allocator prune to ``budget(step)`` at this step? (Later steps re-apply the fixed pattern.)"""
    end = cfg.total_step - cfg.tfinal
    return step == end or (cfg.tinit < step < end and step % cfg.delta_t == 0)


class SVDLinear(nn.Module):
    """An ``nn.Linear`` plus s * P Λ Q. ``weight``/``bias`` are the original frozen Parameters;
    ``lora_mask`` (r,) records which triplets the allocator kept (a buffer, saved with the adapter)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, ranknum: int | None = None):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        if not 0 <= r <= min(self.in_features, self.out_features):
            raise ValueError(f"rank r={r} does not fit a {self.out_features}x{self.in_features} layer "
                             f"(need 0 <= r <= {min(self.in_features, self.out_features)})")
        self.weight, self.bias = base.weight, base.bias
        self.r, self.alpha = r, alpha
        self.ranknum = float(r if ranknum is None else ranknum)  # PEFT's ranknum: fixed at the initial rank
        self.scaling = alpha / (self.ranknum + 1e-5)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        kw = dict(dtype=self.weight.dtype, device=self.weight.device)
        self.lora_A = nn.Parameter(torch.randn(r, self.in_features, **kw) * 0.02)   # Q (r, in)
        self.lora_E = nn.Parameter(torch.zeros(r, 1, **kw))                         # Λ (r, 1)
        self.lora_B = nn.Parameter(torch.randn(self.out_features, r, **kw) * 0.02)  # P (out, r)
        self.register_buffer("lora_mask", torch.ones(r, dtype=torch.bool, device=self.weight.device))
        self.merged = False
        self.factors: tuple[torch.Tensor, torch.Tensor] | None = None  # (ΛQ, P), set by batched_factors

    def delta_weight(self) -> torch.Tensor:
        return self.lora_B @ (self.lora_A * self.lora_E) * self.scaling  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = F.linear(x, self.weight, self.bias)  # (..., out)
        if self.merged:
            return base
        # Inside batched_factors the product ΛQ (and P) are views of tensors built once for a
        # whole shape group; otherwise this module makes its own. Same values either way.
        lq, p = self.factors if self.factors is not None else (self.lora_A * self.lora_E, self.lora_B)
        qx = F.linear(self.dropout(x), lq)  # (..., r)
        # W0 x + b + s P (Λ Q x), with "+ s P (.)" done by one addmm (as in LoRALinear): the
        # scaling and the sum happen inside the GEMM, not as two more ops (and their backward).
        rows = base.reshape(-1, base.shape[-1])  # (N, out)
        out = torch.addmm(rows, qx.reshape(rows.shape[0], self.r), p.t(), alpha=self.scaling)  # (N, out)
        return out.view(base.shape)

    @torch.no_grad()
    def merge(self, safe: bool = False, name: str = "") -> None:
        if self.merged:
            return
        new = self.weight + self.delta_weight()
        if safe and not torch.isfinite(new).all():
            raise ValueError(f"merging AdaLoRA into {name or 'a layer'} gives non-finite weights; nothing was merged")
        self.weight.copy_(new)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.sub_(self.delta_weight())
            self.merged = False

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, r={self.r}, ranknum={self.ranknum:g}, "
                f"scaling={self.scaling:.4g}, merged={self.merged}")


def svd_modules(model: nn.Module) -> list[tuple[str, SVDLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SVDLinear)]


def _modules(model: nn.Module, what: str) -> list[tuple[str, SVDLinear]]:
    mods = svd_modules(model)
    if not mods:
        raise ValueError(f"{what}: the model has no AdaLoRA layers (call adalora.apply(model, cfg) first)")
    return mods


def apply(model: nn.Module, cfg: AdaLoRAConfig, *, rank_pattern: dict[str, list[bool]] | None = None) -> list[str]:
    """Swap every target ``nn.Linear`` for an ``SVDLinear`` of rank ``cfg.init_r``; freeze all
    but the adapters and ``cfg.modules_to_save``. Returns the adapted module names.

    ``rank_pattern`` ({module name: kept flags}, as ``rank_pattern(model)`` returns) creates
    each module with only its kept triplets, the shape ``finalize`` leaves (scaling still
    uses init_r), so a finalized adapter loads. It must name exactly the adapted modules.
    """
    if svd_modules(model):
        raise ValueError("model already has AdaLoRA layers; apply AdaLoRA once per model")
    found = find_modules(model, cfg.targets, kind=nn.Linear)
    names = [n for n, _ in found]
    if rank_pattern is not None:
        extra = [k for k in rank_pattern if k not in names]
        missing = [n for n in names if n not in rank_pattern]
        if extra or missing:
            raise ValueError("rank pattern does not fit this model: " + (
                f"it names {extra[0]!r}, which is not an adapted module" if extra else
                f"it has no entry for {missing[0]!r}") + f" (adapted modules: {', '.join(names)})")
    ranks = {}
    for name, m in found:  # validate every layer before changing any
        flags = None if rank_pattern is None else list(rank_pattern[name])
        if flags is not None and not (len(flags) <= cfg.init_r and all(isinstance(f, bool) for f in flags)):
            raise ValueError(f"rank pattern for {name} must be at most init_r={cfg.init_r} booleans, got {flags!r}")
        ranks[name] = cfg.init_r if flags is None else sum(flags)
        if ranks[name] > min(m.in_features, m.out_features):
            raise ValueError(f"AdaLoRA rank {ranks[name]} (init_r={cfg.init_r}) is too large for {name} "
                             f"({m.out_features}x{m.in_features}); it allows at most {min(m.in_features, m.out_features)}")
    freeze_all(model)
    for name, m in found:
        set_submodule(model, name, SVDLinear(m, ranks[name], cfg.alpha, cfg.dropout, ranknum=cfg.init_r).train(m.training))
    for _, m in svd_modules(model):
        for pn, p in m.named_parameters():
            p.requires_grad_(pn.startswith("lora_"))
    if cfg.modules_to_save:
        unfreeze_modules(model, cfg.modules_to_save)
    model.adalora_config = cfg
    return names


def _shape_groups(mods: list[SVDLinear]) -> list[list[int]]:
    """Module indices grouped by (r, in, out): each group's matrices stack into one batched op."""
    groups: dict[tuple, list[int]] = {}
    for i, m in enumerate(mods):
        groups.setdefault((m.r, m.in_features, m.out_features), []).append(i)
    return list(groups.values())


@contextmanager
def batched_factors(model: nn.Module):
    """``with batched_factors(model):`` one forward (and its ``orth_penalty``) with every
    module's factors taken from one stacked tensor per shape group.

    Why: eager training of many small adapters (GPT-2 medium, six projections: 144) is bound
    by how fast the CPU issues ops, not by the GPU. Alone, each module computes Λ * Q (and
    autograd its two gradients), and the penalty's copies of P and Q get their gradients
    added to the forward's: about six small kernels a module. Here those run once per shape
    group: ΛQ = stack(Q) * stack(Λ), and the penalty reuses stack(Q) and stack(P), so P and Q
    each feed autograd once. The values are those of the per-module path.

    One forward per entry (train enters it for every micro-batch): a second forward would
    share autograd nodes with the first, whose backward frees them. With activation
    checkpointing it does nothing: blocks re-run in backward, after it has exited, and must
    then build the same tensors as in the forward, so each module makes its own factors.
    """
    mods = [m for _, m in _modules(model, "batched_factors")]
    if getattr(model, "adalora_stacks", None) is not None:
        raise ValueError("batched_factors is already active on this model")
    if any(getattr(m, "checkpointing", False) for m in model.modules()):
        yield
        return
    stacks = []
    for g in _shape_groups(mods):
        A = torch.stack([mods[i].lora_A for i in g])  # (G, r, in)  = Q
        E = torch.stack([mods[i].lora_E for i in g])  # (G, r, 1)   = Λ
        B = torch.stack([mods[i].lora_B for i in g])  # (G, out, r) = P
        for i, lq, p in zip(g, (A * E).unbind(0), B.unbind(0)):
            mods[i].factors = (lq, p)
        stacks.append((A, B))
    model.adalora_stacks = stacks  # what orth_penalty reads, in _shape_groups order
    try:
        yield
    finally:
        for m in mods:
            m.factors = None
        del model.adalora_stacks


def orth_penalty(model: nn.Module) -> torch.Tensor:
    """R = 1/(2n) sum_k ||P_k^T P_k - I||_F^2 + ||Q_k Q_k^T - I||_F^2, in a few batched ops.

    Every Gram matrix (Q Q^T and P^T P) is r x r, so each shape group gives two bmm's and all
    2n Grams go through one subtract/square/sum: the kernel count does not grow with n. Inside
    ``batched_factors`` the stacks of P and Q are the forward's own.
    """
    mods = [m for _, m in _modules(model, "orth_penalty")]
    stacks = getattr(model, "adalora_stacks", None) or [
        (torch.stack([mods[i].lora_A for i in g]), torch.stack([mods[i].lora_B for i in g]))
        for g in _shape_groups(mods)]  # (G, r, in) = Q, (G, out, r) = P
    by_r: dict[int, list[torch.Tensor]] = {}  # r x r Grams by r: one r for all, unless a rank pattern differs
    for A, B in stacks:
        by_r.setdefault(A.shape[1], []).extend([A @ A.transpose(1, 2), B.transpose(1, 2) @ B])  # (G, r, r)
    terms = [((torch.cat(gs) - torch.eye(r, dtype=gs[0].dtype, device=gs[0].device)) ** 2).sum()
             for r, gs in by_r.items()]
    return sum(terms[1:], terms[0]) / (2 * len(mods))


def rank_pattern(model: nn.Module) -> dict[str, list[bool]]:
    """{module name: kept flag per triplet} — what the allocator last decided."""
    return {n: m.lora_mask.tolist() for n, m in _modules(model, "rank_pattern")}


@torch.no_grad()
def finalize(model: nn.Module) -> dict[str, int]:
    """Shrink every module to its kept triplets (pruned lambda are zeroed first, so outputs
    equal the masked model's). Build a new optimizer afterwards: the adapter Parameters are new."""
    out = {}
    for name, m in _modules(model, "finalize"):
        if m.merged:
            raise ValueError(f"{name} is merged; call adalora.unmerge(model) before finalize")
        keep = m.lora_mask
        m.lora_E.mul_(keep.to(m.lora_E.dtype).unsqueeze(1))
        for pn, t in (("lora_A", m.lora_A[keep]), ("lora_E", m.lora_E[keep]), ("lora_B", m.lora_B[:, keep])):
            setattr(m, pn, nn.Parameter(t.clone(), requires_grad=getattr(m, pn).requires_grad))
        m.r = int(keep.sum())
        m.lora_mask = torch.ones(m.r, dtype=torch.bool, device=keep.device)
        out[name] = m.r
    return out


def merge(model: nn.Module, safe: bool = False) -> list[str]:
    """Fold every update into its base weight: W0 <- W0 + s P Λ Q."""
    mods = _modules(model, "merge")
    for name, m in mods:
        m.merge(safe=safe, name=name)
    return [n for n, _ in mods]


def unmerge(model: nn.Module) -> list[str]:
    """Undo ``merge``: W0 <- W - s P Λ Q."""
    mods = svd_modules(model)
    for _, m in mods:
        m.unmerge()
    return [n for n, _ in mods]


def unload(model: nn.Module) -> nn.Module:
    """Merge, then put plain ``nn.Linear`` modules (holding the merged weights) back in place
    of every ``SVDLinear``. Returns the same model object, now without adapters."""
    return replace_with_linear(model, svd_modules(model), "adalora_config")
