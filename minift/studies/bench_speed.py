"""Which speed plan a ``minift bench`` row runs: ``minift train``'s (``training/speed.py``), per method.

On CUDA with no speed flag, bench runs each method as ``minift train`` would by default
(``minift.fast``, LoRA's merged forward, torch.compile under CUDA graphs where no hook runs
between steps); ``--speed eager`` and the compile/merged-forward flags override it. Each row
records its plan's ``describe()`` line, and ``variant_name`` the flags it ran with. ``cfg`` below
is a ``bench.BenchConfig`` (bench.py imports this module, so this one does not import it back).
"""
from __future__ import annotations

from dataclasses import replace
from minift.methods.spec import TrainHooks
from minift.models.bert import BertConfig
from minift.models.gpt import GPTConfig
from minift.models.llama import LlamaConfig
from minift.studies.presets import PRESETS
from minift.training import speed
from minift.training.speed import SpeedPlan


def task_of(model: str) -> str:
    """The task bench trains the preset ``model`` on: a BERT classifies, GPT and Llama are causal LMs."""
    return "classification" if isinstance(PRESETS[model], BertConfig) else "causal-lm"


def check_lora_backward(cfg) -> None:
    """Refuse the flags that change the backward of LoRA's merged forward on a run that does not take
    that forward (the plan's choice unless ``lora_merged_forward`` says), and the two together
    (``fast.mlp``'s down_proj has no factor kernel)."""
    merged = cfg.lora_merged_forward if cfg.lora_merged_forward is not None else \
        cfg.speed == "default" and cfg.fast and cfg.device.startswith("cuda")
    asked = [f for f, on in (("--lora-factor-kernel", cfg.lora_factor_kernel),
                             ("--lora-recompute-act", cfg.lora_recompute_act)) if on]
    if asked and not merged:
        raise ValueError(f"{asked[0]} is a backward of LoRA's merged forward, which this run does not take: "
                         "add --lora-merged-forward")
    if len(asked) == 2:
        raise ValueError("--lora-recompute-act runs down_proj without the factor kernel: give one of the two")


def speed_plan(cfg, method: str, hooks: TrainHooks) -> SpeedPlan:
    """The speed choices of one method's row: ``minift.training.speed.plan``, called as ``minift
    train`` calls it on ``cfg.device``, with bench's explicit settings as the given ones.

    Bench keeps ``minift.fast``'s pieces on on every device, the CPU included
    (``fast=False`` turns them off); ``speed="eager"`` asks for no compile and LoRA's addmm
    forward; ``compile``, ``compile_mode``, ``lora_merged_forward`` and ``lora_recompute_act``, when
    not None, override the plan's choice (``lora_recompute_act`` on any device and mode; left to the
    plan, it is off with ``lora_factor_kernel``). Bench's batches have one shape already, so none is
    padded. ``bench.build`` turns ``recompute_act`` off where no MLP recomputes (``fast.mlp.recomputing``).

    Args:
        cfg: the bench's settings.
        method: the method's name.
        hooks: the method's training hooks (``build_method(...).hooks``): a method with a hook
            between steps (AdaLoRA's allocator) runs eager unless ``compile`` says otherwise.
    Returns:
        The plan; ``describe()`` is the line each row records.
    """
    given = {}
    if cfg.speed == "eager":
        given["compile"] = False
    if cfg.compile is not None:
        given["compile"] = cfg.compile
    if cfg.compile_mode is not None:
        given["compile_mode"] = cfg.compile_mode
    if not cfg.fast:
        given["fast"] = False
    if cfg.lora_recompute_act is not None:
        given["recompute_act"] = cfg.lora_recompute_act
    cuda = cfg.device.startswith("cuda")
    p = speed.plan(device_type="cuda" if cuda else "cpu", method=method, hooks=hooks, task=task_of(cfg.model),
                   max_len=cfg.seq_len, given=given, merged_forward=bool(cfg.lora_merged_forward))
    if cfg.fast and not p.fast:  # the CPU: bench measures with minift.fast's pieces on
        p.fast = True
        p.notes.insert(0, "minift.fast on (cast once, fused loss, LoRA addmm forward)")
    merged = False if cfg.lora_merged_forward is None and cfg.speed == "eager" else cfg.lora_merged_forward
    if merged is not None:
        p.merged_lora = merged
        if method == "lora":
            p.notes.append(f"LoRA {'merged' if merged else 'addmm'} forward"
                           + (" (asked for)" if cfg.lora_merged_forward is not None else ""))
    if cfg.lora_recompute_act is not None:  # asked for: on any device, compiled or not
        p.recompute_act = cfg.lora_recompute_act
    elif cfg.lora_factor_kernel:  # asked for: down_proj keeps it (fast.mlp's has none)
        p.recompute_act = False
    p.recompute_act = p.recompute_act and p.merged_lora  # (bench.build keeps it where an MLP recomputes)
    if not p.compile and not any(n.startswith("eager") for n in p.notes):
        p.notes.append("eager, not compiled" + (" (asked for)" if "compile" in given else ""))
    if p.pad:
        p.pad = False
        p.notes = [n.replace(", batches padded to one shape", "") for n in p.notes]
    return p


