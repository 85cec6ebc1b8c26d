"""What a method provides, as types: the shape of every entry of ``minift.methods.registry``.

A method is a config dataclass (beside its code), an ``apply`` that changes a model in place,
and a ``hooks`` builder that returns what the training loop calls besides the forward
(``TrainHooks``). Options that are not config fields (LoRA+, discriminative learning rates,
gradual unfreezing) are small ``training`` dataclasses, defined here.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
import torch.nn as nn

from minift.methods.probe import POOLINGS


# ---------------------------------------------------------------------------- what a method provides

class Config(Protocol):
    """A method's options: a dataclass whose fields are the options' names."""
    __dataclass_fields__: ClassVar[dict]


class Allocator(Protocol):
    """Called by the training loop after backward and before zero_grad (AdaLoRA's RankAllocator);
    its state goes into checkpoints."""
    def step(self, model: nn.Module, global_step: int) -> int: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class Unfreezer(Protocol):
    """Called by the training loop before each step (freeze.GradualUnfreezer)."""
    def step(self, global_step: int) -> list[int]: ...


@dataclass
class TrainHooks:
    """The keyword arguments ``minift.training.loop.train`` takes for a method (None: not used)."""
    param_groups: list[dict] | None = None    # LoRA+ or discriminative learning rates
    allocator: Allocator | None = None        # AdaLoRA's rank allocator
    penalty: Callable[[nn.Module], torch.Tensor] | None = None  # added to the loss (AdaLoRA's, weighted)
    forward_context: Callable[[nn.Module], AbstractContextManager] | None = None  # around forward + penalty
    unfreezer: Unfreezer | None = None        # gradual unfreezing


@dataclass(frozen=True)
class Context:
    """What building a method needs besides its options."""
    tokenizer: Any = None         # prefix / prompt init from text
    lr: float = 1e-4              # the base learning rate (parameter groups scale it)
    weight_decay: float = 0.0


class MethodModule(Protocol):
    """What a method file with a config provides: ``apply(model, cfg)`` changes the model in place
    and returns the names of what it changed (lora.py, adalora.py)."""
    def apply(self, model: nn.Module, cfg: Any, /) -> list[str]: ...


class TextInitModule(Protocol):
    """A method file whose ``apply`` can start from text (prefix.py, prompt.py)."""
    def apply(self, model: nn.Module, cfg: Any, tokenizer: Any = None) -> list[str]: ...


class Apply(Protocol):
    """A table entry's apply: change ``model`` in place as the settings say; return the names of
    what changed."""
    def __call__(self, model: nn.Module, ms: MethodSettings, ctx: Context) -> list[str]: ...


class BuildHooks(Protocol):
    """The training-loop hooks of a model ``Apply`` has just changed."""
    def __call__(self, model: nn.Module, ms: MethodSettings, ctx: Context) -> TrainHooks: ...


@dataclass(frozen=True)
class MethodSpec:
    """One row of the table: a method's option dataclasses and the functions that build it."""
    config: type[Config] | None         # the method's config dataclass (None: it has none)
    apply: Apply
    training: type[Config] | None = None  # its training options (parameter groups, unfreezing)
    hooks: BuildHooks | None = None
    fixed: Mapping[str, Any] = field(default_factory=dict)  # config fields the method sets (DoRA: dora=True)
    resolve: Callable[[dict, int | None], dict] | None = None  # options relative to the run -> absolute
    check: Callable[[MethodSettings], None] | None = None  # checks across options
    peft: bool = True                   # False: full fine-tuning, checkpoints hold every weight
    trained: bool = True                # False: the probe (a frozen model, fit by ``minift probe``)


@dataclass(frozen=True)
class MethodSettings:
    """A method and its options, typed: what flags and TOML keys become."""
    name: str
    config: Config | None
    training: Config | None
    options: dict                       # the options as given (resolved): run.json records them


# ---------------------------------------------------------------------------- training options

@dataclass
class Discriminative:
    """ULMFiT's discriminative learning rates: block l of L trains at lr / lr_decay**(L-1-l)."""
    lr_decay: float | None = None


@dataclass
class LoRAPlus:
    """LoRA+: B trains at lr_ratio times A's learning rate."""
    lr_ratio: float | None = None


@dataclass
class LoRATraining:
    lr_ratio: float | None = None       # LoRA+
    merged_forward: bool = False        # forward through W0 + sBA (minift.fast; the caller switches it on)


@dataclass
class FreezeTraining:
    lr_decay: float | None = None       # discriminative learning rates
    unfreeze_every: int | None = None   # ULMFiT gradual unfreezing: steps per newly unfrozen group
    start_layers: int = 1               #   top blocks trainable at the start
    group_size: int = 1                 #   blocks unfrozen at a time


@dataclass
class BitFitConfig:
    modules_to_save: tuple[str, ...] = ("classifier",)  # trained in full besides the biases


@dataclass
class BitFitTraining:
    head_lr_ratio: float | None = None  # the modules_to_save (a new head) learn at lr x this ratio

    def __post_init__(self):
        r = self.head_lr_ratio
        if r is not None and (isinstance(r, bool) or not isinstance(r, (int, float)) or not r > 0):
            raise ValueError(f"BitFitTraining.head_lr_ratio must be a number > 0, got {r!r}")


@dataclass
class ProbeConfig:
    pooling: str = "cls"                # a sentence's features: cls | mean | last (token: per token)
    layer: str = "best"                 # the layer reported: the best on dev

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise ValueError(f"ProbeConfig.pooling must be one of {', '.join(POOLINGS)}; got {self.pooling!r}")
        if self.layer != "best":
            raise ValueError(f"ProbeConfig.layer must be 'best' (chosen by dev accuracy); got {self.layer!r}")
