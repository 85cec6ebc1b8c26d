"""minift <-> Hugging Face names, for PEFT's layout: which HF module each minift module is
(GPT-2's fused ``c_attn`` holds q, k and v as three slots), which layers a PEFT config selects,
and a PEFT file's tensors split into adapter factors and whole-module tensors (modules_to_save),
keyed by HF name under ``PEFT_PREFIX``."""
from __future__ import annotations

import re

import torch
import torch.nn as nn

from minift.models.bert import Bert, BertClassifier, hf_key_map as bert_key_map
from minift.models.gpt import GPT, HF_LAYER as _GPT_LAYER
from minift.models.llama import Llama

PEFT_PREFIX = "base_model.model."


def _more(items) -> str:
    return f" (and {len(items) - 1} more)" if len(items) > 1 else ""


# ============================================================ module names

def module_map(model: nn.Module) -> dict[str, tuple[str, int | None]]:
    """minift module name -> (HF module name, slot). Slot is 0/1/2 for GPT-2's q/k/v, which HF
    fuses into one ``c_attn`` (rows [slot*C, (slot+1)*C) of its output), else None.

    GPT -> GPT2LMHeadModel (``transformer.h.{i}...``); Bert -> BertModel (``encoder.layer.{i}...``);
    BertClassifier -> BertForSequenceClassification (``bert.encoder.layer.{i}...``, ``classifier``);
    Llama -> LlamaForCausalLM (minift's names under ``model.``, ``lm_head`` as it is).
    """
    out: dict[str, tuple[str, int | None]] = {}
    if isinstance(model, Llama):
        for name, _ in model.named_modules():
            if name:
                out[name] = (name if name == "lm_head" or name.startswith("lm_head.") else f"model.{name}", None)
        return out
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
    raise TypeError(f"the PEFT layout knows minift's GPT, Llama, Bert and BertClassifier, not {type(model).__name__}; "
                    f"use layout='minift' for other models")


def hf_modules(mmap: dict) -> dict[str, list[tuple[str, int | None]]]:
    """``module_map`` inverted: HF module name -> [(minift name, slot)] (q/k/v share GPT-2's c_attn)."""
    inv: dict[str, list] = {}
    for name, (hf, slot) in mmap.items():
        inv.setdefault(hf, []).append((name, slot))
    return inv


def is_conv1d(model: nn.Module, hf_module: str) -> bool:
    """GPT-2's Conv1D layers store their weight as (in, out), transposed from nn.Linear's."""
    return isinstance(model, GPT) and hf_module.rsplit(".", 1)[-1] in ("c_attn", "c_proj", "c_fc")


def task_type(model: nn.Module) -> str:
    if isinstance(model, (GPT, Llama)):
        return "CAUSAL_LM"
    return "SEQ_CLS" if isinstance(model, BertClassifier) else "FEATURE_EXTRACTION"


# ============================================================ which layers a PEFT config selects

def peft_targeted(config: dict, model: nn.Module, mmap: dict) -> set[str] | None:
    """The Hugging Face names of this model's linear layers that a PEFT config's
    ``target_modules`` selects, as PEFT matches them (a string: a full match of the regular
    expression; a list: a name or a dotted suffix; less ``exclude_modules``; only the layers
    ``layers_to_transform`` / ``layers_pattern`` name). None when it cannot tell
    (``target_modules`` absent or "all-linear")."""
    targets = config.get("target_modules")
    if not targets or targets == "all-linear":
        return None

    def hit(spec, key):
        if isinstance(spec, str):
            return re.fullmatch(spec, key) is not None
        return key in spec or any(key.endswith("." + t) for t in spec)
    layers, patterns = config.get("layers_to_transform"), config.get("layers_pattern")
    patterns = [patterns] if isinstance(patterns, str) else (patterns or [None])
    out = set()
    for name, (hf, _) in mmap.items():
        if not hasattr(model.get_submodule(name), "in_features"):
            continue  # embeddings, LayerNorms: minift puts no LoRA there
        if not hit(targets, hf) or (config.get("exclude_modules") and hit(config["exclude_modules"], hf)):
            continue
        if layers is not None:
            index = None
            for p in patterns:
                m = re.match(r".*\.[^.]*\.(\d+)\." if p is None else rf".*\.{p}\.(\d+)\.", hf)
                if m:
                    index = int(m[1])
                    break
            if index is None or index not in ([layers] if isinstance(layers, int) else layers):
                continue
        out.add(hf)
    return out


def pattern_value(pattern: dict, hf_module: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: a key matches a module name or its dotted suffix."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", hf_module):
            return value
    return default