def resolved(cfg, p: SpeedPlan):
    """``cfg`` with the plan's choices filled in: what one method's row ran with."""
    return replace(cfg, fast=p.fast, compile=p.compile, compile_mode=p.compile_mode, lora_merged_forward=p.merged_lora,
                   lora_recompute_act=p.recompute_act, lora_stack_qkv=p.stack_qkv)


def speed_meta(cfg) -> str:
    """The speed settings as given (each row records its method's plan)."""
    asked = [f"{k}={getattr(cfg, k)}" for k in ("fast", "compile", "compile_mode", "lora_merged_forward",
                                                 "lora_recompute_act")
             if getattr(cfg, k) is not None and (k != "fast" or not cfg.fast)]
    what = ("minift train's speed plan per method (minift.training.speed.plan)" if cfg.speed == "default"
            else "eager (no compile, LoRA addmm forward)")
    return what + (f"; set: {', '.join(asked)}" if asked else "")


def variant_name(cfg, method: str) -> str:
    """The optimization flags a row ran with, e.g. ``frozen_bf16+compile:reduce-overhead``."""
    flags = [k if k != "compile" or cfg.compile_mode in (None, "default") else f"compile:{cfg.compile_mode}"
             for k in ("frozen_bf16", "compile", "checkpointing", "plain_ce") if getattr(cfg, k)]
    if not cfg.fast:
        flags.append("no_fast")
    if cfg.lora_merged_forward and method == "lora":  # (``resolved``: the plan's choice)
        flags.append("merged_forward" + ("+factor_kernel" if cfg.lora_factor_kernel else "")
                     + ("+stacked_qkv" if cfg.lora_stack_qkv else "")
                     + ("+recompute_act" if cfg.lora_recompute_act else ""))
    if not cfg.fused_adamw and cfg.device.startswith("cuda") and method != "probe":
        flags.append("foreach_adamw")
    if cfg.sdpa_math:
        flags.append("sdpa_math")
    if cfg.dropout:
        flags.append(f"dropout{cfg.dropout:g}")
    if cfg.max_grad_norm is not None and method != "probe":
        flags.append(f"clip{cfg.max_grad_norm:g}")
    if cfg.activation_budget is not None and cfg.compile:
        flags.append(f"activation_budget{cfg.activation_budget:g}")
    if cfg.sync_each_step and cfg.device.startswith("cuda"):
        flags.append("sync_each_step")
    gpt_loss = isinstance(PRESETS[cfg.model], (GPTConfig, LlamaConfig)) and not cfg.plain_ce and method != "probe"
    if cfg.loss_chunk is not None and gpt_loss:  # the fused loss's option
        flags.append(f"loss_chunk={cfg.loss_chunk}")
    return "+".join(flags) or "eager-fp32-base"
