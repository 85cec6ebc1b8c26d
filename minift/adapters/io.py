"""Adapter files, the parts every method shares: the files on disk and the minift <-> Hugging Face
names. ``minift.adapters`` dispatches; ``minift.adapters.<family>`` holds each method's layouts.

Errors: reading the files raises InputError naming the file (``minift.files``). The loaders
see only the parsed config and tensors, so they raise ValueError (``ConfigError`` when the
config is at fault) and ``load_adapter`` turns it into an InputError naming the safetensors
file (the config file for a ConfigError)."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from minift.files import InputError, MissingFile, check_floating, field, read_json, read_safetensors
from minift.methods.common import find_modules, set_submodule
from minift.models.bert import Bert, BertClassifier
from minift.models.gpt import GPT
from minift.models.hf import _GPT_LAYER, bert_key_map

LAYOUTS = ("peft", "minift")
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
MINIFT_FILES = ("minift_adapter.json", "adapter.safetensors")
PEFT_PREFIX = "base_model.model."


# ============================================================ files on disk

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


class ConfigError(ValueError):
    """A loader's complaint about the adapter's JSON config (``load_adapter`` names that file)."""


def read_adapter(path) -> tuple[str, dict, dict[str, torch.Tensor]]:
    """(layout, config, tensors) from an adapter directory; the layout is detected from the files.
    InputError naming the file if one is missing (a FileNotFoundError too), the config is not a
    JSON object, or the safetensors file is unreadable or holds a tensor that is not floating
    point (but for the minift layout's AdaLoRA ``lora_mask``, which is boolean)."""
    path = Path(path)
    if not path.is_dir():
        raise MissingFile(f"{path}: adapter directory does not exist")
    for layout, (cfg_name, st_name) in (("minift", MINIFT_FILES), ("peft", PEFT_FILES)):
        if (path / cfg_name).is_file():
            if not (path / st_name).is_file():
                raise MissingFile(f"{path / st_name}: does not exist ({path} has {cfg_name} but no {st_name})")
            config = read_json(path / cfg_name, "adapter config")
            tensors = read_safetensors(path / st_name, "adapter weights", floating=False)
            check_floating(path / st_name, tensors, skip=lambda k: layout == "minift" and k.endswith(".lora_mask"))
            return layout, config, tensors
    found = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
    raise MissingFile(f"{path}: holds no adapter (expected {PEFT_FILES[0]} or {MINIFT_FILES[0]}; "
                      f"found: {found})")


def adapter_files(path, layout: str) -> tuple[Path, Path]:
    """(config file, safetensors file) of an adapter directory in ``layout``."""
    return tuple(Path(path) / n for n in (PEFT_FILES if layout == "peft" else MINIFT_FILES))


def settings_of(cls, c, where, name: str = "config"):
    """``cls(**c)`` for a minift-layout config's recorded dataclass; InputError naming ``where``."""
    if not isinstance(c, dict):
        raise InputError(f"{where}: field {name!r} must be a JSON object")
    try:
        return cls(**c)
    except (TypeError, ValueError) as e:
        detail = " ".join(str(e).split())
        raise InputError(f"{where}: field {name!r} is not a valid {cls.__name__} ({detail})") from None


def check_pattern(config: dict, name: str, kind, where) -> dict:
    """A PEFT ``rank_pattern``/``alpha_pattern``: null or an object of ``kind`` values."""
    pattern = field(config, name, dict, where, default=None) or {}
    for k in pattern:
        field(pattern, k, kind, f"{where}: {name}")
        try:
            re.compile(k)
        except re.error as e:
            raise InputError(f"{where}: {name} key {k!r} is not a valid regular expression ({e})") from None
    return pattern


def check_peft_targets(config: dict, where) -> None:
    """The fields PEFT selects target layers with (see ``peft_targeted``) have the types it takes."""
    for name in ("target_modules", "exclude_modules", "modules_to_save"):
        v = field(config, name, (str, list), where, default=None)
        if isinstance(v, list) and not all(isinstance(t, str) for t in v):
            raise InputError(f"{where}: field {name!r} must be a string or a list of strings")
        if isinstance(v, str) and name != "modules_to_save":
            try:
                re.compile(v)
            except re.error as e:
                raise InputError(f"{where}: field {name!r} is not a valid regular expression ({e})") from None
    layers = field(config, "layers_to_transform", (int, list), where, default=None)
    if isinstance(layers, list) and not all(type(i) is int for i in layers):
        raise InputError(f"{where}: field 'layers_to_transform' must be an integer or a list of integers")
    pattern = field(config, "layers_pattern", (str, list), where, default=None)
    if isinstance(pattern, list) and not all(isinstance(t, str) for t in pattern):
        raise InputError(f"{where}: field 'layers_pattern' must be a string or a list of strings")


def _more(items) -> str:
    return f" (and {len(items) - 1} more)" if len(items) > 1 else ""


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


def require_saved_params(model: nn.Module, names, tensors: dict) -> None:
    """A minift-layout file holds every parameter of the modules its config's modules_to_save names."""
    missing = [k for k in modules_to_save_params(model, names) if k not in tensors]
    if missing:
        raise ValueError(f"adapter file has no tensor {missing[0]!r}{_more(missing)}, which modules_to_save "
                         f"names: the file is incomplete")


def copy_checked(dst: torch.Tensor, src: torch.Tensor, key: str, where: str) -> None:
    """Copy an adapter tensor into a parameter; a shape mismatch is an error naming both."""
    check_shape(dst, src, key, where)
    with torch.no_grad():
        dst.copy_(src)


def check_shape(dst: torch.Tensor, src: torch.Tensor, key: str, where: str) -> None:
    """Shape and kind of dtype: a float goes into a float, anything else only into its own dtype
    (``copy_`` would silently cast an integer tensor to float, or a float mask to bool)."""
    if tuple(src.shape) != tuple(dst.shape):
        raise ValueError(f"adapter tensor {key!r} has shape {tuple(src.shape)} but {where} expects "
                         f"{tuple(dst.shape)}: the adapter was saved for a model of another shape")
    if src.is_floating_point() != dst.is_floating_point() or (not dst.is_floating_point() and src.dtype != dst.dtype):
        raise ValueError(f"adapter tensor {key!r} has dtype {str(src.dtype).removeprefix('torch.')} but {where} "
                         f"needs {'a floating point tensor' if dst.is_floating_point() else dst.dtype}")


def copy_all(pairs) -> None:
    """Copy (dst, src, key, where) pairs, checking every shape before copying any: a bad file
    changes nothing. Every loader collects all its pairs and ends with this one call."""
    pairs = list(pairs)
    for dst, src, key, where in pairs:
        check_shape(dst, src, key, where)
    with torch.no_grad():
        for dst, src, _, _ in pairs:
            dst.copy_(src)


def check_layers(kind: str, have: dict, modules: dict, settings, tensors: dict, hint: str) -> None:
    """A minift adapter file and the model's ``kind`` layers must match one to one: every layer
    in the file exists here, unmerged, with the same ``settings(name, layer)`` ((what, file's,
    model's) triples), every layer here is in the file, and the file has each of its ``lora_``
    tensors. ``hint`` names the unmerge call."""
    a = "an" if kind[0] in "AEIOU" else "a"
    on = kind if kind == "AdaLoRA" else f"{a} {kind}"  # "AdaLoRA on 'x'", "a LoRA on 'x'"
    for n in modules:
        if n not in have:
            raise ValueError(f"adapter has {on} on {n!r}, which this model does not have as {a} {kind} layer")
        m = have[n]
        if m.merged:
            raise ValueError(f"{n} is merged; call {hint} before loading an adapter")
        for what, theirs, mine in settings(n, m):
            if theirs != mine:
                raise ValueError(f"{n}: the adapter file has {what}={theirs!r}, this model's {kind} layer has "
                                 f"{what}={mine!r}")
    for n, m in have.items():
        if n not in modules:
            raise ValueError(f"this model has {on} on {n!r}, the adapter file has none for it")
        for k in m.state_dict():
            if k.startswith("lora_") and f"{n}.{k}" not in tensors:
                raise ValueError(f"adapter file has no tensor {n}.{k}, which this model's {kind} layer needs")


def place_all(model: nn.Module, tensors: dict) -> None:
    """Copy tensors keyed by the model's own parameter/buffer names (``copy_all``: all or nothing)."""
    own = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    pairs = []
    for key, t in tensors.items():
        if key not in own:
            raise ValueError(f"adapter tensor {key!r} has no place in this model (was it saved for another model?)")
        pairs.append((own[key], t, key, key.rpartition(".")[0]))
    copy_all(pairs)


# ============================================================ undoing a failed load

_ABSENT = object()


def undo_point(model: nn.Module, config_attr: str, snapshot=()) -> dict:
    """What a loader may change on a model without adapters, kept so ``undo_fresh`` can put it
    back: the plain nn.Linear module objects (they hold the original weight Parameters), the
    requires_grad flags, ``model.<config_attr>``, and copies of the weights of the linear layers
    named in ``snapshot`` (for inits that rewrite the base weight, e.g. PiSSA's residual)."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    return {"linears": linears, "flags": {id(p): p.requires_grad for p in model.parameters()},
            "attr": getattr(model, config_attr, _ABSENT),
            "weights": {n: linears[n].weight.detach().clone() for n in snapshot if n in linears}}


def undo_fresh(model: nn.Module, point: dict, layer_type: type, config_attr: str) -> None:
    """Take out every ``layer_type`` layer a failed load applied, WITHOUT merging: the original
    nn.Linear goes back in its place (same weight/bias Parameters), snapshotted weights are
    restored bit for bit, and so are the requires_grad flags and ``model.<config_attr>``."""
    for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, layer_type)]:
        orig = point["linears"].get(name)
        if orig is None or orig.weight is not m.weight:  # not one we saw: a plain layer on the same tensors
            orig = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None,
                             device=m.weight.device, dtype=m.weight.dtype)
            orig.weight, orig.bias = m.weight, m.bias
        set_submodule(model, name, orig)
    with torch.no_grad():
        for name, w in point["weights"].items():
            point["linears"][name].weight.copy_(w)
    for p in model.parameters():
        p.requires_grad_(point["flags"].get(id(p), p.requires_grad))
    if point["attr"] is _ABSENT:
        if hasattr(model, config_attr):
            delattr(model, config_attr)
    else:
        setattr(model, config_attr, point["attr"])


# ============================================================ minift <-> Hugging Face names

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


def load_modules_to_save(model: nn.Module, inv: dict[str, list], extra: dict[str, torch.Tensor]) -> None:
    """Check, then copy, a PEFT file's modules_to_save tensors (see ``modules_to_save_pairs``)."""
    copy_all(modules_to_save_pairs(model, inv, extra))
