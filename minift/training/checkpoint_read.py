"""Reading a checkpoint back, strictly: every file parsed and checked against the model,
optimizer and allocator it will restore, before anything is restored (``checkpoint.load_checkpoint``
and ``checkpoint.load_trainable_state`` call these readers, then copy).

A damaged checkpoint (a file unreadable, a field missing or of the wrong type, a tensor missing,
unknown or of another shape, an optimizer of other groups, an RNG state that would not load)
raises InputError naming the file; the readers change nothing.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from minift.files import InputError, MissingKey, field, read_json, read_safetensors, read_text


def trainable_keys(model: torch.nn.Module) -> list[str]:
    """The state-dict keys a checkpoint of ``model`` holds: its trainable parameters and its
    adapter tensors (``lora_*``, prefix encoder, soft prompt), trainable or not."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    adapter = ("prefix_encoder.", "soft_prompt.")
    return [k for k in model.state_dict()
            if k in names or ".lora_" in k or k.startswith("lora_") or k.startswith(adapter)]


def trainable_pairs(model: torch.nn.Module, sd: dict, path: Path) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(key, model tensor, file tensor) for every tensor of ``sd``, all checked; copies nothing."""
    own = model.state_dict()
    unknown = [k for k in sd if k not in own]
    if unknown:
        raise InputError(f"{path}: tensor {unknown[0]!r}{_more(unknown)} does not exist in the model "
                         f"(was it trained with another method or model?)")
    missing = [k for k in trainable_keys(model) if k not in sd]
    if missing:
        raise MissingKey(f"{path}: lacks {len(missing)} of the model's {len(trainable_keys(model))} trainable "
                         f"tensors: {', '.join(map(repr, missing[:3]))}{', ...' if len(missing) > 3 else ''} "
                         f"(was it trained with another method or settings?)")
    for k, v in sd.items():
        dst = own[k]
        if v.shape != dst.shape:
            raise InputError(f"{path}: tensor {k!r} has shape {tuple(v.shape)}, the model has {tuple(dst.shape)}")
        if v.is_floating_point() != dst.is_floating_point() or (not dst.is_floating_point() and v.dtype != dst.dtype):
            raise InputError(f"{path}: tensor {k!r} has dtype {_dtype(v)}, the model's is {_dtype(dst)}")
    return [(k, own[k], v) for k, v in sd.items()]


def _more(items: list) -> str:
    return f" (and {len(items) - 1} more)" if len(items) > 1 else ""


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def read_state(f: Path) -> tuple[dict, dict]:
    """``state.json`` checked field by field, and its ``rng`` entry taken out of it."""
    text = read_text(f, "checkpoint state")
    try:  # NaN may stand in a loss history (json.dumps writes it): not parse_json, which refuses it
        state = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{f}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise InputError(f"{f}: JSON nested too deeply") from None
    if not isinstance(state, dict):
        raise InputError(f"{f}: checkpoint state must hold a JSON object, got {type(state).__name__}")
    if field(state, "step", int, f) < 0:
        raise InputError(f"{f}: field 'step' must be >= 0, got {state['step']}")
    losses = field(state, "losses", list, f)
    bad = [x for x in losses if isinstance(x, bool) or not isinstance(x, (int, float))]
    if bad:
        raise InputError(f"{f}: field 'losses' must be a list of numbers, it holds {json.dumps(bad[0]):.40}")
    if not all(isinstance(e, dict) for e in field(state, "evals", list, f)):
        raise InputError(f"{f}: field 'evals' must be a list of JSON objects")
    field(state, "best", (dict, type(None)), f)
    if field(state, "bad_evals", int, f) < 0:
        raise InputError(f"{f}: field 'bad_evals' must be >= 0, got {state['bad_evals']}")
    for name in ("stopped_early", "eval_pending"):
        field(state, name, bool, f, default=False)
    r = field(state, "rng", dict, f)
    field(r, "python", list, f"{f}: field 'rng'")
    field(r, "numpy", list, f"{f}: field 'rng'")
    state.pop("rng")
    return state, r


def read_rng(f: Path, r: dict, state_file: Path) -> dict:
    """The RNG states of ``rng.safetensors`` and ``state.json``'s ``rng``, each tried on a
    throwaway generator first: a state that would not load is an error naming its file."""
    rt = read_safetensors(f, "RNG states", floating=False)
    if "torch" not in rt:
        raise MissingKey(f"{f}: has no 'torch' generator state (tensors: {', '.join(sorted(rt)) or 'none'})")
    n_cuda = sum(k.startswith("cuda.") for k in rt)
    cuda = [rt.get(f"cuda.{i}") for i in range(n_cuda)]
    if any(t is None for t in cuda) or set(rt) - {"torch", *(f"cuda.{i}" for i in range(n_cuda))}:
        raise InputError(f"{f}: tensors must be 'torch' and 'cuda.0' ... 'cuda.N-1', got {', '.join(sorted(rt))}")
    for key, t in rt.items():
        if t.dtype != torch.uint8 or t.dim() != 1:
            raise InputError(f"{f}: generator state {key!r} must be a 1-D uint8 tensor, got {_dtype(t)} "
                             f"of shape {tuple(t.shape)}")
    try:
        torch.Generator().set_state(rt["torch"])
    except (RuntimeError, ValueError, TypeError) as e:
        raise InputError(f"{f}: 'torch' is not a CPU generator state "
                         f"({str(e).splitlines()[0] if str(e) else e})") from None
    try:
        py, npy = r["python"], r["numpy"]
        python = (py[0], tuple(py[1]), py[2])
        numpy = (npy[0], np.array(npy[1], dtype=np.uint32), *npy[2:])
        random.Random().setstate(python)
        np.random.RandomState().set_state(numpy)
    except (TypeError, ValueError, IndexError, KeyError, OverflowError) as e:
        raise InputError(f"{state_file}: field 'rng' is not a python/numpy RNG state ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    return {"torch": rt["torch"], "cuda": cuda, "python": python, "numpy": numpy}


def read_optimizer(path: Path, opt, tensors: dict | None = None) -> dict:
    """The optimizer state of ``optimizer.json`` + ``optimizer.safetensors`` (or ``tensors``, those
    ``read_distributed`` lists), checked against ``opt``: the same groups of the same sizes,
    hyperparameters of the same kinds, and moments of the shape of their parameters."""
    f_json = path / "optimizer.json"
    f_st = path / ("optimizer.safetensors" if tensors is None else ".metadata")
    meta = read_json(f_json, "optimizer state")
    groups = field(meta, "param_groups", list, f_json)
    saved_state = field(meta, "state", dict, f_json)
    if tensors is None:
        tensors = read_safetensors(f_st, "optimizer state", floating=False)
    mine = opt.state_dict()["param_groups"]
    if len(groups) != len(mine):
        raise InputError(f"{f_json}: has {len(groups)} parameter groups, this optimizer has {len(mine)} "
                         f"(was the checkpoint written for another method or settings?)")
    params = {}  # saved param index -> this optimizer's parameter
    live = [p for g in opt.param_groups for p in g["params"]]
    for i, (g, m) in enumerate(zip(groups, mine)):
        if not isinstance(g, dict):
            raise InputError(f"{f_json}: param_groups[{i}] must be a JSON object")
        ids = field(g, "params", list, f"{f_json}: param_groups[{i}]")
        if len(ids) != len(m["params"]) or not all(type(x) is int for x in ids):
            raise InputError(f"{f_json}: param_groups[{i}] has {len(ids)} parameters, this optimizer's has "
                             f"{len(m['params'])}")
        for k, v in g.items():
            if k != "params" and k in m and not _same_kind(v, m[k]):
                raise InputError(f"{f_json}: param_groups[{i}] has {k}={json.dumps(v):.40}, expected a value like "
                                 f"{json.dumps(m[k], default=str):.40}")
        params.update({saved: live[own] for saved, own in zip(ids, m["params"])})
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        idx, _, name = key.partition(".")
        if not idx.isdigit() or not name or int(idx) not in params:
            raise InputError(f"{f_st}: tensor {key!r} names no parameter of the optimizer "
                             f"(keys are '<parameter index>.<name>')")
        p = params[int(idx)]
        if v.dim() and (v.shape != p.shape or not v.is_floating_point()):
            raise InputError(f"{f_st}: tensor {key!r} has shape {tuple(v.shape)} and dtype {_dtype(v)}; its "
                             f"parameter is {tuple(p.shape)} {_dtype(p)}")
        state.setdefault(int(idx), {})[name] = v
    for idx, d in saved_state.items():
        if not idx.isdigit() or int(idx) not in params or not isinstance(d, dict):
            raise InputError(f"{f_json}: state entry {idx!r} names no parameter of the optimizer")
        state.setdefault(int(idx), {}).update(d)
    groups = [dict(g, betas=tuple(g["betas"])) if isinstance(g.get("betas"), list) else g for g in groups]
    return {"state": state, "param_groups": groups}


def read_distributed(path: Path) -> tuple[dict, dict]:
    """The tensors of a checkpoint written by several ranks, as its index ``.metadata`` lists them:
    (weights by state-dict key, optimizer tensors by '<param index>.<name>'), each a meta tensor (its
    shape and dtype, no data) for the checks; ``checkpoint.load_checkpoint`` loads the data."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    f = path / ".metadata"
    try:
        md = FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # noqa: BLE001  (unpickling a damaged file raises anything)
        raise InputError(f"{f}: not a readable torch.distributed.checkpoint index ({type(e).__name__})") from None
    weights, optim = {}, {}
    for key, m in getattr(md, "state_dict_metadata", {}).items():
        part, _, name = key.partition("/")
        if not isinstance(m, TensorStorageMetadata) or part not in ("model", "optim") or not name:
            raise InputError(f"{f}: entry {key!r} is not a tensor 'model/<key>' or 'optim/<index>.<name>'")
        (weights if part == "model" else optim)[name] = torch.empty(m.size, dtype=m.properties.dtype, device="meta")
    return weights, optim


