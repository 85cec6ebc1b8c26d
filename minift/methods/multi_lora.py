"""Many LoRA adapters on one frozen base: named adapters, switching, and mixed batches.

LoRA's promise is cheap task switching: the base W0 is shared, each task owns only its A and B.
Here one layer holds any number of named adapters, each with its own rank, alpha and dropout
(and each adapter chooses its own target layers):

    h = W0 x + b + s_k B_k A_k x          for the adapter k the example uses (none: base only)

    x ──► [ W0 (frozen, shared) ] ─────────────────────────┐
    │                                                       (+) ──► h
    └─► rows of adapter "sst2" ─► A_sst2 ─► B_sst2 (x s) ──┤
    └─► rows of adapter "imdb" ─► A_imdb ─► B_imdb (x s) ──┘

- **Switching** (``set_active``) changes which adapter every row uses: a name, no weight moves, no
  copy of the base. Switching to another adapter and back gives bit-identical outputs.
- **Mixed batches** (``with mixed_batch(model, names):``): each example of the batch names its
  adapter (or None: the base alone). The base GEMM runs once for the whole batch; the batch is
  then segmented by adapter, and each adapter's update is computed on its own rows only and
  added there (``index_add``). Every example gets exactly what it would get alone with its
  adapter active (in eval mode or without dropout: in training, dropout draws its masks per call) (tests/methods/test_multi_lora.py checks that), and generation with a KV cache
  works inside the same ``with``: the rows keep their adapters step after step.
- **Merging** one adapter (``merge_adapter``) folds s B A into W0 for inference at base cost;
  the other adapters stay usable only after ``unmerge_adapter`` (a mixed batch refuses to run
  while one is merged, as its rows would all see the merged update).

- **Modules to save** (a classification head, trained in full): each adapter that names the
  module in ``modules_to_save`` gets its own copy (``ModulesToSave``, PEFT's ModulesToSaveWrapper),
  which its rows go through; the original (frozen with the base) serves every other row. Copies may
  differ in output width (tasks with other label counts): in a mixed batch a narrower copy's rows
  are padded with -inf on the right, which leaves their softmax, and a loss over their own labels,
  as they are.

A layer stores its adapters as ``lora_A.<name>`` (r, in) and ``lora_B.<name>`` (out, r), the
names PEFT uses for its multi-adapter models. Every adapter starts as ``LoRALinear`` does (A
Kaiming-uniform, B zero), so adding one changes no output until it trains.
"""
from __future__ import annotations

import contextlib
import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from minift.methods.common import find_modules, host_to_device, set_submodule
from minift.methods.lora import LoRAConfig, lora_scaling

__all__ = ["MultiLoRALinear", "ModulesToSave", "add_adapter", "set_active", "delete_adapter", "adapter_names", "merge_adapter",
           "unmerge_adapter", "mixed_batch", "multi_lora_modules"]


