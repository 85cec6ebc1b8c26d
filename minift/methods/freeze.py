"""Layer-wise freezing, gradual unfreezing, discriminative learning rates and BitFit.

Freezing (Yosinski et al. 2014, "How transferable are features in deep neural networks?"):
lower layers hold general features, upper ones task-specific ones, so train a subset S:

    θ_ℓ ← θ_ℓ - η · ∇_{θ_ℓ} L   for ℓ ∈ S,      θ_ℓ unchanged for ℓ ∉ S

ULMFiT (Howard & Ruder 2018): *gradual unfreezing* starts with the top group trainable and
unfreezes one more group downward every k steps; *discriminative fine-tuning* gives layer ℓ
of L the learning rate  η_ℓ = η / decay^(L-1-ℓ)  (decay = 2.6 in the paper).
BitFit (Ben Zaken et al. 2021): train only the bias terms  b  of every layer (and the head).
Llama has no bias terms by default (Qwen2's q/k/v biases, or ``attention_bias`` /
``mlp_bias``, add some); a model without any leaves BitFit nothing to train, and ``bitfit``
refuses it rather than train something else under BitFit's name (the RMSNorm weights, say,
which are scales, not biases).

    bottom_up (L=4)   top_down      alternating    ratio=0.75    (* trainable, · frozen)
    head     *        head     *    head     *     head     *
    block 3  *        block 3  ·    block 3  *     block 3  *
    block 2  *        block 2  ·    block 2  ·     block 2  ·
    block 1  ·        block 1  *    block 1  *     block 1  ·
    block 0  ·        block 0  *    block 0  ·     block 0  ·
    embed    ·        embed    ·    embed    ·     embed    ·

The final norm (GPT's LayerNorm, Llama's RMSNorm), the pooler (BERT) and an untied LM head
(Llama's ``lm_head``) sit on top of the last block and follow it; the classification head
(``modules_to_save``) always stays trainable. A tied LM head (GPT-2's, a tied Llama's) is the
token embedding, so it follows ``freeze_embeddings``.

Frozen layers cost less, not only train less. When the embeddings and every block below the
first trainable one are frozen, nothing below that block needs a gradient, so the model runs
those blocks under ``no_grad`` (``grad_from_layer``): no graph, no activations kept for them,
and activation checkpointing never wraps them. (PyTorch records no graph for an op none of
whose inputs requires grad, so ``requires_grad=False`` alone already keeps no activations
there; ``grad_from_layer`` makes it explicit, and tests/test_freeze.py checks it.)
Freezing "by leaving parameters out of the optimizer" instead builds the whole graph and
computes every gradient only to throw most of them away.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn as nn

from minift.methods.common import freeze_all, unfreeze_modules
from minift.models.bert import Bert, BertClassifier
from minift.models.gpt import GPT
from minift.models.llama import Llama

STRATEGIES = ("bottom_up", "top_down", "alternating", "ratio", "adaptive", "layers")
_NEEDS = {"ratio": "ratio", "adaptive": "task_similarity", "layers": "layers"}


@dataclass
class FreezeConfig:
    """Which blocks to freeze.

    - ``bottom_up``: layers 0 .. L//2-1;  ``top_down``: layers L//2 .. L-1;
    - ``alternating``: layers 0, 2, 4, ...;
    - ``ratio``: the lowest round(ratio * L) layers (halves round up), ratio in [0, 1];
    - ``adaptive``: from ``task_similarity`` in [0, 1]: > 0.8 freezes 70% of the layers from
      the bottom, > 0.5 freezes 40%, otherwise 20% (a more similar task needs less change);
    - ``layers``: exactly the given layer indices.
    """
    strategy: str = "bottom_up"
    ratio: float | None = None
    task_similarity: float | None = None
    layers: tuple[int, ...] | None = None
    freeze_embeddings: bool = True
    modules_to_save: tuple[str, ...] = ("classifier",)

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}; got {self.strategy!r}")
        for field in ("ratio", "task_similarity", "layers"):
            given, wanted = getattr(self, field) is not None, _NEEDS.get(self.strategy) == field
            if wanted and not given:
                raise ValueError(f"strategy={self.strategy!r} needs {field}=...")
            if given and not wanted:
                user = next(s for s, f in _NEEDS.items() if f == field)
                raise ValueError(f"{field} is only used by strategy={user!r}, not {self.strategy!r}")
        for field in ("ratio", "task_similarity"):
            v = getattr(self, field)
            if v is not None and not 0.0 <= v <= 1.0:  # also rejects NaN
                raise ValueError(f"{field} must be in [0, 1], got {v}")
        if self.layers is not None:
            layers = (self.layers,) if isinstance(self.layers, int) else tuple(self.layers)
            for i in layers:
                if isinstance(i, bool) or not isinstance(i, int) or i < 0:
                    raise ValueError(f"layers must be non-negative layer indices, got {i!r}")
            self.layers = tuple(sorted(set(layers)))
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = (self.modules_to_save,)
        self.modules_to_save = tuple(self.modules_to_save)


def adaptive_ratio(task_similarity: float) -> float:
    """Share of layers to freeze for a task this similar to pre-training (strict thresholds)."""
    return 0.7 if task_similarity > 0.8 else 0.4 if task_similarity > 0.5 else 0.2


def frozen_layers(cfg: FreezeConfig, n_layer: int) -> list[int]:
    """The block indices ``cfg`` freezes in a model of ``n_layer`` blocks."""
    if cfg.strategy == "bottom_up":
        return list(range(n_layer // 2))
    if cfg.strategy == "top_down":
        return list(range(n_layer // 2, n_layer))
    if cfg.strategy == "alternating":
        return list(range(0, n_layer, 2))
    if cfg.strategy in ("ratio", "adaptive"):
        r = cfg.ratio if cfg.strategy == "ratio" else adaptive_ratio(cfg.task_similarity)
        return list(range(math.floor(r * n_layer + 0.5 + 1e-9)))  # round half up, robust to 0.7*10
    bad = [i for i in cfg.layers if i >= n_layer]
    if bad:
        raise ValueError(f"layer {bad[0]} is out of range: the model has layers 0..{n_layer - 1}")
    return list(cfg.layers)


# ---------------------------------------------------------------------------- model parts

@dataclass
class _Parts:
    backbone: nn.Module  # the GPT, Llama or Bert that carries grad_from_layer
    embeddings: list[tuple[str, nn.Parameter]]
    layers: list[list[tuple[str, nn.Parameter]]]  # one list per block, bottom to top
    rest: list[tuple[str, nn.Parameter]]  # final norm / pooler, head and anything else


def _parts(model: nn.Module) -> _Parts:
    """Split the parameters of a GPT, Llama, Bert or BertClassifier into embeddings, blocks and the rest."""
    if isinstance(model, BertClassifier):
        bb = model.bert
    elif isinstance(model, (GPT, Llama, Bert)):
        bb = model
    else:
        raise ValueError(f"freezing works on GPT, Llama, Bert and BertClassifier models, got {type(model).__name__}")
    if isinstance(bb, GPT):
        emb_modules = (bb.wte, bb.wpe)
    elif isinstance(bb, Llama):
        emb_modules = (bb.embed_tokens,)  # no position table: RoPE turns q and k inside attention
    else:
        emb_modules = (bb.embeddings,)  # words, positions, token types and their LayerNorm
    emb_ids = {id(p) for m in emb_modules for p in m.parameters()}
    layer_of = {id(p): i for i, block in enumerate(bb.layers) for p in block.parameters()}
    parts = _Parts(bb, [], [[] for _ in bb.layers], [])
    for name, p in model.named_parameters():  # shared (tied) parameters appear once
        if id(p) in emb_ids:
            parts.embeddings.append((name, p))
        elif id(p) in layer_of:
            parts.layers[layer_of[id(p)]].append((name, p))
        else:
            parts.rest.append((name, p))
    return parts


def sync_grad_from_layer(model: nn.Module) -> int:
    """Set the model's ``grad_from_layer`` from what is trainable now, and return it.

    It is the index of the first block with a trainable parameter when the embeddings and
    all blocks below it are frozen (``n_layer`` when no block is trainable), else 0. Call it
    after changing ``requires_grad`` by hand: a block below a stale value gets no gradient.
    """
    parts = _parts(model)
    g = 0
    if not any(p.requires_grad for _, p in parts.embeddings):
        g = next((i for i, ps in enumerate(parts.layers) if any(p.requires_grad for _, p in ps)),
                 len(parts.layers))
    parts.backbone.grad_from_layer = g
    return g


def _unfreeze_head(model: nn.Module, modules_to_save) -> None:
    # The default head name "classifier" is skipped on models without one (GPT, Bert);
    # any other name must match a module (unfreeze_modules lists the names that exist).
    names = [n for n in modules_to_save
             if n != "classifier" or any(k == n or k.endswith("." + n) for k, _ in model.named_modules())]
    if names:
        unfreeze_modules(model, names)


def head_param_groups(model: nn.Module, lr: float, ratio: float, modules_to_save) -> list[dict]:
    """Optimizer groups: the trainable parameters of ``modules_to_save`` (a new head, which starts
    from random) at ``lr * ratio``, every other trainable parameter at ``lr``."""
    names = (modules_to_save,) if isinstance(modules_to_save, str) else tuple(modules_to_save)
    in_head = {id(p) for k, m in model.named_modules() if any(k == n or k.endswith("." + n) for n in names)
               for p in m.parameters()}
    ps = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in ps if id(p) not in in_head], "lr": lr, "name": "other"},
              {"params": [p for p in ps if id(p) in in_head], "lr": lr * ratio, "name": "head"}]
    return [g for g in groups if g["params"]]


def _trainable(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


# ---------------------------------------------------------------------------- freezing

def apply(model: nn.Module, cfg: FreezeConfig) -> list[str]:
    """Freeze the blocks ``cfg`` names (and the embeddings unless told not to); return the
    names of the trainable parameters. Sets ``grad_from_layer`` (see the module docstring)."""
    parts = _parts(model)
    n = len(parts.layers)
    frozen = set(frozen_layers(cfg, n))
    for _, p in parts.embeddings:
        p.requires_grad_(not cfg.freeze_embeddings)
    for i, params in enumerate(parts.layers):
        for _, p in params:
            p.requires_grad_(i not in frozen)
    for _, p in parts.rest:  # final norm / pooler follow the top block; the head is set next
        p.requires_grad_(n - 1 not in frozen)
    _unfreeze_head(model, cfg.modules_to_save)
    sync_grad_from_layer(model)
    return _trainable(model)


def bitfit(model: nn.Module, modules_to_save=("classifier",)) -> list[str]:
    """BitFit: train only parameters named exactly ``bias`` (every Linear and LayerNorm bias,
    embeddings' LayerNorm included) plus the head; return the trainable names.

    Raises:
        ValueError: the model has no bias terms (a Llama without attention or MLP biases).
    """
    if isinstance(modules_to_save, str):
        modules_to_save = (modules_to_save,)
    _parts(model)  # checks the model type
    biases = [p for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] == "bias"]
    if not biases:
        raise ValueError(f"BitFit trains bias terms and this {type(model).__name__} has none (no attention or MLP "
                         f"biases); choose another method, e.g. lora")
    freeze_all(model)
    for p in biases:
        p.requires_grad_(True)
    _unfreeze_head(model, modules_to_save)
    sync_grad_from_layer(model)
    return _trainable(model)


# ---------------------------------------------------------------------------- ULMFiT

class GradualUnfreezer:
    """ULMFiT gradual unfreezing, driven by a visible call from the training loop.

    At construction only the top ``start_layers`` blocks, the final norm / pooler and the
    head are trainable (embeddings frozen throughout). ``step(global_step)`` makes the top
    ``start_layers + group_size * (global_step // every)`` blocks trainable (never more than
    all of them, never refreezing) and returns the blocks unfrozen by this call.

    The optimizer: build it ONCE over all parameters, e.g. ``AdamW(model.parameters())``
    or ``AdamW(discriminative_param_groups(model, lr))``, and clear gradients with
    ``zero_grad(set_to_none=True)`` (the default). Frozen parameters then have ``grad is
    None`` and torch optimizers skip them entirely (no update, no weight decay, no state);
    a block starts being updated on the first backward after it is unfrozen. An optimizer
    built over only the parameters trainable at the start would never update the blocks
    unfrozen later. Call ``step`` at the top of each training step, before the forward::

        unfreezer = GradualUnfreezer(model, every=100)
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
        for global_step, batch in enumerate(batches):
            unfreezer.step(global_step)
            model_forward(model, batch).loss.backward()
            opt.step(); opt.zero_grad()
    """

    def __init__(self, model: nn.Module, every: int, start_layers: int = 1, group_size: int = 1,
                 *, modules_to_save=("classifier",)):
        parts = _parts(model)
        self.n_layer = len(parts.layers)
        if every < 1:
            raise ValueError(f"every must be >= 1 step, got {every}")
        if not 0 <= start_layers <= self.n_layer:
            raise ValueError(f"start_layers must be in [0, {self.n_layer}], got {start_layers}")
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1 layer, got {group_size}")
        self.model, self.every, self.start_layers, self.group_size = model, every, start_layers, group_size
        freeze_all(model)
        for i in range(self.n_layer - start_layers, self.n_layer):
            for _, p in parts.layers[i]:
                p.requires_grad_(True)
        for name, p in parts.rest:
            p.requires_grad_(True)
        _unfreeze_head(model, modules_to_save)
        self.n_unfrozen = start_layers
        sync_grad_from_layer(model)

    def n_unfrozen_at(self, global_step: int) -> int:
        return min(self.n_layer, self.start_layers + self.group_size * (global_step // self.every))

    def trainable_layers(self) -> list[int]:
        return list(range(self.n_layer - self.n_unfrozen, self.n_layer))

    def step(self, global_step: int) -> list[int]:
        """Unfreeze the blocks due by ``global_step``; return their indices (ascending)."""
        if global_step < 0:
            raise ValueError(f"global_step must be >= 0, got {global_step}")
        target = self.n_unfrozen_at(global_step)
        if target <= self.n_unfrozen:
            return []
        new = list(range(self.n_layer - target, self.n_layer - self.n_unfrozen))
        layers = _parts(self.model).layers
        for i in new:
            for _, p in layers[i]:
                p.requires_grad_(True)
        self.n_unfrozen = target
        sync_grad_from_layer(self.model)
        return new


def discriminative_param_groups(model: nn.Module, lr: float, decay: float = 2.6,
                                *, trainable_only: bool = False) -> list[dict]:
    """Optimizer parameter groups with ULMFiT's per-layer learning rates.

    Block ℓ of L gets ``lr / decay**(L-1-ℓ)`` (the top block ``lr``), the embeddings
    ``lr / decay**L`` (one step below block 0), everything above the blocks (final norm,
    pooler, head) ``lr``. Each group carries a ``name`` ("embeddings", "layers.<i>",
    "head"). All parameters are included unless ``trainable_only``, so the groups work with
    ``GradualUnfreezer`` (frozen parameters have no grad and the optimizer skips them).
    """
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if not decay > 0:
        raise ValueError(f"decay must be > 0 (ULMFiT used 2.6), got {decay}")
    parts = _parts(model)
    n = len(parts.layers)
    named = [("embeddings", parts.embeddings, lr / decay ** n)]
    named += [(f"layers.{i}", ps, lr / decay ** (n - 1 - i)) for i, ps in enumerate(parts.layers)]
    named.append(("head", parts.rest, lr))
    groups = []
    for name, ps, group_lr in named:
        params = [p for _, p in ps if p.requires_grad or not trainable_only]
        if params:
            groups.append({"name": name, "params": params, "lr": group_lr})
    return groups