def _same_kind(saved, current) -> bool:
    """Whether a saved hyperparameter can stand where the optimizer has ``current``."""
    if current is None or isinstance(current, bool) and saved is None:  # e.g. fused: None on CPU, True on CUDA
        return True
    if isinstance(current, bool):
        return isinstance(saved, bool)
    if isinstance(current, (int, float)):
        return isinstance(saved, (int, float)) and not isinstance(saved, bool)
    if isinstance(current, (list, tuple)):
        return (isinstance(saved, list) and len(saved) == len(current)
                and all(_same_kind(s, c) for s, c in zip(saved, current)))
    if isinstance(current, str):
        return isinstance(saved, str)
    return True


def read_allocator(path: Path, allocator) -> dict:
    """The allocator state of ``allocator.json`` + ``allocator.safetensors``; when the allocator
    has a state now, the saved one must have the same keys, and tensors of the same shapes."""
    f_json, f_st = path / "allocator.json", path / "allocator.safetensors"
    rest = read_json(f_json, "allocator state")
    tensors = read_safetensors(f_st, "allocator state", floating=False)
    try:
        saved = _join(tensors, rest)
    except (AttributeError, TypeError):  # a tensor key runs through a JSON value that is no object
        raise InputError(f"{f_st}: its tensor keys do not fit {f_json.name}") from None
    _check_like(saved, allocator.state_dict(), f_json, f_st, "")
    params = allocator._params() if hasattr(allocator, "_params") else None  # AdaLoRA's RankAllocator
    if params is not None and ("ipt" in saved or "unc" in saved):
        want = {str(i): p for i, p in enumerate(params)}
        for name in ("ipt", "unc"):
            got = saved.get(name)
            if not isinstance(got, dict) or set(got) != set(want):
                raise InputError(f"{f_st}: {name!r} must hold {len(want)} tensors '{name}/0' ... "
                                 f"(one per AdaLoRA factor of this model), got {len(got or {})}")
            for i, p in want.items():
                t = got[i]
                if not torch.is_tensor(t) or t.shape != p.shape or not t.is_floating_point():
                    what = f"{tuple(t.shape)} {_dtype(t)}" if torch.is_tensor(t) else type(t).__name__
                    raise InputError(f"{f_st}: '{name}/{i}' is {what}, its factor is {tuple(p.shape)} {_dtype(p)}")
    return saved