class MultiLoRALinear(nn.Module):
    """An ``nn.Linear`` (frozen; its Parameters and state-dict keys kept) with named LoRA adapters."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        self.dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.settings: dict[str, tuple[float, bool]] = {}     # name -> (alpha, rslora), for its files
        self.active: str | None = None                          # the adapter of every row
        self.rows: dict[str, torch.Tensor] | None = None        # mixed batch: adapter -> its row indices
        self.row_names: list[str | None] | None = None          # mixed batch: each row's adapter, as given
        self.merged: str | None = None                          # the adapter folded into W0, if any
        self.train(base.training)  # in the mode the model is in (its adapters' dropout too)

    def add(self, name: str, cfg: LoRAConfig) -> None:
        if not 1 <= cfg.r <= min(self.in_features, self.out_features):
            raise ValueError(f"rank r={cfg.r} does not fit a {self.out_features}x{self.in_features} layer")
        w = self.weight
        A = torch.empty(cfg.r, self.in_features, dtype=w.dtype, device=w.device)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        self.lora_A[name] = nn.Parameter(A)                                                          # (r, in)
        self.lora_B[name] = nn.Parameter(torch.zeros(self.out_features, cfg.r, dtype=w.dtype, device=w.device))
        self.dropout[name] = (nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()).train(self.training)
        self.scaling[name] = lora_scaling(cfg.r, cfg.alpha, cfg.rslora)
        self.settings[name] = (cfg.alpha, cfg.rslora)

    def delete(self, name: str) -> None:
        if self.merged == name:
            self.unmerge()
        for table in (self.lora_A, self.lora_B, self.dropout):
            del table[name]
        del self.scaling[name], self.settings[name]
        if self.active == name:
            self.active = None

    def update(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """s B A x for adapter ``name``."""
        return self.scaling[name] * F.linear(F.linear(self.dropout[name](x), self.lora_A[name]), self.lora_B[name])

    def delta_weight(self, name: str) -> torch.Tensor:
        return self.scaling[name] * self.lora_B[name] @ self.lora_A[name]  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.weight, self.bias)  # the shared base, once for every row
        if self.rows is not None:  # a mixed batch: each adapter on its own rows (dim 0 of x)
            if self.merged is not None:
                raise RuntimeError(f"adapter {self.merged!r} is merged into the base weight; unmerge it "
                                   f"before running a mixed batch")
            for name, rows in self.rows.items():
                if name in self.lora_A:  # an adapter that does not target this layer adds nothing here
                    h = h.index_add(0, rows, self.update(name, x.index_select(0, rows)))
            return h
        if self.merged is not None and self.active != self.merged:  # W0 holds another adapter: take it out
            h = h - F.linear(x, self.delta_weight(self.merged))
        if self.active is None or self.active == self.merged:
            return h
        return h + self.update(self.active, x)

    @torch.no_grad()
    def merge(self, name: str) -> None:
        if self.merged == name:
            return
        if self.merged is not None:
            self.unmerge()
        self.weight.add_(self.delta_weight(name))
        self.merged = name

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged is not None:
            self.weight.sub_(self.delta_weight(self.merged))
            self.merged = None

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, adapters="
                f"{ {n: self.lora_A[n].shape[0] for n in self.lora_A} }, active={self.active!r}")


class ModulesToSave(nn.Module):
    """A module (e.g. a classification head) with a trainable copy per adapter that saves it; the
    original (left as it was: freeze it with the base) serves rows of any other adapter. The
    original's state-dict keys stay the module's own (``classifier.weight``, not
    ``classifier.original.weight``); the copies add ``copies.<name>.`` keys."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original = original
        self.copies = nn.ModuleDict()
        self.active: str | None = None                          # the adapter of every row
        self.rows: dict[str | None, torch.Tensor] | None = None  # mixed batch: adapter (None: original) -> rows
        self.train(original.training)
        self._register_state_dict_hook(_original_keys_out)
        self.register_load_state_dict_pre_hook(_original_keys_in)

    def add(self, name: str, module: nn.Module | None = None) -> None:
        """Adapter ``name``'s copy: ``module`` (its own initial weights), else a copy of the original."""
        m = copy.deepcopy(self.original) if module is None else module
        self.copies[name] = m.requires_grad_(True).train(self.training)  # in the mode the model is in

    def module_for(self, name: str | None) -> nn.Module:
        return self.copies[name] if name in self.copies else self.original

    def route(self, names: list[str | None]) -> dict[str | None, torch.Tensor]:
        """The row indices each module serves in a batch whose row i uses adapter ``names[i]``:
        an adapter with a copy its own, every other row the original's (key None)."""
        groups: dict[str | None, list[int]] = {}
        for i, n in enumerate(names):
            groups.setdefault(n if n in self.copies else None, []).append(i)
        device = next(self.original.parameters()).device
        return {n: host_to_device(torch.tensor(ix), device) for n, ix in groups.items()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rows is None:
            return self.module_for(self.active)(x)
        outs = {n: self.module_for(n)(x.index_select(0, r)) for n, r in self.rows.items()}  # each on its rows
        width = max(o.shape[-1] for o in outs.values())
        first = next(iter(outs.values()))
        out = first.new_full((x.shape[0], *first.shape[1:-1], width), float("-inf"))
        for n, o in outs.items():
            out = out.index_copy(0, self.rows[n], F.pad(o, (0, width - o.shape[-1]), value=float("-inf")))
        return out


def _original_keys_out(module, state_dict, prefix, local_metadata):
    """``<prefix>original.<key>`` -> ``<prefix><key>``: the wrapped module keeps its keys."""
    for k in [k for k in state_dict if k.startswith(prefix + "original.")]:
        state_dict[prefix + k[len(prefix + "original."):]] = state_dict.pop(k)


def _original_keys_in(module, state_dict, prefix, *args):
    """The module's own keys back under ``original.`` for loading (those of the copies stay)."""
    for k in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + "copies.")
              and not k.startswith(prefix + "original.")]:
        state_dict[prefix + "original." + k[len(prefix):]] = state_dict.pop(k)


