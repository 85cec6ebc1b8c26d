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

A run on several ranks (``distributed.py``) writes the weights and the optimizer's tensors through
``torch.distributed.checkpoint`` instead of the two safetensors files: ``.metadata`` (the index of
every tensor's pieces) and ``__<rank>_0.distcp`` (each rank's shards; a tensor every rank holds is
written once). Rank 0 writes the other files as above; rank r > 0 adds its generators as
``rng.<r>.safetensors`` and ``rng.<r>.json``. Such a checkpoint loads on any number of ranks, one
process without a process group included, and a one-process checkpoint loads on several ranks (a
sharded model takes its shard of each tensor). ``.metadata`` is a pickle (torch writes it so): load
only checkpoints you wrote.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from minift.files import read_json, read_safetensors
from minift.training import distributed
from minift.training.checkpoint_read import (read_allocator, read_distributed, read_optimizer, read_rng, read_state,
                                             trainable_keys, trainable_pairs)


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
    all weights for full fine-tuning) plus adapter buffers (``lora_*``, prefix, soft prompt).
    A sharded model's are gathered on rank 0 (every rank calls this; the others get none)."""
    keys = set(trainable_keys(model))
    return {k: v.detach().cpu().contiguous() for k, v in distributed.full_state_dict(model).items() if k in keys}


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
            dst.copy_(distributed.laid_out_like(dst, src))  # a sharded model takes its shard


def save_checkpoint(out_dir, model, opt, state: dict, allocator=None, rng: dict | None = None) -> Path:
    """Write ``out_dir/last/`` atomically: weights, optimizer, allocator, RNG and ``state.json``
    (step, loss/eval history) — safetensors for tensors, JSON for the rest, no pickle. On several
    ranks every rank calls it, and the weights and optimizer go through torch.distributed.checkpoint."""
    rng = rng or rng_state()
    final = Path(out_dir) / "last"
    if distributed.world_size() > 1:
        return _save_distributed(final, model, opt, state, allocator, rng)

    def write(d: Path):
        save_file(trainable_state(model), str(d / "model.safetensors"))
        tensors, meta = _optimizer_split(opt)
        save_file(tensors, str(d / "optimizer.safetensors"))
        (d / "optimizer.json").write_text(json.dumps(meta))
        _write_allocator(d, allocator)
        meta = dict(state, rng=_write_rng(d, rng, "rng"))
        (d / "state.json").write_text(json.dumps(meta))  # last: its presence marks a complete checkpoint

    _atomic_dir(final, write)
    return final


def _save_distributed(final: Path, model, opt, state: dict, allocator, rng: dict) -> Path:
    """``save_checkpoint`` on every rank of a run on several: weights and optimizer tensors through
    torch.distributed.checkpoint into ``last.tmp/``, each rank's RNG, rank 0's files as one process
    writes them (``state.json`` last); then rank 0 swaps ``last.tmp/`` in, as ``_atomic_dir`` does."""
    import torch.distributed.checkpoint as dcp
    tmp, main, rank = final.with_name(final.name + ".tmp"), distributed.is_main(), distributed.rank()
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier()
    keys = set(trainable_keys(model))
    tensors, meta = _optimizer_split(opt, cpu=False)
    dcp.save({**{f"model/{k}": v for k, v in model.state_dict().items() if k in keys},
              **{f"optim/{k}": v for k, v in tensors.items()}}, checkpoint_id=tmp)
    if main:
        (tmp / "optimizer.json").write_text(json.dumps(meta))
        _write_allocator(tmp, allocator)
        rng_json = _write_rng(tmp, rng, "rng")
    else:
        (tmp / f"rng.{rank}.json").write_text(json.dumps(_write_rng(tmp, rng, f"rng.{rank}")))
    distributed.barrier()
    if main:
        (tmp / "state.json").write_text(json.dumps(dict(state, rng=rng_json)))  # last: the checkpoint is complete
        _swap(tmp, final)
    distributed.barrier()
    return final


def _write_allocator(d: Path, allocator) -> None:
    if allocator is not None and hasattr(allocator, "state_dict"):
        tensors, meta = _split(allocator.state_dict())
        save_file(tensors, str(d / "allocator.safetensors"))
        (d / "allocator.json").write_text(json.dumps(meta))


def _write_rng(d: Path, rng: dict, name: str) -> dict:
    """The torch (and CUDA) generator states of ``rng`` as ``d/<name>.safetensors``; returns its python
    and numpy states as JSON holds them."""
    rt = {"torch": rng["torch"], **{f"cuda.{i}": s for i, s in enumerate(rng["cuda"])}}
    save_file({k: v.contiguous() for k, v in rt.items()}, str(d / f"{name}.safetensors"))
    py, npy = rng["python"], rng["numpy"]
    return {"python": [py[0], list(py[1]), py[2]], "numpy": [npy[0], npy[1].tolist(), *map(_plain, npy[2:])]}