def _check_like(saved, current, f_json: Path, f_st: Path, where: str) -> None:
    """``saved`` has the structure of ``current``: for each key of ``current``, the same kind of
    value (a tensor of the same shape and dtype kind, a dict checked likewise, a JSON value of
    the same kind); dicts of tensors that are empty now (not yet filled) take any saved ones."""
    for k, c in current.items():
        name = f"{where}{k}"
        if k not in saved:
            if isinstance(c, dict) and not c:
                continue
            raise MissingKey(f"{f_st if torch.is_tensor(c) else f_json}: has no {name!r}")
        s = saved[k]
        if torch.is_tensor(c):
            if not torch.is_tensor(s) or s.shape != c.shape or s.is_floating_point() != c.is_floating_point():
                what = f"{tuple(s.shape)} {_dtype(s)}" if torch.is_tensor(s) else type(s).__name__
                raise InputError(f"{f_st}: {name!r} is {what}, expected a tensor {tuple(c.shape)} {_dtype(c)}")
        elif isinstance(c, dict):
            if not isinstance(s, dict):
                raise InputError(f"{f_json}: {name!r} must be a JSON object")
            if c:
                _check_like(s, c, f_json, f_st, name + "/")
        elif not _same_kind(s, c):
            raise InputError(f"{f_json}: {name!r} is {json.dumps(s, default=str):.40}, expected a value like {c!r:.40}")


def _join(tensors: dict, rest: dict) -> dict:
    out = json.loads(json.dumps(rest))
    for key, v in tensors.items():
        *path, last = key.split("/")
        d = out
        for p in path:
            d = d.setdefault(p, {})
        d[last] = v
    return out