def multi_lora_modules(model: nn.Module) -> list[tuple[str, MultiLoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MultiLoRALinear)]


def saved_modules(model: nn.Module) -> list[tuple[str, ModulesToSave]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ModulesToSave)]


def adapter_names(model: nn.Module) -> list[str]:
    """Every adapter on ``model``: in the order the layers first hold them (a layer's own in the
    order they were added), so an adapter on earlier layers comes before one added earlier on later
    layers only."""
    names: dict[str, None] = {}
    for _, m in multi_lora_modules(model):
        names.update(dict.fromkeys(m.lora_A))
    return list(names)


def add_adapter(model: nn.Module, name: str, cfg: LoRAConfig, modules: dict[str, nn.Module] | None = None
                ) -> list[str]:
    """Add adapter ``name`` (``cfg``: rank, alpha, dropout, rsLoRA, targets, modules_to_save) to ``model``.

    The first call wraps each target ``nn.Linear`` in a ``MultiLoRALinear``, and each module of
    ``cfg.modules_to_save`` in a ``ModulesToSave``; the base weights stay the same Parameters. The
    new adapter's A and B, and its copies of the modules to save, are trainable, nothing else
    changes: freeze the base first (``minift.methods.common.freeze_all``) to train adapters only.
    ``modules`` gives a module to save its own starting weights (name in ``cfg.modules_to_save``
    -> module; default: a copy of the model's). Returns the names of the layers that got A and B.
    Raises:
        ValueError: ``name`` is taken or not a plain identifier; the config asks for DoRA or
            PiSSA (one adapter per model covers those: ``lora.apply``); a target or module to
            save matches nothing.
    """
    if not name.isidentifier():
        raise ValueError(f"adapter name {name!r} must be a plain identifier (letters, digits, _)")
    if name in adapter_names(model):
        raise ValueError(f"the model already has an adapter named {name!r}; delete_adapter it first")
    if cfg.dora or cfg.init != "default":
        raise ValueError("named adapters are plain LoRA (init 'default', no DoRA)")
    extra = sorted(set(modules or {}) - set(cfg.modules_to_save))
    if extra:
        raise ValueError(f"modules gives {extra[0]!r}, which is not in modules_to_save {list(cfg.modules_to_save)}")
    wrapped = [(t, n) for t in cfg.targets for n, _ in saved_modules(model) if n == t or n.endswith("." + t)]
    if wrapped:
        raise ValueError(f"target {wrapped[0][0]!r} is {wrapped[0][1]!r}, which adapters train in full "
                         f"(modules_to_save); leave it out of the targets")
    found = find_modules(model, cfg.targets, (nn.Linear, MultiLoRALinear))  # none: a ValueError naming them
    saved = []  # (name, module, its modules_to_save entry): checked before anything changes
    for t in dict.fromkeys(cfg.modules_to_save):
        hits = [(n, m, t) for n, m in model.named_modules() if n == t or n.endswith("." + t)]
        if not hits:
            raise ValueError(f"modules_to_save {t!r} matches no module of {type(model).__name__}")
        saved += hits
    inside = [(f, n) for f, _ in found for n, _, _ in saved if f == n or f.startswith(n + ".")]
    if inside:
        raise ValueError(f"target {inside[0][0]!r} lies in {inside[0][1]!r}, which the adapter trains in full "
                         f"(modules_to_save); leave it out of the targets")
    for n, m in found:
        if not isinstance(m, MultiLoRALinear):
            m = MultiLoRALinear(m)
            set_submodule(model, n, m)
        m.add(name, cfg)
    for n, m, t in saved:
        given = (modules or {}).get(t)  # a copy of its own for each module it matches
        add_module_copy(model, n, name, copy.deepcopy(given) if given is not None and len(saved) > 1 else given)
    return [n for n, _ in found]


