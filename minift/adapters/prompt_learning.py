"""Prefix tuning and prompt tuning adapter files (peft_type "PREFIX_TUNING" / "PROMPT_TUNING"):
a save and a load function for each layout, and the undo that leaves a model as it was when a
load fails."""
from __future__ import annotations

import dataclasses
from dataclasses import asdict

import torch.nn as nn

from minift.adapters.hf_names import hf_param_key, is_conv1d, module_map, require_modules_to_save, task_type
from minift.adapters.io import ConfigError, copy_all, modules_to_save_params, require_saved_params, settings_of
from minift.files import InputError, field
from minift.methods import prefix, prompt


# Both learn one table: prefix tuning (P, 2 * n_layer * n_kv_head * head_dim) — per virtual
# token, layer by layer, the key then the value, each n_kv_head x head_dim — and prompt tuning
# (P, n_embd). PEFT stores it as the single tensor "prompt_embeddings" (for a reparameterized
# prefix: the table the MLP computes, as prefix.export does) and modules to save under
# "base_model.<HF name>" (no ".model": a prompt-learning PeftModel wraps the transformers model
# directly). The minift layout keeps the module's own tensors (the MLP too, so training can resume).
#
# PEFT's config describes the table by token_dim and num_attention_heads. For a prompt they are
# the model's width and query heads; for a prefix on a model with grouped-query attention
# (transformers' config has num_key_value_heads) PEFT sets them to the key/value heads and
# their width (head_dim * num_key_value_heads), the shape of its cache: so minift's prefix writes
# and checks n_kv_head and n_kv_head * head_dim, which for GPT-2 and BERT are n_head and n_embd.

PEFT_PROMPT_PREFIX = "base_model."
_PEFT_PROMPT_INIT = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB"}  # "text": see prompt_learning_to_peft


def _virtual_module(model: nn.Module, kind: str):
    return model.prefix_encoder if kind == "PREFIX_TUNING" else model.soft_prompt


def _peft_dims(model: nn.Module, kind: str) -> dict:
    """The shape fields of PEFT's config for a ``kind`` table on ``model`` (see above)."""
    d = prefix.model_dims(model)
    if kind == "PREFIX_TUNING":
        return {"num_layers": d.n_layer, "token_dim": d.n_kv_head * d.head_dim, "num_attention_heads": d.n_kv_head}
    return {"num_layers": d.n_layer, "token_dim": d.n_embd, "num_attention_heads": d.n_head}


def prompt_learning_check_config(config: dict, layout: str, where) -> None:
    """The fields the prefix/prompt loaders read have the types they need: InputError naming ``where``."""
    if layout == "minift":
        cls = prefix.PrefixConfig if config["peft_type"] == "PREFIX_TUNING" else prompt.PromptConfig
        settings_of(cls, field(config, "config", dict, where), where)
        return
    for name in ("num_virtual_tokens", "num_transformer_submodules", "num_layers", "token_dim",
                 "num_attention_heads"):
        value = field(config, name, int, where, default=None)
        if value is not None and value < 1:
            raise InputError(f"{where}: field {name!r} must be >= 1, got {value}")
    mts = field(config, "modules_to_save", (str, list), where, default=None)
    if isinstance(mts, list) and not all(isinstance(t, str) for t in mts):
        raise InputError(f"{where}: field 'modules_to_save' must be a string or a list of strings")


def prompt_learning_to_peft(model: nn.Module, kind: str) -> tuple[dict, dict]:
    dims = _peft_dims(model, kind)
    mod = _virtual_module(model, kind)
    cfg = mod.config
    table = mod.table() if kind == "PREFIX_TUNING" else mod.embedding  # (P, 2LD) or (P, C)
    tensors = {"prompt_embeddings": table.detach()}
    mmap, to_save = module_map(model), set()
    for key, p in modules_to_save_params(model, cfg.modules_to_save).items():
        hk, transpose = hf_param_key(model, mmap, key)
        tensors[PEFT_PROMPT_PREFIX + hk] = p.t() if transpose else p
        to_save.add(hk.rpartition(".")[0])
    config = {"peft_type": kind, "task_type": task_type(model), "num_virtual_tokens": mod.num_virtual_tokens,
              **dims, "num_transformer_submodules": 1, "modules_to_save": sorted(to_save) or None,
              "inference_mode": True, "base_model_name_or_path": None, "revision": None}
    if kind == "PREFIX_TUNING":
        config.update(prefix_projection=cfg.projection_dim is not None, init_weights=None,
                      encoder_hidden_size=cfg.projection_dim or dims["token_dim"])
    else:  # PEFT's TEXT init needs a tokenizer it can load by name; the init no longer matters once trained
        config.update(prompt_tuning_init=_PEFT_PROMPT_INIT.get(cfg.init, "RANDOM"), prompt_tuning_init_text=None,
                      tokenizer_name_or_path=None, tokenizer_kwargs=None)
    return config, tensors


