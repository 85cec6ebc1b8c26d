"""One table of fine-tuning methods: each name -> its typed options, its apply, its training hooks.

    METHODS["lora"]          MethodSpec(config=LoRAConfig, training=LoRATraining, apply=..., hooks=...)

    ms = parse_method("lora", {"r": 16, "lr_ratio": 16.0})          # flags / TOML keys -> typed
       -> MethodSettings("lora", config=LoRAConfig(r=16, ...), training=LoRATraining(lr_ratio=16.0))
    st = build_method(model, "lora", ms, lr=1e-4)                    # apply, then the hooks
    train(model, batches, cfg, **st.train_hooks())

Every option of a method (a CLI flag, a TOML key) is a field of one of its two small dataclasses:
its ``config``, beside the method's code (``LoRAConfig`` in lora.py), which ``apply`` reads; and
its ``training`` options (``minift.methods.spec``, with the types of an entry), which its ``hooks`` read: LoRA+'s learning-rate ratio, ULMFiT's
discriminative learning rates and gradual unfreezing. An option of neither is an error that
names it, so ``--method full --r 8`` never silently ignores ``--r``.

The hooks are what the training loop calls besides the forward: AdaLoRA's rank allocator
(after backward, before zero_grad), its orthogonal penalty and batched factors, a gradual
unfreezer, and the optimizer's parameter groups. Prefix and prompt tuning need none: their
modules extend each batch in ``minift.training.forward.model_forward``.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace

import torch.nn as nn

from minift.methods import adalora, adalora_alloc, freeze, full, lora, prefix, prompt
from minift.methods.common import count_trainable, freeze_all
from minift.methods.spec import (Allocator, Apply, BitFitConfig, BitFitTraining, Config, Context, Discriminative,
                                 FreezeTraining, LoRAPlus, LoRATraining, MethodModule, MethodSettings, MethodSpec, ProbeConfig,
                                 TextInitModule, TrainHooks)
from minift.models.bert import BertClassifier


# ---------------------------------------------------------------------------- apply and hooks

def _apply_full(model, ms, ctx):
    return full.apply(model)


def _apply_config(module: MethodModule) -> Apply:
    """A method file's ``apply(model, cfg)`` (lora, adalora)."""
    return lambda model, ms, ctx: module.apply(model, ms.config)


def _apply_with_text(module: TextInitModule) -> Apply:
    """A method file's ``apply(model, cfg, tokenizer=...)`` (prefix, prompt: init from text)."""
    return lambda model, ms, ctx: module.apply(model, ms.config, tokenizer=ctx.tokenizer)


def _apply_freeze(model, ms, ctx):
    if ms.training.unfreeze_every is not None:
        return []  # gradual unfreezing: the unfreezer, a training hook, sets the trainable blocks
    return freeze.apply(model, ms.config)


def _apply_bitfit(model, ms, ctx):
    return freeze.bitfit(model, ms.config.modules_to_save)


def _apply_probe(model, ms, ctx):
    freeze_all(model)  # the model only runs forward; the probes are fit on its features
    return []


def _bitfit_hooks(model, ms, ctx):
    r = ms.training.head_lr_ratio
    return TrainHooks(param_groups=None if r is None else
                      freeze.head_param_groups(model, ctx.lr, r, ms.config.modules_to_save))


def _discriminative_hooks(model, ms, ctx):
    d = ms.training.lr_decay
    return TrainHooks(param_groups=None if d is None else freeze.discriminative_param_groups(model, ctx.lr, d))


def _lora_plus_hooks(model, ms, ctx):
    r = ms.training.lr_ratio
    return TrainHooks(param_groups=None if r is None else lora.param_groups(model, ctx.lr, r, ctx.weight_decay))


def _adalora_hooks(model, ms, ctx):
    cfg = ms.config
    w = cfg.orth_reg_weight
    return TrainHooks(allocator=adalora_alloc.RankAllocator(model, cfg),
                      penalty=(lambda m: w * adalora.orth_penalty(m)) if w > 0 else None,
                      forward_context=adalora.batched_factors)


def _freeze_hooks(model, ms, ctx):
    t = ms.training
    unfreezer = None
    if t.unfreeze_every is not None:  # ULMFiT: start with the top, unfreeze downward over time
        unfreezer = freeze.GradualUnfreezer(model, t.unfreeze_every, t.start_layers, t.group_size,
                                            modules_to_save=ms.config.modules_to_save)
    groups = None
    if t.lr_decay is not None:
        groups = freeze.discriminative_param_groups(model, ctx.lr, t.lr_decay, trainable_only=unfreezer is None)
    return TrainHooks(param_groups=groups, unfreezer=unfreezer)


