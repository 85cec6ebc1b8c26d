"""AdamW's step, with gradient clipping folded in, for a training step whose host is the bound (a
small model under CUDA graphs, where each step's Python work is its time).

The reference is what the training loop does otherwise:

    clip_grad_norm_(params, max_norm)     # scale every gradient by min(1, max_norm / (norm + 1e-6))
    optimizer.step()                      # torch.optim.AdamW(fused=True)

``optimizer.step()`` gathers, on every call and for every parameter group, the lists its fused
kernel takes (parameters, gradients, both moments, step counts), groups them by device and dtype,
adds 1 to the group's step counts and calls ``torch._fused_adamw_``, once per group. Clipping then
is a separate pass over the gradients. ``Step`` gathers the lists once (the optimizer's state
tensors never move), adds 1 to every group's step counts in one call, and hands each group's
kernel call the clipping as its ``grad_scale``, which the kernel divides each gradient by (and
writes back, as clipping would have):

    counts += 1                                             # one call for every group
    norm = vector_norm(stack(_foreach_norm(grads)))         # as fast.clip computes it
    scale = clamp((norm + 1e-6) / max_norm, min=1)          # divide by >= 1: scale down, never up
    for each group: _fused_adamw_(..., lr, weight_decay, grad_scale=scale)

The state stays the optimizer's own (``optimizer.state``, in torch's layout), so checkpoints,
``state_dict`` and ``load_state_dict`` see nothing new. Dividing by ``(norm + 1e-6) / max_norm``
rounds differently from multiplying by its inverse, so weights agree with the reference to float
rounding, not bit for bit (tests/fast/test_adamw.py).

``torch._fused_adamw_`` and the optimizer's hook dictionaries are private to torch; the tests call
the kernel on the CPU (and CUDA where there is one), so a change of its signature fails them.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.optim.optimizer as torch_optimizer

from minift.fast import clip as fast_clip

_PLAIN = {"amsgrad": False, "maximize": False, "capturable": False, "differentiable": False,
          "decoupled_weight_decay": True}  # (AdamW's group defaults; the last only on newer torch)


def applies(opt: torch.optim.Optimizer) -> bool:
    """Whether ``Step`` can take ``opt``'s steps: a ``torch.optim.AdamW`` with ``fused=True`` and
    plain settings in every group (no amsgrad, maximize, capturable or differentiable; float lr
    and betas), no step hooks (its own or global ones), over plain parameters of one device and
    one dtype of float32, bfloat16 or float16."""
    hooks = (opt._optimizer_step_pre_hooks, opt._optimizer_step_post_hooks,
             getattr(torch_optimizer, "_global_optimizer_pre_hooks", {}),
             getattr(torch_optimizer, "_global_optimizer_post_hooks", {}))
    if type(opt) is not torch.optim.AdamW or any(hooks):
        return False
    groups = opt.param_groups
    plain = all(g.get("fused") and all(g.get(k, v) == v for k, v in _PLAIN.items())
                and not torch.is_tensor(g["lr"]) and not any(torch.is_tensor(b) for b in g["betas"])
                for g in groups)
    params = [p for g in groups for p in g["params"]]
    # (fp64 parameters keep the reference: the kernel's grad_scale is float32, coarser than they are)
    return plain and fast_clip.applies(params) and params[0].dtype in (torch.float32, torch.bfloat16, torch.float16)


class Step:
    """``step(max_grad_norm)``: clip (None: do not) and update every parameter of ``opt``, as
    ``clip_grad_norm_`` then ``opt.step()`` would. ``applies(opt)`` must hold when it is built.

    It takes the reference step (``reference_step``) for a step where some parameter has no
    gradient (frozen for now, or unused). The lists are gathered again after ``load_state_dict``
    (it replaces the state and the groups) and ``add_param_group``; if ``applies(opt)`` then no
    longer holds, or a parameter's step count is not a float32 tensor on its device (a loaded state
    can bring other settings and a CPU count), every step until the next gathering is the reference's."""

    def __init__(self, opt: torch.optim.AdamW):
        self.opt, self.state, self.lean = opt, None, True
        self.lean_steps = 0  # the steps taken on the lean path (the others took the reference step)
        self.lists: list[tuple[dict, list, list, list, list]] = []  # per group: (group, params, m, v, steps)
        self.params: list[torch.Tensor] = []  # every group's parameters, in order
        self.all_steps: list[torch.Tensor] = []  # every parameter's step count

    def _gather(self) -> None:
        """Each group's parameters, moments and step counts, from the optimizer's state; whether
        the lean step still applies."""
        self.lists = []
        for g in self.opt.param_groups:
            ps, m, v, steps = [], [], [], []
            for p in g["params"]:
                s = self.opt.state[p]
                if not s:  # as AdamW(fused=True) starts a parameter's state
                    s["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    s["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    s["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                ps.append(p)
                m.append(s["exp_avg"])
                v.append(s["exp_avg_sq"])
                steps.append(s["step"])
            self.lists.append((g, ps, m, v, steps))
        self.all_steps = [t for *_, steps in self.lists for t in steps]
        self.params = [p for _, ps, *_ in self.lists for p in ps]
        self.state = self.opt.state
        self.lean = applies(self.opt) and all(
            torch.is_tensor(t) and t.dtype == torch.float32 and t.device == p.device
            for p, t in zip(self.params, self.all_steps))

    def step(self, max_grad_norm: float | None) -> None:
        """One step of every parameter of ``opt``: clipping (unless None), then AdamW."""
        # the first step, a loaded state (new state and groups) or an added group: gather the lists again
        stale = self.state is not self.opt.state or len(self.lists) != len(self.opt.param_groups)
        params = [p for g in self.opt.param_groups for p in g["params"]] if stale else self.params
        grads = [p.grad for p in params]
        missing = any(g is None for g in grads)  # (then no state starts here: AdamW starts it with the first gradient)
        if stale and not missing:
            self._gather()
        if missing or not self.lean:
            return reference_step(self.opt, params, max_grad_norm, fast_clip.chosen(params, True))
        scale = None
        if max_grad_norm is not None:
            norm = fast_clip.global_norm(grads)
            # the kernel reads grad_scale as float32, whatever the parameters' dtype
            scale = torch.clamp((norm.float() + 1e-6) / max_grad_norm, min=1.0)
        torch._foreach_add_(self.all_steps, 1)
        self.lean_steps += 1
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


def chosen(opt: torch.optim.Optimizer, fast: bool) -> Callable[[float | None], None]:
    """The clipping and optimizer step a run takes over every parameter of ``opt``, as
    ``update(max_grad_norm)``: ``Step`` with ``fast`` on CUDA where it ``applies``; otherwise
    ``reference_step`` with ``fast.clip``'s choice of clipping."""
    params = [p for g in opt.param_groups for p in g["params"]]
    if fast and params and params[0].device.type == "cuda" and applies(opt):
        return Step(opt).step
    clip = fast_clip.chosen(params, fast)
    return lambda max_grad_norm: reference_step(opt, params, max_grad_norm, clip)
