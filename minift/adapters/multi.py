"""Files of a model's named adapters (``minift.methods.multi_lora``): one directory per adapter.

    DIR/<name>/adapter_config.json + adapter_model.safetensors     (layout="peft", the default)
    DIR/<name>/minift_adapter.json + adapter.safetensors            (layout="minift")

PEFT keeps a multi-adapter model the same way: ``save_pretrained`` writes its adapter named
"default" at the top of the directory and every other adapter in a subdirectory of its name, so
``PeftModel.from_pretrained(model, "DIR/<name>", adapter_name="<name>")`` loads what
``save_adapters`` writes, and ``load_adapters`` reads PEFT's directory (the top-level adapter
as "default"). Each adapter's files are those of a single-adapter model: for each named adapter
the model is shown to ``save_adapter`` / ``load_adapter`` as a plain LoRA model (its
``MultiLoRALinear`` layers swapped, for the call, for ``LoRALinear`` / ``nn.Linear`` views that
share the same Parameters), so the name mapping and file checks of ``adapters/lora.py`` are used
as they are. An adapter with modules to save (its own classification head, ``ModulesToSave``)
writes its copy under the module's name, as a single-adapter model with that head would, and
``load_adapters`` reads such a directory back into a copy of the adapter's own (a linear head of
another width, for another label count, gets a new layer of the file's shape); the base's module
is never written.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import torch.nn as nn

from minift.adapters import load_adapter, save_adapter
from minift.adapters.io import LAYOUTS, adapter_files, read_adapter
from minift.adapters.lora import lora_config_of
from minift.files import InputError
from minift.methods import lora
from minift.methods.common import set_submodule
from minift.methods.multi_lora import (ModulesToSave, MultiLoRALinear, add_module_copy, adapter_names,
                                      drop_module_copies, multi_lora_modules, saved_modules)

__all__ = ["save_adapters", "load_adapters", "as_single", "lora_config_as"]


def save_adapters(model: nn.Module, path, *, layout: str = "peft") -> list[Path]:
    """Write every named adapter of ``model`` to ``path/<name>``; returns those directories."""
    names = adapter_names(model)
    if not names:
        raise ValueError(f"{type(model).__name__} has no named adapters (minift.methods.multi_lora.add_adapter)")
    out = []
    for name in names:
        heads = tuple(n for n, m in saved_modules(model) if name in m.copies)  # its modules to save
        with as_single(model, name):
            # the single-adapter view's config names them, so that save_adapter writes them
            cfg = replace(lora_config_of(model, lora.lora_modules(model)), modules_to_save=heads) if heads else None
            with lora_config_as(model, cfg):
                save_adapter(model, Path(path) / name, layout=layout)
        out.append(Path(path) / name)
    return out


def load_adapters(model: nn.Module, path, names: list[str] | None = None) -> list[str]:
    """Add the adapters stored under directory ``path`` to ``model`` as named adapters.

    Each subdirectory holding a LoRA adapter (either layout) is one adapter, named after it; an
    adapter at the top of ``path`` (PEFT's "default") is named "default". ``names`` picks some.
    ``path`` may instead map names to adapter directories, each loaded under its name (runs'
    ``adapter/`` directories: ``{"sentiment": "runs/many/sentiment/adapter", ...}``).
    Returns the names added, in order. An adapter's modules to save (a classification head) load
    into copies of its own (``ModulesToSave``). A name the model already has, a file that is not
    LoRA (DoRA, AdaLoRA, prefix or prompt) or a bad file is an error (InputError naming the file,
    or ValueError); adapters added before the error stay, the failing one leaves nothing.
    """
    if isinstance(path, Mapping):
        if not path:
            raise ValueError("load_adapters: the mapping names no adapter")
        found = {str(n): Path(d) for n, d in path.items()}
        bad = next((d for d in found.values() if not _is_adapter_dir(d)), None)
        if bad is not None:
            raise InputError(f"{bad}: not an adapter directory (no adapter_config.json or minift_adapter.json)")
        odd = next((n for n in found if not n.isidentifier()), None)
        if odd is not None:
            raise ValueError(f"adapter name {odd!r} must be a plain identifier (letters, digits, _)")
        path = ", ".join(map(str, found.values()))
    else:
        path = Path(path)
        found = {"default": path} if _is_adapter_dir(path) else {}
        if path.is_dir():
            found.update({d.name: d for d in sorted(path.iterdir()) if d.is_dir() and _is_adapter_dir(d)})
    if not found:
        raise InputError(f"{path}: no adapter directory in it (adapter_config.json or minift_adapter.json, "
                         f"at the top or in subdirectories named after the adapters)")
    if names is not None:
        missing = [n for n in names if n not in found]
        if missing:
            raise InputError(f"{path}: no adapter named {missing[0]!r}; it has {', '.join(found)}")
        found = {n: found[n] for n in names}
    taken = [n for n in found if n in adapter_names(model)]
    if taken:
        raise ValueError(f"the model already has an adapter named {taken[0]!r}")
    for name, d in found.items():
        _load_one(model, name, d)
    return list(found)


def _is_adapter_dir(d: Path) -> bool:
    return any(adapter_files(d, layout)[0].is_file() for layout in LAYOUTS)


def _load_one(model: nn.Module, name: str, d: Path) -> None:
    _, config, tensors = read_adapter(d)
    inner = _inner(config)
    if config.get("peft_type") != "LORA" or config.get("use_dora") or inner.get("dora"):  # before anything loads
        raise ValueError(f"{d}: a named adapter must be plain LoRA, not {config.get('peft_type')}"
                         f"{' with DoRA' if config.get('use_dora') or inner.get('dora') else ''}")
    had = model.__dict__.pop("lora_config", None)  # load_adapter sets one; save_adapters must not find it after
    try:
        heads = _head_copies(model, name, _modules_to_save(config), tensors)  # the copies its head loads into
        # the adapted layers plain nn.Linear views (the adapter has no factors yet), its modules to save its copies
        with as_single(model, name):
            load_adapter(model, d)
            layers = lora.lora_modules(model)
            odd = [n for n, p in model.named_parameters()
                   if p.requires_grad and "lora_" not in n and not any(n.startswith(h + ".") for h in heads)]
            loaded = {n: m for n, m in layers}
            for n, m in layers:  # the LoRALinear layers become plain again; their factors move below
                set_submodule(model, n, _linear(m))
            if odd or not layers:
                raise ValueError(f"{d}: a named adapter must be plain LoRA (it trains {odd[0] if odd else 'no layer'})")
    except BaseException:
        drop_module_copies(model, name)
        raise
    finally:
        model.__dict__.pop("lora_config", None)
        if had is not None:
            model.lora_config = had
    for n, m in loaded.items():
        multi = model.get_submodule(n)
        if not isinstance(multi, MultiLoRALinear):
            multi = MultiLoRALinear(multi)
            set_submodule(model, n, multi)
        multi.lora_A[name], multi.lora_B[name] = m.lora_A, m.lora_B
        multi.dropout[name] = m.dropout.train(multi.training)  # in the mode the model is in (eval: no dropout)
        multi.scaling[name], multi.settings[name] = m.scaling, (m.alpha, m.rslora)


def _inner(config: dict) -> dict:
    """A minift-layout adapter config's recorded settings (its ``config`` object); {} for PEFT's."""
    return config["config"] if isinstance(config.get("config"), dict) else {}


def _modules_to_save(config: dict) -> list[str]:
    """The modules to save an adapter config names: PEFT's at its top level, minift's in ``config``."""
    found = config.get("modules_to_save") or _inner(config).get("modules_to_save")
    return [str(t) for t in found] if isinstance(found, list) else []


def _head_copies(model: nn.Module, name: str, saved: list[str], tensors: dict) -> list[str]:
    """Give adapter ``name`` a copy of each module ``saved`` names (matched as ``add_adapter``
    matches them), for its file's weights to load into; returns those modules' names. A linear
    module whose weight in the file has another shape (a head for another label count) gets a new
    linear layer of that shape; any other copy is the original's and must match the file."""
    hits = [n for t in dict.fromkeys(saved) for n, _ in model.named_modules()
            if (n == t or n.endswith("." + t)) and "copies." not in n and ".original" not in n]
    for n in hits:
        m = model.get_submodule(n)
        original = m.original if isinstance(m, ModulesToSave) else m
        shape = next((tuple(t.shape) for k, t in tensors.items() if k == f"{n}.weight" or k.endswith(f".{n}.weight")),
                     None)
        new = None
        if isinstance(original, nn.Linear) and shape is not None and len(shape) == 2 \
                and shape != tuple(original.weight.shape):
            w = original.weight  # built on meta (no init drawn from torch's RNG), storage allocated after
            new = nn.Linear(shape[1], shape[0], bias=original.bias is not None, device="meta", dtype=w.dtype)
            new = new.to_empty(device=w.device)
        add_module_copy(model, n, name, new)
    return hits


@contextlib.contextmanager
def as_single(model: nn.Module, name: str | None):
    """Within the ``with``, every ``MultiLoRALinear`` of ``model`` is a ``LoRALinear`` holding
    adapter ``name``'s own Parameters (layers without it, or ``name`` None: an ``nn.Linear``) and
    every ``ModulesToSave`` is the adapter's copy (else the original), under the module's own name;
    afterwards the multi-adapter layers are back as they were."""
    swapped = multi_lora_modules(model) + saved_modules(model)
    try:
        for n, m in swapped:
            if isinstance(m, ModulesToSave):
                set_submodule(model, n, m.module_for(name))
            else:
                set_submodule(model, n, _view(m, name) if name in m.lora_A else _linear(m))
        yield model
    finally:
        for n, m in swapped:
            set_submodule(model, n, m)


@contextlib.contextmanager
def lora_config_as(model: nn.Module, cfg: lora.LoRAConfig | None):
    """Within the ``with``, ``model.lora_config`` is ``cfg`` (None: left as it is); afterwards as it was."""
    if cfg is None:
        yield model
        return
    had = model.__dict__.get("lora_config")
    model.lora_config = cfg
    try:
        yield model
    finally:
        if had is None:
            del model.lora_config
        else:
            model.lora_config = had


def _linear(m, meta: bool = False) -> nn.Linear:
    """An nn.Linear holding ``m``'s own weight and bias Parameters (nothing copied); ``meta``:
    one with no storage, for a constructor to read shapes from."""
    lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta").train(m.training)
    if not meta:
        lin.weight, lin.bias = m.weight, m.bias
    return lin


def _view(m: MultiLoRALinear, name: str) -> lora.LoRALinear:
    """A LoRALinear holding adapter ``name``'s Parameters of ``m`` (nothing copied)."""
    A, B = m.lora_A[name], m.lora_B[name]
    alpha, rslora = m.settings[name]
    view = lora.LoRALinear(_linear(m, meta=True), A.shape[0], alpha, rslora=rslora)  # meta: no init drawn
    view.weight, view.bias = m.weight, m.bias
    view.lora_A, view.lora_B, view.dropout, view.scaling = A, B, m.dropout[name], m.scaling[name]
    return view.train(m.training)