def require_targets(config: dict, model: nn.Module, mmap: dict, found, what: str) -> None:
    """Every layer the PEFT config targets has ``what`` tensors in the file (``found``: the
    Hugging Face names that have some): a file lacking one would load as a partial adapter."""
    targeted = peft_targeted(config, model, mmap)
    missing = sorted(targeted - set(found)) if targeted is not None else []
    if missing:
        raise ValueError(f"adapter file has no {what} tensors for {missing[0]!r}{_more(missing)}, which "
                         f"target_modules selects: the file is incomplete")


def require_modules_to_save(model: nn.Module, mmap: dict, names, found, prefix: str) -> None:
    """Every parameter of each module PEFT's ``modules_to_save`` names (those this model has) is
    in the file (``found``: Hugging Face parameter keys without ``prefix``)."""
    if isinstance(names, str):
        names = [names]
    missing = []
    for name, (hf, slot) in mmap.items():
        if slot is None and any(hf == n or hf.endswith("." + n) for n in names or ()):
            mod = model.get_submodule(name)
            missing += [f"{prefix}{hf}.{p}" for p in ("weight", "bias")
                        if isinstance(getattr(mod, p, None), torch.Tensor) and f"{hf}.{p}" not in found]
    if missing:
        raise ValueError(f"adapter file has no tensor {missing[0]!r}{_more(missing)}, which modules_to_save "
                         f"names: the file is incomplete")


# ============================================================ a PEFT file's tensors

def split_peft_tensors(model: nn.Module, tensors: dict, inv: dict, parts: str, kind: str) -> tuple[dict, dict]:
    """A PEFT file's tensors, keyed without PEFT_PREFIX: ({HF module: {part: tensor}} for the
    ``kind`` adapter's factors, whose names the regular expression ``parts`` matches, and {HF key:
    tensor} for the rest, the modules_to_save). ValueError for a key without the prefix, or
    factors on a module this model does not have (``inv``: see ``hf_modules``)."""
    on = kind if kind == "AdaLoRA" else f"a {kind}"  # "AdaLoRA on 'x'", "a LoRA on 'x'"
    factors: dict[str, dict] = {}
    extra: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if not key.startswith(PEFT_PREFIX):
            raise ValueError(f"adapter tensor {key!r} does not start with {PEFT_PREFIX!r}; not a PEFT {kind} file")
        key = key[len(PEFT_PREFIX):]
        m = re.fullmatch(rf"(.+)\.({parts})(\.weight)?", key)
        if not m:
            extra[key] = t
        elif m[1] not in inv:
            raise ValueError(f"adapter has {on} on {m[1]!r}, which this {type(model).__name__} does not "
                             f"have: the adapter was saved for a model of another shape")
        else:
            factors.setdefault(m[1], {})[m[2]] = t
    return factors, extra


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


def modules_to_save_names(inv: dict, extra: dict) -> tuple[str, ...]:
    """The minift modules that a PEFT file's modules_to_save tensors (``extra``, HF keys) belong to."""
    names = []
    for hk in extra:
        mod = hk.rpartition(".")[0]
        if mod not in inv or inv[mod][0][1] is not None:
            raise ValueError(f"adapter tensor {PEFT_PREFIX + hk!r} matches no module of this model")
        names.append(inv[mod][0][0])
    return tuple(dict.fromkeys(names))


def modules_to_save_pairs(model: nn.Module, inv: dict[str, list], extra: dict[str, torch.Tensor]) -> list:
    """(dst, src, key, where) for a PEFT file's modules_to_save tensors (whole-module tensors, keyed
    by HF name without PEFT_PREFIX), for ``copy_all``; ``inv`` maps an HF module name to its
    [(minift name, slot)]. Copies nothing."""
    own = dict(model.named_parameters())
    pairs = []
    for hk, t in extra.items():
        mod, _, pname = hk.rpartition(".")
        if mod not in inv or inv[mod][0][1] is not None or f"{inv[mod][0][0]}.{pname}" not in own:
            raise ValueError(f"adapter tensor {PEFT_PREFIX + hk!r} matches no parameter of this model")
        key = f"{inv[mod][0][0]}.{pname}"
        transpose = pname == "weight" and is_conv1d(model, mod)
        if transpose and t.dim() != 2:
            raise ValueError(f"adapter tensor {PEFT_PREFIX + hk!r} has shape {tuple(t.shape)}; {key} expects a matrix")
        pairs.append((own[key], t.t() if transpose else t, hk, key))
    return pairs