def save_weights(model, path) -> Path:
    """Only the trainable weights, as ``path/model.safetensors`` (atomically); e.g. ``best/``."""
    path = Path(path)
    sd = trainable_state(model)  # every rank: a sharded model's weights gather on rank 0
    if distributed.is_main():
        _atomic_dir(path, lambda d: save_file(sd, str(d / "model.safetensors")))
    return path


def load_checkpoint(path, model, opt=None, allocator=None) -> dict:
    """Restore weights (and optimizer, allocator, RNG) from a checkpoint dir; return its state.

    Every file is read and checked before anything is restored, so a damaged checkpoint leaves
    the model, optimizer, allocator and RNG as they were and raises InputError naming the file.
    On several ranks every rank calls it, and each takes its own RNG states (rank 0's where the
    checkpoint has none for it). A checkpoint of several ranks is checked against its index
    (``.metadata``); a data file that then fails to read leaves the weights partly restored."""
    path = Path(path)
    state, r = read_state(path / "state.json")
    several = (path / ".metadata").is_file()  # written by several ranks
    if several:
        sd, opt_tensors = read_distributed(path)
        weights = trainable_pairs(model, sd, path / ".metadata")
        opt_state = read_optimizer(path, opt, opt_tensors) if opt is not None else None
    else:
        f = path / "model.safetensors"
        weights = trainable_pairs(model, read_safetensors(f, "checkpoint weights", floating=False), f)
        opt_state = read_optimizer(path, opt) if opt is not None else None
    alloc_state = None
    if allocator is not None and hasattr(allocator, "load_state_dict") and (path / "allocator.json").is_file():
        alloc_state = read_allocator(path, allocator)
    own = path / f"rng.{distributed.rank()}.json"
    if own.is_file():
        rng = read_rng(own.with_suffix(".safetensors"), read_json(own, "RNG state"), own)
    else:
        rng = read_rng(path / "rng.safetensors", r, path / "state.json")
    # everything is read and checked: restore
    if several:
        _load_distributed(path, weights, opt_state, opt)
    else:
        _copy(weights)
    if opt_state is not None:
        opt.load_state_dict(_laid_out(opt_state, opt))
    if alloc_state is not None:
        allocator.load_state_dict(alloc_state)
    set_rng_state(rng)
    return state


def _load_distributed(path: Path, weights, opt_state: dict | None, opt) -> None:
    """Fill the model's trainable tensors (in place) and ``opt_state``'s tensors (those shaped like their
    parameter laid out as it is) from a checkpoint of several ranks."""
    import torch.distributed.checkpoint as dcp
    want = {f"model/{k}": dst for k, dst, _ in weights}
    if opt_state is not None:
        params = _saved_params(opt_state, opt)
        for idx, st in opt_state["state"].items():
            for name, v in st.items():
                if torch.is_tensor(v):
                    p = params[idx]
                    like_p = v.shape == p.shape  # a moment: laid out as its parameter (a step count: on the CPU)
                    st[name] = torch.zeros_like(p, dtype=v.dtype) if like_p else torch.zeros(v.shape, dtype=v.dtype)
                    want[f"optim/{idx}.{name}"] = st[name]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled")  # one process: meant so
        dcp.load(want, checkpoint_id=path, no_dist=distributed.world_size() == 1)


def _saved_params(opt_state: dict, opt) -> dict:
    """Saved parameter index -> this optimizer's parameter (the groups match: ``read_optimizer`` checked)."""
    return {i: p for saved, mine in zip(opt_state["param_groups"], opt.param_groups)
            for i, p in zip(saved["params"], mine["params"])}


def _laid_out(opt_state: dict, opt) -> dict:
    """``opt_state`` with each moment laid out as its parameter is (its shard, when sharded)."""
    params = _saved_params(opt_state, opt)
    for idx, st in opt_state["state"].items():
        for name, v in st.items():
            if torch.is_tensor(v) and v.dim():
                st[name] = distributed.laid_out_like(params[idx], v)
    return opt_state


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
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    _swap(tmp, final)


def _swap(tmp: Path, final: Path) -> None:
    """``tmp`` renamed to ``final``; a ``final`` already there survives as ``<final>.old`` until then."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _optimizer_split(opt, cpu: bool = True) -> tuple[dict, dict]:
    """(the optimizer's tensors keyed '<param index>.<name>', copied to the CPU unless ``cpu`` is False;
    the JSON-able rest: its param groups and any state that is not a tensor)."""
    sd = opt.state_dict()
    tensors, rest = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v.detach().cpu().contiguous() if cpu else v
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
