"""AdaLoRA's rank allocator: importance scores, and pruning to the budget of the schedule.

The equations are in ``adalora.py``'s docstring; in short, after every optimizer step

    I = |w * dL/dw|,   I_bar <- b1 I_bar + (1 - b1) I,   U_bar <- b2 U_bar + (1 - b2) |I - I_bar|
    S_i = s(lambda_i) + mean_j s(P_ji) + mean_j s(Q_ij)       with s = I_bar * U_bar

and at the steps ``prunes_at`` names, every triplet but the ``budget(t)`` highest-scored
(over all modules) gets lambda_i <- 0. Its own file because it is its own concept: the
layer (``adalora.py``) works without it; the allocator reads the layers' gradients and
writes only their Λ and masks.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from minift.methods.adalora import AdaLoRAConfig, _modules, _shape_groups, budget, prunes_at


class RankAllocator:
    """Scores every triplet and prunes to the budget. Call ``step(model, global_step)`` once
    per optimizer step, after ``optimizer.step()`` and before ``zero_grad()``.

    All work is batched: the EMAs are ``torch._foreach_*`` ops over every adapter tensor, the
    triplet scores of one shape group are one stacked reduction, and one stable sort over all
    scores concatenated picks what to prune. Nothing reads a tensor value back to Python.

    Ties: exactly b(t) triplets stay live. Among equal scores, the triplet earlier in module
    order (then index order) is pruned first. (PEFT prunes every score <= the k-th smallest,
    so with ties at that threshold it keeps fewer; with distinct scores the two agree.)
    """

    def __init__(self, model: nn.Module, cfg: AdaLoRAConfig):
        named = _modules(model, "RankAllocator")
        self.cfg, self.names, self.mods = cfg, [n for n, _ in named], [m for _, m in named]
        for n, m in named:
            if m.r != cfg.init_r:
                raise ValueError(f"RankAllocator needs every AdaLoRA layer at init_r={cfg.init_r}; {n} has r={m.r} "
                                 f"(a finalized adapter has no pruned triplets left to allocate)")
        self.init_bgt, self.target_bgt = cfg.init_r * len(self.mods), cfg.target_r * len(self.mods)
        self.budget = self.init_bgt  # the budget of the last step, in live singular values
        self.groups = _shape_groups(self.mods)
        order = [i for g in self.groups for i in g]  # triplet scores come out group by group
        pos = torch.arange(len(self.mods) * cfg.init_r).view(len(self.mods), cfg.init_r)  # (n, r)
        self._to_module_order = torch.empty_like(pos).index_copy_(0, torch.tensor(order), pos).flatten()
        self.ipt_ema: list[torch.Tensor] | None = None  # per tensor of _params(), created at the first step
        self.unc_ema: list[torch.Tensor] | None = None

    def _params(self) -> list[nn.Parameter]:
        return [p for m in self.mods for p in (m.lora_A, m.lora_E, m.lora_B)]  # A, E, B of module 0, 1, ...

    def reset_ipt(self) -> None:
        self.ipt_ema = self.unc_ema = None

    @torch.no_grad()
    def update_ipt(self) -> None:
        ps = self._params()
        for i, p in enumerate(ps):
            if p.grad is None:
                name = f"{self.names[i // 3]}.{('lora_A', 'lora_E', 'lora_B')[i % 3]}"
                raise ValueError(f"RankAllocator.step needs gradients but {name} has none: call it after "
                                 f"loss.backward() and before optimizer.zero_grad()")
        if self.ipt_ema is None:
            self.ipt_ema = [torch.zeros_like(p) for p in ps]
            self.unc_ema = [torch.zeros_like(p) for p in ps]
        b1, b2 = self.cfg.beta1, self.cfg.beta2
        ipt = torch._foreach_mul(ps, [p.grad for p in ps])  # I = |w * grad|
        torch._foreach_abs_(ipt)
        torch._foreach_mul_(self.ipt_ema, b1)  # I_bar = b1 I_bar + (1 - b1) I
        torch._foreach_add_(self.ipt_ema, torch._foreach_mul(ipt, 1 - b1))
        dev = torch._foreach_sub(ipt, self.ipt_ema)  # U_bar = b2 U_bar + (1 - b2) |I - I_bar|
        torch._foreach_abs_(dev)
        torch._foreach_mul_(dev, 1 - b2)
        torch._foreach_mul_(self.unc_ema, b2)
        torch._foreach_add_(self.unc_ema, dev)

    @torch.no_grad()
    def triplet_scores(self) -> torch.Tensor:
        """S for every triplet, flat in module order: (n_modules * init_r,)."""
        if self.ipt_ema is None:
            raise ValueError("RankAllocator has no scores yet: step() must run on gradients first")
        s = torch._foreach_mul(self.ipt_ema, self.unc_ema)  # s(w) = I_bar * U_bar, per tensor
        out = []
        for g in self.groups:
            sA = torch.stack([s[3 * i] for i in g]).mean(dim=2)      # (G, r, in) -> (G, r)
            sE = torch.stack([s[3 * i + 1] for i in g]).squeeze(2)   # (G, r, 1) -> (G, r)
            sB = torch.stack([s[3 * i + 2] for i in g]).mean(dim=1)  # (G, out, r) -> (G, r)
            out.append((sE + (sA + sB)).flatten())
        if self._to_module_order.device != out[0].device:  # moved once, not copied every step
            self._to_module_order = self._to_module_order.to(out[0].device)
        return torch.cat(out)[self._to_module_order]

    @torch.no_grad()
    def mask_to_budget(self, b: int) -> None:
        """Keep the b highest-scored triplets over all modules; zero lambda of the rest."""
        scores = self.triplet_scores()
        keep = torch.ones_like(scores, dtype=torch.bool)
        k = self.init_bgt - b
        if k > 0:
            keep[torch.sort(scores, stable=True).indices[:k]] = False  # one threshold over all modules
        masks = list(keep.view(len(self.mods), -1))  # (n, r) -> n rows
        torch._foreach_copy_([m.lora_mask for m in self.mods], masks)
        self.apply_masks()

    @torch.no_grad()
    def apply_masks(self) -> None:
        """lambda_i <- 0 for every pruned triplet: one stack and one cast for all the masks."""
        Es = [m.lora_E for m in self.mods]
        masks = torch.stack([m.lora_mask for m in self.mods]).to(Es[0].dtype).unsqueeze(2)  # (n, r, 1)
        torch._foreach_mul_(Es, list(masks.unbind(0)))

    def step(self, model: nn.Module, global_step: int) -> int:
        """One allocator step (PEFT's ``update_and_allocate``); returns the budget now in force."""
        cfg, end = self.cfg, self.cfg.total_step - self.cfg.tfinal
        if any(m.r != cfg.init_r for m in self.mods):  # Python ints: no tensor is read
            raise ValueError("the model was finalized (its layers shrunk to their kept ranks); "
                             "the allocator has nothing left to prune")
        if global_step > end:  # final phase: the fixed pattern, re-applied after every update
            self.apply_masks()
            self.budget = self.target_bgt
            return self.budget
        if global_step < end:
            self.update_ipt()
        self.budget = budget(cfg, global_step, len(self.mods))
        if prunes_at(cfg, global_step):
            self.mask_to_budget(self.budget)
        if global_step == end:
            self.reset_ipt()
        return self.budget

    def state_dict(self) -> dict:
        ema = {} if self.ipt_ema is None else {
            "ipt": {str(i): t for i, t in enumerate(self.ipt_ema)},
            "unc": {str(i): t for i, t in enumerate(self.unc_ema)}}
        return {"budget": self.budget, **ema}

    def load_state_dict(self, state: dict) -> None:
        self.budget = int(state["budget"])
        if "ipt" not in state:
            self.reset_ipt()
            return
        ps = self._params()
        if len(state["ipt"]) != len(ps):
            raise ValueError(f"allocator state has {len(state['ipt'])} tensors, this model's AdaLoRA has {len(ps)}")
        self.ipt_ema = [state["ipt"][str(i)].to(p.device, p.dtype) for i, p in enumerate(ps)]
        self.unc_ema = [state["unc"][str(i)].to(p.device, p.dtype) for i, p in enumerate(ps)]
