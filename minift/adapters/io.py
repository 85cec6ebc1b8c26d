"""Adapter files, the parts every method shares: the files on disk, the checks of a config,
copying tensors all or nothing, and undoing a failed load. ``minift.adapters`` dispatches;
``minift.adapters.<family>`` holds each method's layouts; ``minift.adapters.hf_names`` the
minift <-> Hugging Face names of PEFT's layout.

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
from safetensors.torch import save_file

from minift.files import InputError, MissingFile, check_floating, field, read_json, read_safetensors
from minift.methods.common import find_modules, set_submodule

LAYOUTS = ("peft", "minift")
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
MINIFT_FILES = ("minift_adapter.json", "adapter.safetensors")


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


def require_saved_params(model: nn.Module, names, tensors: dict) -> None:
    """A minift-layout file holds every parameter of the modules its config's modules_to_save names."""
    missing = [k for k in modules_to_save_params(model, names) if k not in tensors]
    if missing:
        raise ValueError(f"adapter file has no tensor {missing[0]!r}{_more(missing)}, which modules_to_save "
                         f"names: the file is incomplete")


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


def modules_to_save_params(model: nn.Module, names) -> dict[str, nn.Parameter]:
    """Full parameter key -> Parameter for every module named in ``names`` (exact last-name match)."""
    if not names:
        return {}
    out = {}
    for mname, m in find_modules(model, names, kind=nn.Module):
        for pname, p in m.named_parameters():
            out[f"{mname}.{pname}"] = p
    return out