# ---------------------------------------------------------------------------- checks and resolution

def _check_merged_forward(ms):
    if not ms.training.merged_forward:
        return
    if ms.config.dropout > 0:
        raise ValueError(f"--merged-forward needs --dropout 0 (LoRA dropout acts on the adapter's input "
                         f"only, which the merged weight cannot do); got --dropout {ms.config.dropout}")
    if ms.config.dora:
        raise ValueError("--merged-forward covers plain LoRA only; DoRA's magnitude scaling keeps the exact "
                         "path (drop --merged-forward or --dora)")


def _check_gradual(ms):
    """Gradual unfreezing replaces the freezing strategy: only modules_to_save applies to both."""
    if ms.training.unfreeze_every is not None:
        given = [f.name for f in fields(ms.config) if f.name in ms.options and f.name != "modules_to_save"]
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} chooses the blocks to freeze; gradual unfreezing "
                             f"(--unfreeze-every) unfreezes them over time instead: give one of the two")
    given = [k for k in ("start_layers", "group_size") if k in ms.options]
    if given and ms.training.unfreeze_every is None:
        raise ValueError(f"--{given[0].replace('_', '-')} is an option of gradual unfreezing: give --unfreeze-every")


def _adalora_schedule(opts: dict, total_steps: int | None) -> dict:
    """AdaLoRA's ``tinit``/``tfinal``/``delta_t`` given as fractions (< 1) of the run -> step
    counts (a whole number as a float -> an int); ``total_step``: ``total_steps`` unless given."""
    opts = dict(opts)
    from_run = "total_step" not in opts and total_steps is not None
    if from_run:
        opts["total_step"] = total_steps
    total = opts.get("total_step")
    for k in ("tinit", "tfinal", "delta_t"):
        v = opts.get(k)
        if isinstance(v, float) and v < 1 and total is not None:
            # at least one pruning step, and one final step (the prune to the target budget)
            opts[k] = max(int(v * total), 0 if k == "tinit" else 1)
            if k == "tfinal":
                opts[k] = min(opts[k], max(total - 1, 0))
        elif isinstance(v, float) and v.is_integer():
            opts[k] = int(v)
    if from_run and opts.get("tinit", 0) + opts.get("tfinal", 0) >= total:
        opts["tinit"] = 0  # a run too short for the warm-up: prune from the start
    return opts


# ---------------------------------------------------------------------------- the table

# name: MethodSpec(config, apply, training options, training hooks, ...)
METHODS: dict[str, MethodSpec] = {
    "full": MethodSpec(None, _apply_full, Discriminative, _discriminative_hooks, peft=False),
    "lora": MethodSpec(lora.LoRAConfig, _apply_config(lora), LoRATraining, _lora_plus_hooks,
                       check=_check_merged_forward),
    "dora": MethodSpec(lora.LoRAConfig, _apply_config(lora), LoRAPlus, _lora_plus_hooks, fixed={"dora": True}),
    "adalora": MethodSpec(adalora.AdaLoRAConfig, _apply_config(adalora), None, _adalora_hooks,
                          resolve=_adalora_schedule),
    "prefix": MethodSpec(prefix.PrefixConfig, _apply_with_text(prefix)),
    "prompt": MethodSpec(prompt.PromptConfig, _apply_with_text(prompt)),
    "freeze": MethodSpec(freeze.FreezeConfig, _apply_freeze, FreezeTraining, _freeze_hooks, check=_check_gradual),
    "bitfit": MethodSpec(BitFitConfig, _apply_bitfit, BitFitTraining, _bitfit_hooks),
    "probe": MethodSpec(ProbeConfig, _apply_probe, trained=False),
}


def spec(name: str) -> MethodSpec:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def option_names(name: str) -> list[str]:
    """Every option ``name`` takes: the fields of its config and of its training options."""
    s = spec(name)
    return [f.name for cls in (s.config, s.training) if cls is not None for f in fields(cls)]


# ---------------------------------------------------------------------------- options -> typed

