"""Adapter files: save only what a method trained, load it back — in minift's own layout or PEFT's.

Two layouts, told apart by the file names in the directory:

  layout="peft"    adapter_config.json        + adapter_model.safetensors
                   keys "base_model.model.<Hugging Face module>.<param>", e.g.
                   base_model.model.transformer.h.0.attn.c_attn.lora_A.weight   (GPT-2)
                   base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight (BERT)
                   so ``peft.PeftModel.from_pretrained`` loads it onto the matching transformers model.
  layout="minift"  minift_adapter.json        + adapter.safetensors
                   keys are minift's own state-dict names (layers.0.attn.q_proj.lora_A); works for
                   any model, no name mapping.

The file is organised in sections. Sections 1-2 are shared by every method; section 3 is
the dispatch (an explicit if-chain over the kind of adapter the model carries / the
``peft_type`` a file declares); each method then has its own section with a save and a
load function for each layout. LoRA (section 4) is the worked example; AdaLoRA and
prefix/prompt tuning add their sections below it and one branch each in section 3.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from minift.methods import lora
from minift.methods.common import find_modules
from minift.models.bert import Bert, BertClassifier
from minift.models.gpt import GPT
from minift.models.hf import _GPT_LAYER, bert_key_map

LAYOUTS = ("peft", "minift")
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
MINIFT_FILES = ("minift_adapter.json", "adapter.safetensors")
PEFT_PREFIX = "base_model.model."


# ============================================================ 1. shared: files on disk

def write_adapter(path, config: dict, tensors: dict[str, torch.Tensor], layout: str) -> None:
    """Write the config JSON and the safetensors file, each atomically (temp file + os.replace),
    so a crash never leaves half a file behind."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg_name, st_name = PEFT_FILES if layout == "peft" else MINIFT_FILES
    tmp = path / (st_name + ".tmp")
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path / st_name)
    tmp = path / (cfg_name + ".tmp")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path / cfg_name)


