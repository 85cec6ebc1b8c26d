"""Small helpers every method shares: find target modules, freeze, count parameters, copy to a device."""
from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
import torch.nn as nn


def find_modules(model: nn.Module, targets: Iterable[str], kind: type | tuple = nn.Linear
                 ) -> list[tuple[str, nn.Module]]:
    """Modules of type ``kind`` whose name is a target or ends in ``.<target>``.

    Exact last-name matching: target ``v_proj`` matches ``layers.0.attn.v_proj``, never
    ``layers.0.attn.v_proj_extra``. A target that matches nothing is an error listing the
    names that exist, so a typo never silently trains nothing.
    """
    targets = list(targets)
    if not targets:
        raise ValueError("targets is empty: name at least one module, e.g. q_proj,v_proj")
    found, hit = [], set()
    for name, m in model.named_modules():
        if not isinstance(m, kind):
            continue
        for t in targets:
            if name == t or name.endswith("." + t):
                found.append((name, m))
                hit.add(t)
                break
    missing = [t for t in targets if t not in hit]
    if missing:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, kind)})
        raise ValueError(f"target {missing[0]!r} matches no {getattr(kind, '__name__', 'module')} in the "
                         f"model; available names: {', '.join(names)}")
    return found


def host_to_device(t: torch.Tensor, device) -> torch.Tensor:
    """``t`` on ``device``; a CPU tensor (a batch, row indices) goes to a GPU from pinned memory, so
    that the host need not wait for the GPU's queue to drain (a copy from pageable memory may)."""
    if device is not None and torch.device(device).type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def replace_with_linear(model: nn.Module, mods: list[tuple[str, nn.Module]], config_attr: str) -> nn.Module:
    """Merge each adapted layer in ``mods`` and put a plain ``nn.Linear`` holding the merged
    weight (the same Parameter objects) back in its place; forget ``model.<config_attr>``.
    Every adapted layer must have ``merge()``, ``in_features``, ``out_features``, ``weight``, ``bias``."""
    for name, m in mods:
        m.merge()
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None,
                        device=m.weight.device, dtype=m.weight.dtype)
        lin.weight, lin.bias = m.weight, m.bias
        set_submodule(model, name, lin)
    if hasattr(model, config_attr):
        delattr(model, config_attr)
    return model


def freeze_all(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def unfreeze_modules(model: nn.Module, names: Iterable[str]) -> list[str]:
    """Make the modules named in ``names`` (exact last-name match, any type) trainable."""
    out = []
    for name, m in find_modules(model, names, kind=nn.Module):
        for pn, p in m.named_parameters():
            p.requires_grad_(True)
            out.append(f"{name}.{pn}")
    return out


def check_virtual_tokens(cfg) -> None:
    """Shared by PrefixConfig and PromptConfig: ``modules_to_save`` as a tuple (a single name
    allowed) and ``num_virtual_tokens`` an integer >= 1."""
    cfg.modules_to_save = ((cfg.modules_to_save,) if isinstance(cfg.modules_to_save, str)
                           else tuple(cfg.modules_to_save))
    P = cfg.num_virtual_tokens
    if isinstance(P, bool) or not isinstance(P, int) or P < 1:
        raise ValueError(f"{type(cfg).__name__}.num_virtual_tokens must be an integer >= 1, got {P!r}")


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) parameters count once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def summary(model: nn.Module) -> str:
    t, n = count_trainable(model)
    return f"trainable params: {t:,} || all params: {n:,} || trainable%: {100 * t / max(n, 1):.4f}"


# The modules prefix and prompt tuning attach, and the forward arguments that carry what each
# supplies (a soft prompt's embeddings, or, while generating, the KV cache that already holds it).
_INPUT_HOOKS = {"prefix_encoder": ("prefix",), "soft_prompt": ("inputs_embeds", "prefix")}


def _require_method_inputs(model: nn.Module, args, kwargs):
    """Forward pre-hook: a model with a prefix encoder or soft prompt attached, called without
    the input that module provides, would silently compute the base model. Refuse instead."""
    if getattr(model, "_base_model_only", False):
        return
    for attr, carriers in _INPUT_HOOKS.items():
        if getattr(model, attr, None) is not None and all(kwargs.get(a) is None for a in carriers):
            raise ValueError(f"this model has a {attr} attached, and calling it without {carriers[0]}= would "
                             f"ignore it: run minift.training.forward.model_forward(model, batch), which applies it")


def require_method_inputs(model: nn.Module) -> None:
    """Make ``model(...)`` refuse to run without the ``prefix`` / ``inputs_embeds`` its attached
    prefix encoder or soft prompt supplies (``model_forward`` supplies them). Registered once."""
    if not any(h is _require_method_inputs for h in model._forward_pre_hooks.values()):
        model.register_forward_pre_hook(_require_method_inputs, with_kwargs=True)


@contextlib.contextmanager
def base_model_only(model: nn.Module):
    """Within this block ``model(...)`` runs the base model even with a prefix encoder or soft
    prompt attached: for computing the activations a prefix is initialized from, on purpose."""
    model._base_model_only = True
    try:
        yield model
    finally:
        del model._base_model_only
