"""Checkpoints that survive crashes and resume a run exactly, without pickle.

A checkpoint is a directory:

    last/
      model.safetensors       trainable weights: the adapter (PEFT methods) or all weights (full)
      optimizer.safetensors   AdamW moments and step counts, keyed "<param index>.<name>"
      optimizer.json          param groups (lr, betas, weight decay, ...)
      allocator.*             AdaLoRA's importance scores, when the allocator has a state_dict
      rng.safetensors         torch CPU (and CUDA) generator states
      state.json              step, loss/eval history, python and numpy RNG — written last

It is written into ``last.tmp/`` and swapped in with ``os.replace``: a crash while writing
leaves ``last/`` untouched, a crash between the two renames of the swap leaves it as
``last.old/``, which ``latest_checkpoint`` falls back to.

Loading reads and checks every file before it restores anything (the readers are in
``minift.training.checkpoint_read``): a damaged checkpoint (a file unreadable, a field missing or
of the wrong type, a tensor missing, unknown or of another shape, an optimizer of other groups)
raises InputError naming the file and changes nothing.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from minift.files import read_safetensors
from minift.training.checkpoint_read import (read_allocator, read_optimizer, read_rng, read_state, trainable_keys,
                                             trainable_pairs)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint must hold: every trainable parameter (the adapter for PEFT methods,
    all weights for full fine-tuning) plus adapter buffers (``lora_*``, prefix, soft prompt)."""
    keys = set(trainable_keys(model))
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k in keys}


def load_trainable_state(model: torch.nn.Module, path) -> list[str]:
    """Copy the tensors of a ``model.safetensors`` written by ``trainable_state`` into ``model``.

    InputError naming ``path`` if the file is unreadable, has a tensor the model lacks, lacks one
    of the model's trainable tensors (``trainable_state`` of the model as built: a half-loaded
    adapter would be silently scored), or has a tensor of another shape or kind of dtype;
    nothing is copied unless every tensor fits."""
    path = Path(path)
    pairs = trainable_pairs(model, read_safetensors(path, "checkpoint weights", floating=False), path)
    _copy(pairs)
    return sorted(k for k, _, _ in pairs)


def _copy(pairs) -> None:
    with torch.no_grad():
        for _, dst, src in pairs:
            dst.copy_(src)


def save_checkpoint(out_dir, model, opt, state: dict, allocator=None, rng: dict | None = None) -> Path:
    """Write ``out_dir/last/`` atomically: weights, optimizer, allocator, RNG and ``state.json``
    (step, loss/eval history) — safetensors for tensors, JSON for the rest, no pickle."""
    rng = rng or rng_state()

    def write(d: Path):
        save_file(trainable_state(model), str(d / "model.safetensors"))
        tensors, meta = _optimizer_split(opt)
        save_file(tensors, str(d / "optimizer.safetensors"))
        (d / "optimizer.json").write_text(json.dumps(meta))
        if allocator is not None and hasattr(allocator, "state_dict"):
            tensors, meta = _split(allocator.state_dict())
            save_file(tensors, str(d / "allocator.safetensors"))
            (d / "allocator.json").write_text(json.dumps(meta))
        rt = {"torch": rng["torch"], **{f"cuda.{i}": s for i, s in enumerate(rng["cuda"])}}
        save_file({k: v.contiguous() for k, v in rt.items()}, str(d / "rng.safetensors"))
        py, npy = rng["python"], rng["numpy"]
        meta = dict(state, rng={"python": [py[0], list(py[1]), py[2]],
                                "numpy": [npy[0], npy[1].tolist(), *map(_plain, npy[2:])]})
        (d / "state.json").write_text(json.dumps(meta))  # last: its presence marks a complete checkpoint

    final = Path(out_dir) / "last"
    _atomic_dir(final, write)
    return final


def save_weights(model, path) -> Path:
    """Only the trainable weights, as ``path/model.safetensors`` (atomically); e.g. ``best/``."""
    path = Path(path)
    _atomic_dir(path, lambda d: save_file(trainable_state(model), str(d / "model.safetensors")))
    return path


def load_checkpoint(path, model, opt=None, allocator=None) -> dict:
    """Restore weights (and optimizer, allocator, RNG) from a checkpoint dir; return its state.

    Every file is read and checked before anything is restored, so a damaged checkpoint leaves
    the model, optimizer, allocator and RNG as they were and raises InputError naming the file."""
    path = Path(path)
    state, r = read_state(path / "state.json")
    f = path / "model.safetensors"
    weights = trainable_pairs(model, read_safetensors(f, "checkpoint weights", floating=False), f)
    opt_state = read_optimizer(path, opt) if opt is not None else None
    alloc_state = None
    if allocator is not None and hasattr(allocator, "load_state_dict") and (path / "allocator.json").is_file():
        alloc_state = read_allocator(path, allocator)
    rng = read_rng(path / "rng.safetensors", r, path / "state.json")
    # everything is read and checked: restore
    _copy(weights)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    if alloc_state is not None:
        allocator.load_state_dict(alloc_state)
    set_rng_state(rng)
    return state


def latest_checkpoint(out_dir) -> Path | None:
    """``last/``, or ``last.old/`` if a crash hit between the two renames of a swap."""
    if out_dir is None:
        return None
    for name in ("last", "last.old"):
        if (Path(out_dir) / name / "state.json").is_file():
            return Path(out_dir) / name
    return None


def _atomic_dir(final: Path, write: Callable[[Path], None]) -> None:
    """Fill ``<final>.tmp/`` then swap it in with renames; the previous ``final`` survives any
    crash before the swap, and as ``<final>.old`` if the crash lands between the renames."""
    tmp, old = final.with_name(final.name + ".tmp"), final.with_name(final.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _optimizer_split(opt) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors, rest = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                rest.setdefault(str(idx), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "state": rest}


def _split(obj, prefix: str = "") -> tuple[dict, dict]:
    """A nested dict -> (flat tensors keyed 'a/b', the JSON-able rest with tensors left out)."""
    tensors, rest = {}, {}
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if torch.is_tensor(v):
            tensors[key] = v.detach().cpu().contiguous()
        elif isinstance(v, dict):
            t, r = _split(v, key + "/")
            tensors.update(t)
            rest[str(k)] = r
        else:
            rest[str(k)] = v
    return tensors, rest


def _plain(x):
    return x.item() if hasattr(x, "item") else x