def read_adapter(path) -> tuple[str, dict, dict[str, torch.Tensor]]:
    """(layout, config, tensors) from an adapter directory; the layout is detected from the files."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"adapter directory {path} does not exist")
    for layout, (cfg_name, st_name) in (("minift", MINIFT_FILES), ("peft", PEFT_FILES)):
        if (path / cfg_name).is_file():
            if not (path / st_name).is_file():
                raise FileNotFoundError(f"{path} has {cfg_name} but no {st_name}")
            try:
                config = json.loads((path / cfg_name).read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{path / cfg_name} is not valid JSON: {e}") from None
            return layout, config, load_file(str(path / st_name))
    found = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
    raise FileNotFoundError(f"{path} holds no adapter (expected {PEFT_FILES[0]} or {MINIFT_FILES[0]}; "
                            f"found: {found})")


def copy_checked(dst: torch.Tensor, src: torch.Tensor, key: str, where: str) -> None:
    """Copy an adapter tensor into a parameter; a shape mismatch is an error naming both."""
    if tuple(src.shape) != tuple(dst.shape):
        raise ValueError(f"adapter tensor {key!r} has shape {tuple(src.shape)} but {where} expects "
                         f"{tuple(dst.shape)}: the adapter was saved for a model of another shape")
    with torch.no_grad():
        dst.copy_(src)


# ============================================================ 2. shared: minift <-> Hugging Face names

def module_map(model: nn.Module) -> dict[str, tuple[str, int | None]]:
    """minift module name -> (HF module name, slot). Slot is 0/1/2 for GPT-2's q/k/v, which HF
    fuses into one ``c_attn`` (rows [slot*C, (slot+1)*C) of its output), else None.

    GPT -> GPT2LMHeadModel (``transformer.h.{i}...``); Bert -> BertModel (``encoder.layer.{i}...``);
    BertClassifier -> BertForSequenceClassification (``bert.encoder.layer.{i}...``, ``classifier``).
    """
    out: dict[str, tuple[str, int | None]] = {}
    if isinstance(model, GPT):
        for name in ("wte", "wpe", "ln_f"):
            out[name] = (f"transformer.{name}", None)
        for i in range(model.config.n_layer):
            for hk, mk in _GPT_LAYER.items():
                out[f"layers.{i}.{mk.rsplit('.', 1)[0]}"] = (f"transformer.h.{i}.{hk.rsplit('.', 1)[0]}", None)
            for slot, p in enumerate("qkv"):
                out[f"layers.{i}.attn.{p}_proj"] = (f"transformer.h.{i}.attn.c_attn", slot)
        return out
    if isinstance(model, (Bert, BertClassifier)):
        cls = isinstance(model, BertClassifier)
        bert = model.bert if cls else model
        pre = "bert." if cls else ""
        for hk, mk in bert_key_map(bert.config.n_layer).items():
            out[pre + mk.rsplit(".", 1)[0]] = (pre + hk.rsplit(".", 1)[0], None)
        if cls:
            out["classifier"] = ("classifier", None)
        return out
    raise TypeError(f"the PEFT layout knows minift's GPT, Bert and BertClassifier, not {type(model).__name__}; "
                    f"use layout='minift' for other models")


def is_conv1d(model: nn.Module, hf_module: str) -> bool:
    """GPT-2's Conv1D layers store their weight as (in, out), transposed from nn.Linear's."""
    return isinstance(model, GPT) and hf_module.rsplit(".", 1)[-1] in ("c_attn", "c_proj", "c_fc")


def task_type(model: nn.Module) -> str:
    if isinstance(model, GPT):
        return "CAUSAL_LM"
    return "SEQ_CLS" if isinstance(model, BertClassifier) else "FEATURE_EXTRACTION"


def hf_param_key(model: nn.Module, mmap: dict, key: str) -> tuple[str, bool]:
    """A full minift parameter key -> (HF key without PEFT_PREFIX, transposed?) for a whole
    module's parameter (used for ``modules_to_save``)."""
    mod, _, pname = key.rpartition(".")
    if mod not in mmap:
        raise ValueError(f"{key!r} has no Hugging Face counterpart; save with layout='minift'")
    hf, slot = mmap[mod]
    if slot is not None:
        raise ValueError(f"{mod} is part of GPT-2's fused c_attn and cannot be a module to save in the "
                         f"PEFT layout; save with layout='minift'")
    return f"{hf}.{pname}", pname == "weight" and is_conv1d(model, hf)


def pattern_value(pattern: dict, hf_module: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: a key matches a module name or its dotted suffix."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", hf_module):
            return value
    return default


def modules_to_save_params(model: nn.Module, names) -> dict[str, nn.Parameter]:
    """Full parameter key -> Parameter for every module named in ``names`` (exact last-name match)."""
    if not names:
        return {}
    out = {}
    for mname, m in find_modules(model, names, kind=nn.Module):
        for pname, p in m.named_parameters():
            out[f"{mname}.{pname}"] = p
    return out


# ============================================================ 3. dispatch

def adapter_kind(model: nn.Module) -> str:
    """The ``peft_type`` of the adapter a model carries, decided by isinstance checks."""
    # ADALORA: another section checks for its SVD layers here (before LoRA if they subclass LoRALinear).
    if lora.lora_modules(model):
        return "LORA"
    # PREFIX_TUNING / PROMPT_TUNING: their section checks model.prefix_encoder / model.soft_prompt here.
    raise ValueError(f"{type(model).__name__} carries no adapter to save (apply a method first, "
                     f"e.g. minift.lora.apply(model, LoRAConfig()))")


