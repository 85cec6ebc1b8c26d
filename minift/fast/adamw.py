"""AdamW's step, with gradient clipping folded in, for a training step whose host is the bound (a
small model under CUDA graphs, where each step's Python work is its time).

The reference is what the training loop does otherwise:

    clip_grad_norm_(params, max_norm)     # scale every gradient by min(1, max_norm / (norm + 1e-6))
    optimizer.step()                      # torch.optim.AdamW(fused=True)

``optimizer.step()`` gathers, on every call and for every parameter group, the lists its one
fused kernel takes (parameters, gradients, both moments, step counts), groups them by device and
dtype, adds 1 to the step counts and calls ``torch._fused_adamw_``. Clipping then is a separate
pass over the gradients. ``Step`` gathers the lists once (the optimizer's state tensors never move),
adds 1 to every group's step counts in one call, and hands the kernel the clipping as its
``grad_scale``, which it divides each gradient by (and writes back, as clipping would have):

    counts += 1                                             # one call for every group
    norm = vector_norm(stack(_foreach_norm(grads)))         # as fast.clip computes it
    scale = clamp((norm + 1e-6) / max_norm, min=1)          # divide by >= 1: scale down, never up
    for each group: _fused_adamw_(..., lr, weight_decay, grad_scale=scale)

The state stays the optimizer's own (``optimizer.state``, in torch's layout), so checkpoints,
``state_dict`` and ``load_state_dict`` see nothing new. Dividing by ``(norm + 1e-6) / max_norm``
rounds differently from multiplying by its inverse, so weights agree with the reference to float
rounding, not bit for bit (tests/fast/test_adamw.py).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from minift.fast import clip as fast_clip

_PLAIN = {"amsgrad": False, "maximize": False, "capturable": False, "differentiable": False,
          "decoupled_weight_decay": True}  # (AdamW's group defaults; the last only on newer torch)


def applies(opt: torch.optim.Optimizer) -> bool:
    """Whether ``Step`` can take ``opt``'s steps: a ``torch.optim.AdamW`` with ``fused=True`` and
    plain settings in every group (no amsgrad, maximize, capturable or differentiable; float lr
    and betas), no step hooks, over plain parameters of one device and floating dtype."""
    if type(opt) is not torch.optim.AdamW or opt._optimizer_step_pre_hooks or opt._optimizer_step_post_hooks:
        return False
    groups = opt.param_groups
    plain = all(g.get("fused") and all(g.get(k, v) == v for k, v in _PLAIN.items())
                and not torch.is_tensor(g["lr"]) and not any(torch.is_tensor(b) for b in g["betas"])
                for g in groups)
    return plain and fast_clip.applies([p for g in groups for p in g["params"]])


class Step:
    """``step(max_grad_norm)``: clip (None: do not) and update every parameter of ``opt``, as
    ``clip_grad_norm_`` then ``opt.step()`` would. ``applies(opt)`` must hold. A step where some
    parameter has no gradient (frozen for now, or unused) takes the reference path. The lists are
    gathered again after ``opt.load_state_dict`` (it replaces the state and the groups) and
    ``opt.add_param_group``."""

    def __init__(self, opt: torch.optim.AdamW):
        self.opt, self.lists, self.state, self.params = opt, [], None, []

    def _gather(self) -> None:
        """Each group's parameters, moments and step counts, from the optimizer's state."""
        self.lists = []
        for g in self.opt.param_groups:
            ps, m, v, steps = [], [], [], []
            for p in g["params"]:
                s = self.opt.state[p]
                if not s:  # as AdamW(fused=True) starts a parameter's state
                    s["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    s["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    s["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                ps.append(p), m.append(s["exp_avg"]), v.append(s["exp_avg_sq"]), steps.append(s["step"])
            self.lists.append((g, ps, m, v, steps))
        self.all_steps = [t for *_, steps in self.lists for t in steps]
        self.params = [p for _, ps, *_ in self.lists for p in ps]
        self.state = self.opt.state

    def step(self, max_grad_norm: float | None) -> None:
        # the first step, a loaded state (new state and groups) or an added group: gather the lists again
        stale = self.state is not self.opt.state or len(self.lists) != len(self.opt.param_groups)
        params = [p for g in self.opt.param_groups for p in g["params"]] if stale else self.params
        grads = [p.grad for p in params]
        if any(g is None for g in grads):  # (no state started here: AdamW starts it with the first gradient)
            return reference_step(self.opt, params, max_grad_norm, fast_clip.clip_grad_norm_)
        if stale:
            self._gather()
        scale = None
        if max_grad_norm is not None:
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            scale = torch.clamp((norm + 1e-6) / max_grad_norm, min=1.0)
        torch._foreach_add_(self.all_steps, 1)
        at = 0
        for g, ps, m, v, steps in self.lists:
            if not ps:
                continue
            beta1, beta2 = g["betas"]
            torch._fused_adamw_(ps, grads[at:at + len(ps)], m, v, [], steps, lr=g["lr"], beta1=beta1, beta2=beta2,
                                weight_decay=g["weight_decay"], eps=g["eps"], amsgrad=False, maximize=False,
                                grad_scale=scale, found_inf=None)
            at += len(ps)


def reference_step(opt: torch.optim.Optimizer, params: Sequence[torch.Tensor], max_grad_norm: float | None,
                   clip=torch.nn.utils.clip_grad_norm_) -> None:
    """The reference: ``clip(params, max_grad_norm)`` (unless None), then ``opt.step()``."""
    if max_grad_norm is not None:
        clip(params, max_grad_norm)
    opt.step()


def chosen(opt: torch.optim.Optimizer, fast: bool) -> Callable[[Sequence[torch.Tensor], float | None], None]:
    """The clipping and optimizer step a run takes, as ``update(params, max_grad_norm)``: ``Step``
    with ``fast`` on CUDA where it ``applies``; otherwise ``reference_step`` with ``fast.clip``'s
    choice of clipping (``params``: every parameter of ``opt``, as ``clip_grad_norm_`` takes them)."""
    params = [p for g in opt.param_groups for p in g["params"]]
    if fast and params and params[0].device.type == "cuda" and applies(opt):
        lean = Step(opt)
        return lambda params, max_grad_norm: lean.step(max_grad_norm)
    clip = fast_clip.chosen(params, fast)
    return lambda params, max_grad_norm: reference_step(opt, params, max_grad_norm, clip)