def add_module_copy(model: nn.Module, module_name: str, name: str, module: nn.Module | None = None) -> None:
    """Adapter ``name``'s trainable copy of module ``module_name`` (``module``, else a copy of the
    original), wrapping it in a ``ModulesToSave`` first if it is not one yet."""
    m = model.get_submodule(module_name)
    if not isinstance(m, ModulesToSave):
        m = ModulesToSave(m)
        set_submodule(model, module_name, m)
    m.add(name, module)


def drop_module_copies(model: nn.Module, name: str) -> None:
    """Remove adapter ``name``'s copies of modules to save; a module no adapter saves any more is
    the plain module again."""
    for n, m in saved_modules(model):
        if name in m.copies:
            del m.copies[name]
        if m.active == name:
            m.active = None
        if not m.copies:
            set_submodule(model, n, m.original)


def set_active(model: nn.Module, name: str | None) -> None:
    """Every row uses adapter ``name`` from now on (None: the base alone). Moves no weight."""
    _check(model, [name])
    for _, m in multi_lora_modules(model):
        m.active = name if name in m.lora_A else None
    for _, m in saved_modules(model):
        m.active = name


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` (unmerging it first if it is merged) from every layer."""
    _check(model, [name])
    for _, m in multi_lora_modules(model):
        if name in m.lora_A:
            m.delete(name)
    drop_module_copies(model, name)


def merge_adapter(model: nn.Module, name: str) -> None:
    """Fold adapter ``name`` into the base weights (another merged adapter is unmerged first)."""
    _check(model, [name])
    for _, m in multi_lora_modules(model):
        if name in m.lora_A:
            m.merge(name)
        else:
            m.unmerge()


def unmerge_adapter(model: nn.Module) -> None:
    """Take the merged adapter, if any, back out of the base weights."""
    for _, m in multi_lora_modules(model):
        m.unmerge()


@contextlib.contextmanager
def mixed_batch(model: nn.Module, names: list[str | None]):
    """Inside the ``with``, example i of every batch uses adapter ``names[i]`` (None: base only).

    The batch's first dimension must be ``len(names)``, for every forward inside (generation
    with a KV cache keeps its rows, so it works too).
    """
    _check(model, names)
    layers = multi_lora_modules(model)
    device = layers[0][1].weight.device if layers else None
    rows = {n: host_to_device(torch.tensor([i for i, m in enumerate(names) if m == n]), device)
            for n in dict.fromkeys(names) if n is not None}
    names, saved = list(names), saved_modules(model)
    try:
        for _, m in layers:
            m.rows, m.row_names = rows, names
        for _, m in saved:
            m.rows = m.route(names)
        yield model
    finally:
        for _, m in layers:
            m.rows = m.row_names = None
        for _, m in saved:
            m.rows = None


def _check(model: nn.Module, names) -> None:
    known = adapter_names(model)
    bad = [n for n in names if n is not None and n not in known]
    if bad:
        raise ValueError(f"no adapter named {bad[0]!r}; the model has {', '.join(known) or 'none'}")