def save_adapter(model: nn.Module, path, *, layout: str = "peft") -> None:
    """Write only the adapter (and modules-to-save) tensors of ``model`` to directory ``path``."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")
    kind = adapter_kind(model)
    if kind == "LORA":
        config, tensors = lora_to_peft(model) if layout == "peft" else lora_to_minift(model)
    else:
        raise NotImplementedError(f"saving a {kind} adapter is not implemented")
    write_adapter(path, config, tensors, layout)


def load_adapter(model: nn.Module, path) -> nn.Module:
    """Load an adapter directory (either layout, detected) into ``model`` in place and return it.
    A model without the adapter gets it applied first; one that has it must match its shape."""
    layout, config, tensors = read_adapter(path)
    kind = config.get("peft_type")
    if kind == "LORA":
        (lora_from_peft if layout == "peft" else lora_from_minift)(model, config, tensors)
    else:
        raise ValueError(f"{path}: adapter type {kind!r} is not supported (this minift loads: LORA)")
    return model


# ============================================================ 4. LoRA (the worked example)
# minift layout: the LoRAConfig as JSON plus every module's own (r, alpha), keys as in
# minift's state dict. PEFT layout: see lora_to_peft below.

def _lora_config_of(model: nn.Module, mods) -> lora.LoRAConfig:
    cfg = getattr(model, "lora_config", None)
    if cfg is not None:
        return cfg
    m0 = mods[0][1]  # a model whose config attribute was dropped: rebuild one from the layers
    return lora.LoRAConfig(r=m0.r, alpha=m0.alpha, targets=tuple(n for n, _ in mods), rslora=m0.rslora,
                           dora=m0.dora, init=m0.init,
                           dropout=m0.dropout.p if isinstance(m0.dropout, nn.Dropout) else 0.0)


def lora_to_minift(model: nn.Module) -> tuple[dict, dict]:
    mods = lora.lora_modules(model)
    cfg = _lora_config_of(model, mods)
    tensors = {f"{n}.{pn}": p for n, m in mods for pn, p in m.named_parameters() if pn.startswith("lora_")}
    tensors.update(modules_to_save_params(model, cfg.modules_to_save))
    c = asdict(cfg)
    c["targets"], c["modules_to_save"] = list(cfg.targets), list(cfg.modules_to_save)
    config = {"format": "minift", "peft_type": "LORA", "config": c,
              "modules": {n: {"r": m.r, "alpha": m.alpha} for n, m in mods}}
    return config, tensors


def lora_from_minift(model: nn.Module, config: dict, tensors: dict) -> None:
    modules = config["modules"]
    if not lora.lora_modules(model):
        cfg = lora.LoRAConfig(**{**config["config"], "targets": tuple(modules)})
        lora.apply(model, cfg, ranks={n: (v["r"], v["alpha"]) for n, v in modules.items()})
        model.lora_config = lora.LoRAConfig(**config["config"])
    have = dict(lora.lora_modules(model))
    for n, v in modules.items():
        if n not in have:
            raise ValueError(f"adapter has a LoRA on {n!r}, which this model does not have as a LoRA layer")
        if have[n].merged:
            raise ValueError(f"{n} is merged; call lora.unmerge(model) before loading an adapter")
    own = dict(model.named_parameters())
    for key, t in tensors.items():
        if key not in own:
            raise ValueError(f"adapter tensor {key!r} has no place in this model (was it saved for another model?)")
        copy_checked(own[key], t, key, key.rpartition(".")[0])


def lora_to_peft(model: nn.Module) -> tuple[dict, dict]:
    raise NotImplementedError("PEFT layout export lands next")


def lora_from_peft(model: nn.Module, config: dict, tensors: dict) -> None:
    raise NotImplementedError("PEFT layout import lands next")


# ============================================================ 5. AdaLoRA  (peft_type "ADALORA")
# Its engineer adds: a branch in adapter_kind / save_adapter / load_adapter, and here
# adalora_to_peft / adalora_from_peft / adalora_to_minift / adalora_from_minift, reusing
# write_adapter, read_adapter, module_map, copy_checked and PEFT_PREFIX.


# ============================================================ 6. prefix tuning and prompt tuning
#    (peft_type "PREFIX_TUNING" / "PROMPT_TUNING")
# Their engineer adds the same: branches in section 3 and save/load functions here.
