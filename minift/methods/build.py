"""From a method name and its options (CLI flags or TOML keys) to an adapted model.

    build_method(model, "lora", {"r": 16, "targets": ("q_proj", "v_proj")}, lr=1e-4)
        -> MethodState(changed=[...], config=LoRAConfig(...), param_groups=None, ...)

An explicit if-chain, one branch per method: each option name is a field of that method's
config dataclass (``--r`` -> ``LoRAConfig.r``), so flags map one-to-one onto configs. The
returned ``MethodState`` carries the training-loop hooks the method needs (AdaLoRA's
allocator, orthogonal penalty and batched factors, a gradual unfreezer, LoRA+ or
discriminative parameter groups); ``train`` receives them as keyword arguments. An option
the chosen method does not use is an error, so ``--method full --r 8`` never silently
ignores ``--r``.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields

import torch.nn as nn

from minift.methods.common import count_trainable
from minift.models.bert import BertClassifier

METHODS = ("full", "lora", "dora", "adalora", "prefix", "prompt", "freeze", "bitfit")

# Options that are not config fields: LoRA+ (lr_ratio), LoRA's merged forward (merged_forward),
# discriminative lrs (lr_decay) and ULMFiT gradual unfreezing (unfreeze_every, start_layers, group_size).
EXTRA = {"full": ("lr_decay",), "lora": ("lr_ratio", "merged_forward"), "dora": ("lr_ratio",),
         "freeze": ("lr_decay", "unfreeze_every", "start_layers", "group_size")}


@dataclass
class MethodState:
    method: str
    changed: list[str]                  # what the method's apply returned
    config: object | None = None        # its config dataclass (None for full and bitfit)
    peft: bool = True                   # False: full fine-tuning, checkpoints hold every weight
    param_groups: list[dict] | None = None
    allocator: object | None = None     # AdaLoRA's RankAllocator: .step(model, step)
    penalty: Callable | None = None     # AdaLoRA's weighted orthogonal penalty: penalty(model)
    forward_context: Callable | None = None  # AdaLoRA's batched_factors: with it(model): forward, penalty
    unfreezer: object | None = None     # freeze.GradualUnfreezer: .step(step)
    options: dict = field(default_factory=dict)  # the options used (to rebuild for eval)

    def train_hooks(self) -> dict:
        """Keyword arguments for ``minift.training.loop.train``."""
        return dict(param_groups=self.param_groups, allocator=self.allocator, penalty=self.penalty,
                    unfreezer=self.unfreezer, forward_context=self.forward_context)

    def trainable(self, model: nn.Module) -> tuple[int, int]:
        return count_trainable(model)


def build_method(model: nn.Module, method: str, args: Mapping | None = None, *, tokenizer=None,
                 lr: float = 1e-4, weight_decay: float = 0.0, total_steps: int | None = None) -> MethodState:
    """Apply ``method`` to ``model`` in place with the options in ``args`` (None = default)."""
    opts = {k: v for k, v in dict(args or {}).items() if v is not None}
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    head = ("classifier",) if isinstance(model, BertClassifier) else ()  # a new head must train
    used: set[str] = set(EXTRA.get(method, ()))

    def config(cls, **fixed):
        names = {f.name for f in fields(cls)}
        used.update(names)
        kw = {k: v for k, v in opts.items() if k in names}
        if "modules_to_save" in names and "modules_to_save" not in kw and head:
            kw["modules_to_save"] = head
        return cls(**{**kw, **fixed})

    def check_head(cfg):
        """A new classification head trains in full; a low-rank update of its random weight is refused."""
        hit = [t for t in cfg.targets if head and (t == "classifier" or t.endswith(".classifier"))]
        if hit:
            raise ValueError(f"--targets {hit[0]}: the classification head is new (randomly initialized) and "
                             f"trains in full as a module to save (--modules-to-save classifier, the default); "
                             f"{method} adapts pretrained layers only, so drop it from --targets")

    def check_unused():
        extra = sorted(set(opts) - used)
        if extra:
            allowed = ", ".join("--" + n.replace("_", "-") for n in sorted(used)) or "none"
            raise ValueError(f"--{extra[0].replace('_', '-')} does not apply to --method {method} "
                             f"(its options: {allowed})")

    if method == "full":
        from minift.methods import full
        check_unused()
        st = MethodState(method, full.apply(model), peft=False)
        if "lr_decay" in opts:
            from minift.methods import freeze
            st.param_groups = freeze.discriminative_param_groups(model, lr, opts["lr_decay"])
    elif method in ("lora", "dora"):
        from minift.methods import lora
        cfg = config(lora.LoRAConfig, **({"dora": True} if method == "dora" else {}))
        check_unused()
        check_head(cfg)
        if opts.get("merged_forward") and cfg.dropout > 0:
            raise ValueError(f"--merged-forward needs --dropout 0 (LoRA dropout acts on the adapter's input "
                             f"only, which the merged weight cannot do); got --dropout {cfg.dropout}")
        if opts.get("merged_forward") and cfg.dora:
            raise ValueError("--merged-forward covers plain LoRA only; DoRA's magnitude scaling keeps the exact "
                             "path (drop --merged-forward or --dora)")
        st = MethodState(method, lora.apply(model, cfg), cfg)
        if opts.get("merged_forward") and not lora.set_merged_forward(model):
            raise ValueError("--merged-forward found no LoRA layer it can run merged (a trained base weight?)")
        if "lr_ratio" in opts:
            st.param_groups = lora.param_groups(model, lr, opts["lr_ratio"], weight_decay)
    elif method == "adalora":
        from minift.methods import adalora, adalora_alloc
        steps = {"total_step": total_steps} if total_steps and "total_step" not in opts else {}
        cfg = config(adalora.AdaLoRAConfig, **steps)
        check_unused()
        check_head(cfg)
        st = MethodState(method, adalora.apply(model, cfg), cfg)
        st.allocator = adalora_alloc.RankAllocator(model, cfg)
        w = cfg.orth_reg_weight
        st.penalty = (lambda m: w * adalora.orth_penalty(m)) if w > 0 else None
        st.forward_context = adalora.batched_factors
    elif method == "prefix":
        from minift.methods import prefix
        cfg = config(prefix.PrefixConfig)
        check_unused()
        st = MethodState(method, prefix.apply(model, cfg, tokenizer=tokenizer), cfg)
    elif method == "prompt":
        from minift.methods import prompt
        cfg = config(prompt.PromptConfig)
        check_unused()
        st = MethodState(method, prompt.apply(model, cfg, tokenizer=tokenizer), cfg)
    elif method == "freeze":
        from minift.methods import freeze
        if "unfreeze_every" in opts:  # ULMFiT: start with the top, unfreeze downward over time
            used.add("modules_to_save")
            check_unused()
            kw = {k: opts[k] for k in ("start_layers", "group_size") if k in opts}
            unfreezer = freeze.GradualUnfreezer(model, opts["unfreeze_every"], **kw,
                                                modules_to_save=opts.get("modules_to_save", head))
            st = MethodState(method, [n for n, p in model.named_parameters() if p.requires_grad],
                             unfreezer=unfreezer)
        else:
            cfg = config(freeze.FreezeConfig)
            check_unused()
            st = MethodState(method, freeze.apply(model, cfg), cfg)
        if "lr_decay" in opts:
            st.param_groups = freeze.discriminative_param_groups(
                model, lr, opts["lr_decay"], trainable_only=st.unfreezer is None)
    else:  # bitfit
        from minift.methods import freeze
        used.add("modules_to_save")
        check_unused()
        st = MethodState(method, freeze.bitfit(model, opts.get("modules_to_save", head)))
    st.options = opts
    return st