def prompt_learning_from_peft(model: nn.Module, config: dict, tensors: dict) -> None:
    kind = config["peft_type"]
    if (config.get("num_transformer_submodules") or 1) != 1:
        raise ConfigError("adapter was saved for an encoder-decoder model (num_transformer_submodules=2)")
    for k, v in _peft_dims(model, kind).items():
        if config.get(k) is not None and config[k] != v:
            raise ConfigError(f"adapter has {k}={config[k]}, this model has {v}: saved for a model of another shape")
    if "prompt_embeddings" not in tensors:
        raise ValueError(f"adapter file has no 'prompt_embeddings' tensor; not a PEFT {kind} file")
    table = tensors["prompt_embeddings"]
    if table.dim() != 2:
        raise ValueError(f"adapter tensor 'prompt_embeddings' has shape {tuple(table.shape)}; it must be a "
                         f"table (num_virtual_tokens, width)")
    P = table.shape[0]
    if (config.get("num_virtual_tokens") or P) != P:
        raise ConfigError(f"the config says num_virtual_tokens={config['num_virtual_tokens']}, but "
                          f"prompt_embeddings in the adapter file has {P} rows")
    mmap = module_map(model)
    inv = {hf: name for name, (hf, slot) in mmap.items() if slot is None}
    extra, found = {}, set()
    for key, t in tensors.items():
        if key == "prompt_embeddings":
            continue
        hk = key[len(PEFT_PROMPT_PREFIX):] if key.startswith(PEFT_PROMPT_PREFIX) else key
        mod_hf, _, pname = hk.rpartition(".")
        if mod_hf not in inv:
            raise ValueError(f"adapter tensor {key!r} matches no module of this model")
        transpose = pname == "weight" and is_conv1d(model, mod_hf)
        if transpose and t.dim() != 2:
            raise ValueError(f"adapter tensor {key!r} has shape {tuple(t.shape)}; {inv[mod_hf]} expects a matrix")
        extra[f"{inv[mod_hf]}.{pname}"] = t.t() if transpose else t
        found.add(hk)
    require_modules_to_save(model, mmap, config.get("modules_to_save"), found, PEFT_PROMPT_PREFIX)
    mts = tuple(dict.fromkeys(k.rpartition(".")[0] for k in extra))
    attr = "prefix_encoder" if kind == "PREFIX_TUNING" else "soft_prompt"
    if getattr(model, attr, None) is None:
        if kind == "PREFIX_TUNING":
            prefix.apply(model, prefix.PrefixConfig(num_virtual_tokens=P, modules_to_save=mts))
        else:
            prompt.apply(model, prompt.PromptConfig(num_virtual_tokens=P, modules_to_save=mts))
    mod = getattr(model, attr)
    if kind == "PREFIX_TUNING" and mod.transform is not None:
        raise ValueError("the model's prefix encoder is reparameterized (projection_dim set) and a PEFT file "
                         "holds only the table: call prefix.export(model) first, or load into a model "
                         "without a prefix_encoder")
    own = dict(model.named_parameters())
    missing = [k for k in extra if k not in own]
    if missing:
        raise ValueError(f"adapter tensor for {missing[0]!r} matches no parameter of this model")
    copy_all([(mod.embedding, table, "prompt_embeddings", f"{attr}.embedding")]
              + [(own[k], t, k, k) for k, t in extra.items()])


def prompt_learning_to_minift(model: nn.Module, kind: str) -> tuple[dict, dict]:
    mod = _virtual_module(model, kind)
    attr = "prefix_encoder" if kind == "PREFIX_TUNING" else "soft_prompt"
    tensors = {f"{attr}.{n}": p for n, p in mod.named_parameters()}
    tensors.update(modules_to_save_params(model, mod.config.modules_to_save))
    c = asdict(mod.config)
    c["modules_to_save"] = list(mod.config.modules_to_save)
    return {"format": "minift", "peft_type": kind, "config": c}, tensors


def prompt_learning_from_minift(model: nn.Module, config: dict, tensors: dict) -> None:
    kind = config["peft_type"]
    attr = "prefix_encoder" if kind == "PREFIX_TUNING" else "soft_prompt"
    if getattr(model, attr, None) is None:  # apply with a random init: the file overwrites it
        if kind == "PREFIX_TUNING":
            cfg = prefix.PrefixConfig(**config["config"])
            prefix.apply(model, dataclasses.replace(cfg, init="random", init_text=None))
        else:
            cfg = prompt.PromptConfig(**config["config"])
            prompt.apply(model, dataclasses.replace(cfg, init="random", init_text=None))
        getattr(model, attr).config = cfg  # keep the recorded config (its init included)
    own = dict(model.named_parameters())
    unknown = [k for k in tensors if k not in own]
    if unknown:
        raise ValueError(f"adapter tensor {unknown[0]!r} has no place in this model (a reparameterized prefix "
                         f"and a plain one have different tensors; was it saved for another model?)")
    missing = [f"{attr}.{n}" for n, _ in getattr(model, attr).named_parameters() if f"{attr}.{n}" not in tensors]
    if missing:
        raise ValueError(f"adapter file has no tensor {missing[0]!r}"
                         f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}, which this model's "
                         f"{attr} needs: the file is incomplete")
    require_saved_params(model, config["config"].get("modules_to_save"), tensors)
    copy_all([(own[k], t, k, k) for k, t in tensors.items()])


def prompt_learning_load_or_undo(model: nn.Module, load, config: dict, tensors: dict) -> None:
    """Run a loader; if it attached a prefix encoder / soft prompt to a plain model and then
    failed, take it off again and restore the requires_grad flags: the model is as it was."""
    attr = "prefix_encoder" if config["peft_type"] == "PREFIX_TUNING" else "soft_prompt"
    fresh = getattr(model, attr, None) is None
    flags = {id(p): p.requires_grad for p in model.parameters()}
    try:
        load(model, config, tensors)
    except Exception:
        if fresh and getattr(model, attr, None) is not None:
            delattr(model, attr)
            for p in model.parameters():
                p.requires_grad_(flags.get(id(p), p.requires_grad))
        raise
