"""Hugging Face checkpoint directories: the generic reading and writing every model's loader uses.

A checkpoint directory holds ``config.json`` and ``model.safetensors`` (weights are only
ever read from safetensors: unpickling a checkpoint can run code). Each model file ends with
its own "loading" section (its config fields, its key map) built on the helpers here:
``read_config`` / ``read_weights`` read the files, ``check_fields`` refuses a config field
asking for a computation the model does not implement, ``size_field`` / ``rate_field`` read
numbers, ``load_into`` copies mapped tensors into a model, ``base_state`` and ``write`` save.

Every error about the files is an InputError (``minift.files``): one line naming the file
(and the field or tensor): unreadable or non-JSON config.json, a size field missing or not an
integer, unreadable safetensors, an integer or boolean weight (never cast to float), unknown
or missing keys and shape mismatches.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from minift.files import InputError, MissingFile, MissingKey, check_floating, field, read_json, read_safetensors

# Keys a checkpoint may carry that minift deliberately has no use for: non-persistent
# buffers older transformers versions saved, and pre-training heads of BERT checkpoints.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "embeddings.position_ids")
IGNORED_PREFIXES = ("cls.",)


# ---------------------------------------------------------------------------- reading

class ModelConfig(dict):
    """A config.json's fields, remembering the file they came from (``.source``): the models'
    config readers name it in their errors when called without a ``source``."""
    source = "config.json"


def read_config(path) -> ModelConfig:
    """The fields of ``path/config.json``. InputError naming the file if the directory or the
    file is missing (a FileNotFoundError too), or the file is not UTF-8 JSON holding an object."""
    path = Path(path)
    if not path.is_dir():
        raise MissingFile(f"{path}: model directory does not exist")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise MissingFile(f"{cfg_file}: does not exist (expected an HF-format model directory with "
                          f"config.json and model.safetensors)")
    raw = ModelConfig(read_json(cfg_file, "model config"))
    raw.source = str(cfg_file)
    return raw


def read_weights(path) -> dict[str, torch.Tensor]:
    """The tensors of ``path/model.safetensors``: InputError naming the file if it is missing,
    not safetensors, truncated, or holds a weight that is not floating point (the buffers of
    ``IGNORED_SUFFIXES``, e.g. BERT's int64 position_ids, are dropped later and may be anything)."""
    f = Path(path) / "model.safetensors"
    if not f.is_file():
        found = sorted(p.name for p in Path(path).iterdir()) if Path(path).is_dir() else []
        raise MissingFile(f"{f}: does not exist (found: {', '.join(found) or 'nothing'}); "
                          f"minift reads weights from safetensors only")
    sd = read_safetensors(f, "model weights", floating=False)
    check_floating(f, sd, skip=ignored)
    return sd


def ignored(key: str) -> bool:
    """True for a checkpoint key minift has no use for (``IGNORED_SUFFIXES``, ``IGNORED_PREFIXES``)."""
    return key.endswith(IGNORED_SUFFIXES) or key.startswith(IGNORED_PREFIXES)


def expect_type(raw: dict, model_type: str, path) -> None:
    got = raw.get("model_type")
    if got != model_type:
        raise InputError(f"{Path(path) / 'config.json'} has model_type {got!r}; this loader reads {model_type!r}")


def check_fields(raw: dict, table, model: str, source: str) -> None:
    """A one-line InputError naming the first field whose value the model does not implement.

    ``table`` rows are (field, default when absent, allowed values, what the model does instead):
    a checkpoint asking for anything else is refused, never loaded to compute something else."""
    for name, default, allowed, why in table:
        value = raw.get(name, default)
        if value is None:
            value = default
        if not any(type(value) is type(a) and value == a for a in allowed):  # true is not 1
            raise InputError(f"{source}: {name}={json.dumps(value)} is not supported for {model} ({why}; "
                             f"supported: {' or '.join(json.dumps(a) for a in allowed)})")


def size_field(raw: dict, name: str, source: str, model: str, default=...) -> int:
    """An integer size field (>= 1): missing or of another type is an error naming the field."""
    if name not in raw and default is ...:
        raise InputError(f"{source} has no {name!r} key (needed for a {model} model)")
    value = field(raw, name, int, source, default=default)
    if value < 1:
        raise InputError(f"{source}: field {name!r} must be >= 1, got {value}")
    return value


def rate_field(raw: dict, name: str, source: str, default: float, low: float, high: float) -> float:
    value = field(raw, name, float, source, default=default)
    if not low <= value < high:
        raise InputError(f"{source}: field {name!r} must be in [{low:g}, {high:g}), got {value}")
    return float(value)


def build_config(cls, source: str, **kw):
    """``cls(**kw)``, its ValueError (e.g. n_embd not divisible by n_head) an InputError naming ``source``."""
    try:
        return cls(**kw)
    except ValueError as e:
        raise InputError(f"{source}: {e}") from None


def strip_prefix(sd: dict, prefix: str) -> dict:
    """Drop a model-class prefix ('transformer.', 'bert.') if the checkpoint has one."""
    if any(k.startswith(prefix) for k in sd):
        return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}
    return sd


def load_into(model: torch.nn.Module, sd: dict, path, dtype) -> None:
    """Copy a checkpoint's tensors (already mapped to minift's names) into ``model``: a missing or
    unknown tensor (a MissingKey, which is also a KeyError) or a shape mismatch is an InputError
    naming the weights file and the tensor; nothing is copied unless everything matches."""
    f = Path(path) / "model.safetensors"
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    if missing:
        raise MissingKey(f"{f}: checkpoint is missing tensor {missing[0]!r}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unknown = [k for k in sd if k not in own]
    if unknown:
        raise InputError(f"{f}: checkpoint has unexpected tensor {unknown[0]!r}")
    for k, v in sd.items():
        if v.shape != own[k].shape:
            raise InputError(f"{f}: tensor {k!r} has shape {tuple(v.shape)}, the config implies "
                             f"{tuple(own[k].shape)}")
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()})
    model.to(dtype)


# ---------------------------------------------------------------------------- writing

def base_state(model: torch.nn.Module) -> dict:
    """The model's base weights. A model that carries an adapter is refused: its weights alone
    would silently drop the adaptation (merge + unload a LoRA first, or use save_adapter).

    Allowed besides the models' own modules: a subclass of one that only computes differently
    (``minift.fast.mlp``'s MLPs), and a module of another kind that holds no tensors (the fused loss
    of ``minift.fast``, say): they change how the model computes, not what it is."""
    plain = (torch.nn.Linear, torch.nn.Embedding, torch.nn.LayerNorm, torch.nn.Dropout, torch.nn.ModuleList)
    for name, m in model.named_modules():
        if isinstance(m, plain) or any(c.__module__.startswith("minift.models") for c in type(m).__mro__):
            continue
        if any(True for _ in m.parameters()) or any(True for _ in m.buffers()):
            raise ValueError(f"cannot save_pretrained a model with an adapter ({name}: {type(m).__name__}); "
                             f"merge and unload it first (lora.unload / adalora.unload) or use save_adapter")
    return model.state_dict()


def write(path, raw: dict, sd: dict) -> None:
    """Save ``raw`` as ``path/config.json`` and ``sd`` as ``path/model.safetensors``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / "model.safetensors.tmp"
    save_file(sd, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path / "model.safetensors")  # atomic: a crash never leaves half a file
    (path / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
