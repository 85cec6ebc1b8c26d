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
from safetensors.torch import load_file, save_file


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
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    adapter = ("prefix_encoder.", "soft_prompt.")
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
            if k in names or ".lora_" in k or k.startswith("lora_") or k.startswith(adapter)}


def load_trainable_state(model: torch.nn.Module, path) -> list[str]:
    """Copy the tensors of a ``model.safetensors`` written by ``trainable_state`` into ``model``."""
    sd, own = load_file(str(path)), model.state_dict()
    unknown = [k for k in sd if k not in own]
    if unknown:
        raise KeyError(f"{path}: tensor {unknown[0]!r} does not exist in the model "
                       f"(was it trained with another method or model?)")
    with torch.no_grad():
        for k, v in sd.items():
            if v.shape != own[k].shape:
                raise ValueError(f"{path}: tensor {k!r} has shape {tuple(v.shape)}, the model has "
                                 f"{tuple(own[k].shape)}")
            own[k].copy_(v)
    return sorted(sd)


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
    """Restore weights (and optimizer, allocator, RNG) from a checkpoint dir; return its state."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    load_trainable_state(model, path / "model.safetensors")
    if opt is not None:
        tensors = load_file(str(path / "optimizer.safetensors"))
        opt.load_state_dict(_optimizer_join(tensors, json.loads((path / "optimizer.json").read_text())))
    if allocator is not None and hasattr(allocator, "load_state_dict") and (path / "allocator.json").is_file():
        allocator.load_state_dict(_join(load_file(str(path / "allocator.safetensors")),
                                        json.loads((path / "allocator.json").read_text())))
    rt, r = load_file(str(path / "rng.safetensors")), state.pop("rng")
    set_rng_state({"torch": rt["torch"],
                   "cuda": [rt[f"cuda.{i}"] for i in range(sum(k.startswith("cuda.") for k in rt))],
                   "python": (r["python"][0], tuple(r["python"][1]), r["python"][2]),
                   "numpy": (r["numpy"][0], np.array(r["numpy"][1], dtype=np.uint32), *r["numpy"][2:])})
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


def _optimizer_join(tensors: dict, meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    for idx, d in meta["state"].items():
        state.setdefault(int(idx), {}).update(d)
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


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


def _join(tensors: dict, rest: dict) -> dict:
    out = json.loads(json.dumps(rest))
    for key, v in tensors.items():
        *path, last = key.split("/")
        d = out
        for p in path:
            d = d.setdefault(p, {})
        d[last] = v
    return out


def _plain(x):
    return x.item() if hasattr(x, "item") else x
