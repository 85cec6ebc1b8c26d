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

This module is the dispatch: an explicit if-chain over the kind of adapter the model carries /
the ``peft_type`` a file declares. What every method shares is in ``minift.adapters.io`` (the
files on disk, loading all or nothing) and ``minift.adapters.hf_names`` (the minift <-> Hugging
Face names); each method has its own module in
``minift.adapters.<family>`` with a save and a load function for each layout. LoRA
(``adapters/lora.py``) is the worked example; AdaLoRA (``adalora.py``) and prefix/prompt
tuning (``prompt_learning.py``) each add a module there and one branch here.
"""
from __future__ import annotations

import torch.nn as nn

from minift.adapters.adalora import (adalora_check_config, adalora_from_minift, adalora_from_peft,
                                     adalora_load_or_undo, adalora_to_minift, adalora_to_peft)
from minift.adapters.io import LAYOUTS, ConfigError, adapter_files, read_adapter, write_adapter
from minift.adapters.lora import (lora_check_config, lora_from_minift, lora_from_peft, lora_load_or_undo,
                                  lora_to_minift, lora_to_peft)
from minift.adapters.prompt_learning import (prompt_learning_check_config, prompt_learning_from_minift,
                                             prompt_learning_from_peft, prompt_learning_load_or_undo,
                                             prompt_learning_to_minift, prompt_learning_to_peft)
from minift.files import InputError, field
from minift.methods import adalora, lora


def adapter_kind(model: nn.Module) -> str:
    """The ``peft_type`` of the adapter a model carries, decided by isinstance checks."""
    if adalora.svd_modules(model):  # adapters/adalora.py
        return "ADALORA"
    if lora.lora_modules(model):
        return "LORA"
    if getattr(model, "prefix_encoder", None) is not None:  # adapters/prompt_learning.py
        return "PREFIX_TUNING"
    if getattr(model, "soft_prompt", None) is not None:  # adapters/prompt_learning.py
        return "PROMPT_TUNING"
    raise ValueError(f"{type(model).__name__} carries no adapter to save (apply a method first, "
                     f"e.g. minift.lora.apply(model, LoRAConfig()))")


def save_adapter(model: nn.Module, path, *, layout: str = "peft") -> None:
    """Write only the adapter (and modules-to-save) tensors of ``model`` to directory ``path``."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")
    kind = adapter_kind(model)
    if kind == "LORA":
        config, tensors = lora_to_peft(model) if layout == "peft" else lora_to_minift(model)
    elif kind == "ADALORA":  # adapters/adalora.py
        config, tensors = adalora_to_peft(model) if layout == "peft" else adalora_to_minift(model)
    elif kind in ("PREFIX_TUNING", "PROMPT_TUNING"):  # adapters/prompt_learning.py
        config, tensors = (prompt_learning_to_peft if layout == "peft" else prompt_learning_to_minift)(model, kind)
    else:
        raise NotImplementedError(f"saving a {kind} adapter is not implemented")
    write_adapter(path, config, tensors, layout)


def load_adapter(model: nn.Module, path) -> nn.Module:
    """Load an adapter directory (either layout, detected) into ``model`` in place and return it.
    A model without the adapter gets it applied first; one that has it must match its shape.

    A bad file (unreadable, a config field missing or of the wrong type, a tensor missing, of
    another shape or dtype, a rank the config contradicts) raises InputError naming that file,
    and a failed load leaves the model as it was."""
    layout, config, tensors = read_adapter(path)
    cfg_file, st_file = adapter_files(path, layout)
    kind = field(config, "peft_type", str, cfg_file)
    peft = layout == "peft"
    if kind == "LORA":
        check, load_or_undo, load = lora_check_config, lora_load_or_undo, lora_from_peft if peft else lora_from_minift
    elif kind == "ADALORA":  # adapters/adalora.py
        check, load_or_undo = adalora_check_config, adalora_load_or_undo
        load = adalora_from_peft if peft else adalora_from_minift
    elif kind in ("PREFIX_TUNING", "PROMPT_TUNING"):  # adapters/prompt_learning.py
        check, load_or_undo = prompt_learning_check_config, prompt_learning_load_or_undo
        load = prompt_learning_from_peft if peft else prompt_learning_from_minift
    else:
        raise InputError(f"{cfg_file}: adapter type {kind!r} is not supported (this minift loads: LORA, ADALORA, "
                         f"PREFIX_TUNING, PROMPT_TUNING)")
    check(config, layout, cfg_file)  # every field the loader reads has the type it needs
    try:
        load_or_undo(model, load, config, tensors)
    except InputError:
        raise
    except ConfigError as e:
        raise InputError(f"{cfg_file}: {' '.join(str(e).split())}") from None
    except ValueError as e:  # the loaders check the tensors against the model: name the tensor file
        raise InputError(f"{st_file}: {' '.join(str(e).split())}") from None
    return model