def check_options(name: str, options: Mapping, origin: Mapping[str, str] | None = None) -> None:
    """Refuse an option that is no field of the method's dataclasses. ``origin`` says where each
    option was given (``--r``, ``run.toml: [method] r``); the default is its flag."""
    allowed = option_names(name)
    extra = sorted(set(options) - set(allowed))
    if extra:
        where = (origin or {}).get(extra[0]) or "--" + extra[0].replace("_", "-")
        flags = ", ".join("--" + n.replace("_", "-") for n in sorted(allowed)) or "none"
        raise ValueError(f"{where} does not apply to --method {name} (its options: {flags})")


def parse_method(name: str, options: Mapping | None = None, *, total_steps: int | None = None,
                 origin: Mapping[str, str] | None = None) -> MethodSettings:
    """The typed settings of ``name`` from its options (None values are not given; lists become
    tuples). ``total_steps``: the run's length, for options relative to it (AdaLoRA's schedule).

    Raises:
        ValueError: an unknown method or option, or a value the dataclasses refuse.
    """
    s = spec(name)
    opts = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(options or {}).items() if v is not None}
    check_options(name, opts, origin)
    if s.resolve is not None:
        opts = s.resolve(opts, total_steps)

    def make(cls, fixed=()):
        return None if cls is None else cls(**{**{f.name: opts[f.name] for f in fields(cls) if f.name in opts},
                                                **dict(fixed)})
    ms = MethodSettings(name, make(s.config, s.fixed), make(s.training), opts)
    if s.check is not None:
        s.check(ms)
    return ms


# ---------------------------------------------------------------------------- build

@dataclass
class MethodState:
    """What ``build_method`` did: the settings it applied, what ``apply`` returned, the hooks."""
    settings: MethodSettings
    changed: list[str]
    hooks: TrainHooks
    peft: bool = True                   # False: full fine-tuning, checkpoints hold every weight

    @property
    def config(self) -> Config | None:
        return self.settings.config

    @property
    def options(self) -> dict:
        return self.settings.options

    @property
    def allocator(self) -> Allocator | None:
        return self.hooks.allocator

    def train_hooks(self) -> dict:
        """Keyword arguments for ``minift.training.loop.train``."""
        return {f.name: getattr(self.hooks, f.name) for f in fields(self.hooks)}

    def trainable(self, model: nn.Module) -> tuple[int, int]:
        return count_trainable(model)


def with_head(model: nn.Module, ms: MethodSettings) -> MethodSettings:
    """A new classification head (BertClassifier's, randomly initialized) trains in full unless
    the options say which modules do; an adapter on it is refused."""
    if not isinstance(model, BertClassifier) or ms.config is None:
        return ms
    names = {f.name for f in fields(ms.config)}
    cfg = ms.config
    if "modules_to_save" in names and "modules_to_save" not in ms.options:
        cfg = replace(cfg, modules_to_save=("classifier",))
    hit = [t for t in getattr(cfg, "targets", ()) if t == "classifier" or t.endswith(".classifier")]
    if hit:
        raise ValueError(f"--targets {hit[0]}: the classification head is new (randomly initialized) and "
                         f"trains in full as a module to save (--modules-to-save classifier, the default); "
                         f"{ms.name} adapts pretrained layers only, so drop it from --targets")
    return replace(ms, config=cfg)


def build_method(model: nn.Module, name: str, settings: MethodSettings | Mapping | None = None, *,
                 tokenizer=None, lr: float = 1e-4, weight_decay: float = 0.0,
                 total_steps: int | None = None) -> MethodState:
    """Apply method ``name`` to ``model`` in place and build its training hooks.

    Args:
        settings: typed (``parse_method``) or options as flags and TOML give them (None: defaults).
        tokenizer: for prefix / prompt init from text.
        lr, weight_decay: the base values the parameter groups (LoRA+, discriminative) scale.
        total_steps: the run's length, for options given as fractions of it (AdaLoRA's schedule).

    Raises:
        ValueError: an unknown method or option, a bad value, a target that does not exist.
    """
    if not isinstance(settings, MethodSettings):
        settings = parse_method(name, settings, total_steps=total_steps)
    elif settings.name != name:
        raise ValueError(f"settings of method {settings.name!r} given to build {name!r}")
    s = METHODS[name]
    settings = with_head(model, settings)
    ctx = Context(tokenizer, lr, weight_decay)
    changed = s.apply(model, settings, ctx)
    hooks = s.hooks(model, settings, ctx) if s.hooks is not None else TrainHooks()
    return MethodState(settings, changed, hooks, s.peft)
