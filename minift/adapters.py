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

The file is organised in sections. Sections 1-2 are shared by every method; section 3 is
the dispatch (an explicit if-chain over the kind of adapter the model carries / the
``peft_type`` a file declares); each method then has its own section with a save and a
load function for each layout. LoRA (section 4) is the worked example; AdaLoRA and
prefix/prompt tuning add their sections below it and one branch each in section 3.
"""
from __future__ import annotations

import json
import os
import re
import dataclasses
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from minift.methods import adalora, lora, prefix, prompt
from minift.methods.common import find_modules
from minift.models.bert import Bert, BertClassifier
from minift.models.gpt import GPT
from minift.models.hf import _GPT_LAYER, bert_key_map

LAYOUTS = ("peft", "minift")
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
MINIFT_FILES = ("minift_adapter.json", "adapter.safetensors")
PEFT_PREFIX = "base_model.model."


# ============================================================ 1. shared: files on disk

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


def read_adapter(path) -> tuple[str, dict, dict[str, torch.Tensor]]:
    """(layout, config, tensors) from an adapter directory; the layout is detected from the files."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"adapter directory {path} does not exist")
    for layout, (cfg_name, st_name) in (("minift", MINIFT_FILES), ("peft", PEFT_FILES)):
        if (path / cfg_name).is_file():
            if not (path / st_name).is_file():
                raise FileNotFoundError(f"{path} has {cfg_name} but no {st_name}")
            try:
                config = json.loads((path / cfg_name).read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{path / cfg_name} is not valid JSON: {e}") from None
            return layout, config, load_file(str(path / st_name))
    found = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
    raise FileNotFoundError(f"{path} holds no adapter (expected {PEFT_FILES[0]} or {MINIFT_FILES[0]}; "
                            f"found: {found})")


def copy_checked(dst: torch.Tensor, src: torch.Tensor, key: str, where: str) -> None:
    """Copy an adapter tensor into a parameter; a shape mismatch is an error naming both."""
    if tuple(src.shape) != tuple(dst.shape):
        raise ValueError(f"adapter tensor {key!r} has shape {tuple(src.shape)} but {where} expects "
                         f"{tuple(dst.shape)}: the adapter was saved for a model of another shape")
    with torch.no_grad():
        dst.copy_(src)


# ============================================================ 2. shared: minift <-> Hugging Face names

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


# ============================================================ 3. dispatch

def adapter_kind(model: nn.Module) -> str:
    """The ``peft_type`` of the adapter a model carries, decided by isinstance checks."""
    if adalora.svd_modules(model):  # section 5
        return "ADALORA"
    if lora.lora_modules(model):
        return "LORA"
    if getattr(model, "prefix_encoder", None) is not None:  # section 6
        return "PREFIX_TUNING"
    if getattr(model, "soft_prompt", None) is not None:  # section 6
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
    elif kind == "ADALORA":  # section 5
        config, tensors = adalora_to_peft(model) if layout == "peft" else adalora_to_minift(model)
    elif kind in ("PREFIX_TUNING", "PROMPT_TUNING"):  # section 6
        config, tensors = (prompt_learning_to_peft if layout == "peft" else prompt_learning_to_minift)(model, kind)
    else:
        raise NotImplementedError(f"saving a {kind} adapter is not implemented")
    write_adapter(path, config, tensors, layout)


def load_adapter(model: nn.Module, path) -> nn.Module:
    """Load an adapter directory (either layout, detected) into ``model`` in place and return it.
    A model without the adapter gets it applied first; one that has it must match its shape."""
    layout, config, tensors = read_adapter(path)
    kind = config.get("peft_type")
    if kind == "LORA":
        _lora_load_or_undo(model, lora_from_peft if layout == "peft" else lora_from_minift, config, tensors)
    elif kind == "ADALORA":  # section 5
        _adalora_load_or_undo(model, adalora_from_peft if layout == "peft" else adalora_from_minift, config, tensors)
    elif kind in ("PREFIX_TUNING", "PROMPT_TUNING"):  # section 6
        _prompt_learning_load_or_undo(model, prompt_learning_from_peft if layout == "peft"
                                      else prompt_learning_from_minift, config, tensors)
    else:
        raise ValueError(f"{path}: adapter type {kind!r} is not supported (this minift loads: LORA, ADALORA, PREFIX_TUNING, PROMPT_TUNING)")
    return model


# ============================================================ 4. LoRA (the worked example)
# minift layout: the LoRAConfig as JSON plus every module's own (r, alpha), keys as in
# minift's state dict. PEFT layout: see lora_to_peft below.

def _lora_load_or_undo(model: nn.Module, load, config: dict, tensors: dict) -> None:
    """Run a LoRA loader; if it applied LoRA to a plain model and then failed (a file for
    another model shape), take the layers out again so the model is left as it was."""
    fresh = not lora.lora_modules(model)
    flags = {id(p): p.requires_grad for p in model.parameters()}
    try:
        load(model, config, tensors)
    except Exception:
        if fresh and lora.lora_modules(model):
            lora.unload(model)  # fresh B is zero, so merging adds nothing (PiSSA: W0 back up to rounding)
            for p in model.parameters():
                p.requires_grad_(flags.get(id(p), p.requires_grad))
        raise


def _lora_config_of(model: nn.Module, mods) -> lora.LoRAConfig:
    cfg = getattr(model, "lora_config", None)
    if cfg is not None:
        return cfg
    m0 = mods[0][1]  # a model whose config attribute was dropped: rebuild one from the layers
    return lora.LoRAConfig(r=m0.r, alpha=m0.alpha, targets=tuple(n for n, _ in mods), rslora=m0.rslora,
                           dora=m0.dora, init=m0.init,
                           dropout=m0.dropout.p if isinstance(m0.dropout, nn.Dropout) else 0.0)


def lora_to_minift(model: nn.Module) -> tuple[dict, dict]:
    mods = lora.lora_modules(model)
    cfg = _lora_config_of(model, mods)
    tensors = {f"{n}.{pn}": p for n, m in mods for pn, p in m.named_parameters() if pn.startswith("lora_")}
    tensors.update(modules_to_save_params(model, cfg.modules_to_save))
    c = asdict(cfg)
    c["targets"], c["modules_to_save"] = list(cfg.targets), list(cfg.modules_to_save)
    config = {"format": "minift", "peft_type": "LORA", "config": c,
              "modules": {n: {"r": m.r, "alpha": m.alpha} for n, m in mods}}
    return config, tensors


def lora_from_minift(model: nn.Module, config: dict, tensors: dict) -> None:
    modules = config["modules"]
    if not lora.lora_modules(model):
        cfg = lora.LoRAConfig(**{**config["config"], "targets": tuple(modules)})
        lora.apply(model, cfg, ranks={n: (v["r"], v["alpha"]) for n, v in modules.items()})
        model.lora_config = lora.LoRAConfig(**config["config"])
    have = dict(lora.lora_modules(model))
    for n, v in modules.items():
        if n not in have:
            raise ValueError(f"adapter has a LoRA on {n!r}, which this model does not have as a LoRA layer")
        if have[n].merged:
            raise ValueError(f"{n} is merged; call lora.unmerge(model) before loading an adapter")
    own = dict(model.named_parameters())
    for key, t in tensors.items():
        if key not in own:
            raise ValueError(f"adapter tensor {key!r} has no place in this model (was it saved for another model?)")
        copy_checked(own[key], t, key, key.rpartition(".")[0])


# PEFT layout. PEFT's GPT-2 has one LoRA on the fused c_attn (out = 3C rows: q, then k, then v)
# where minift has separate q/k/v layers. Exporting n = |S| LoRAs on a subset S of q/k/v, each
# (A_j: r x C, B_j: C x r, scaling s), as ONE c_attn LoRA is exact:
#     A' = [A_j1; A_j2; ...]                  (n*r x C)   ranks stacked
#     B' = block matrix (3C x n*r): row block j, column block k holds B_j for the k-th
#          adapted slot j, zeros elsewhere (rows of an unadapted slot are all zero)
# so row block j of B' A' is sum_k B'_jk A'_k = B_j A_j (only its own column block is
# non-zero) and unadapted rows get 0 — each slot sees exactly its own update. PEFT scales by
# alpha'/R with R = n*r (or alpha'/sqrt(R) with rsLoRA); keeping the scaling s needs
#     alpha' = n * alpha        (plain)     alpha'/(n r) = alpha/r
#     alpha' = sqrt(n) * alpha  (rsLoRA)    alpha'/sqrt(n r) = alpha/sqrt(r).
# DoRA's row norms ||W + sBA|| are per output row, so they split the same way; an unadapted
# slot gets magnitude ||W_row||, making its factor m/||W_row|| = 1.
# Importing a c_attn LoRA of rank R written by PEFT: its B is in general dense, so each of
# q/k/v gets the full shared A (R x C) and its row block of B (C x R), with the file's alpha:
# also exact (row block j of B A is B_j A). Rank R per slot costs up to 3x the parameters of
# the fused form; that is the price of exactness. If the model already has LoRAs on a subset
# of q/k/v with rank R/n, a block-structured B (what minift writes) is split back exactly.
# Training differs in one respect only: PEFT draws one dropout mask for c_attn, minift one per layer.

def _fuse_qkv(model: nn.Module, hf: str, members) -> tuple:
    members = sorted(members, key=lambda t: t[0])
    m0 = members[0][2]
    if len({(m.r, m.alpha, m.rslora, m.dora) for _, _, m in members}) > 1:
        raise ValueError(f"LoRAs on q/k/v fused into {hf} must share r, alpha, rslora and dora")
    n, r, C = len(members), m0.r, m0.out_features
    A = torch.cat([m.lora_A for _, _, m in members], dim=0)  # (n*r, C_in)
    B = A.new_zeros(3 * C, n * r)  # (3C, n*r), block-structured
    for k, (slot, _, m) in enumerate(members):
        B[slot * C:(slot + 1) * C, k * r:(k + 1) * r] = m.lora_B
    alpha = m0.alpha * (n ** 0.5 if m0.rslora else n)
    mag = None
    if m0.dora:
        parent = members[0][1].rsplit(".", 1)[0]
        by_slot = {slot: m.lora_magnitude for slot, _, m in members}
        mag = torch.cat([by_slot[j] if j in by_slot else
                         torch.linalg.vector_norm(model.get_submodule(f"{parent}.{p}_proj").weight, dim=1)
                         for j, p in enumerate("qkv")])  # (3C,)
    return A, B, mag, n * r, alpha


def lora_to_peft(model: nn.Module) -> tuple[dict, dict]:
    mods = lora.lora_modules(model)
    cfg = _lora_config_of(model, mods)
    if len({(m.rslora, m.dora, m.init) for _, m in mods}) > 1:
        raise ValueError("the PEFT layout needs one rslora/dora/init setting for all LoRA layers")
    if mods[0][1].init == "pissa":
        raise ValueError("PEFT stores PiSSA adapters against the residual base weights, which PEFT "
                         "recomputes its own way; save with layout='minift' (or unload and save the model)")
    mmap = module_map(model)
    groups: dict[str, list] = {}
    for name, m in mods:
        if name not in mmap:
            raise ValueError(f"LoRA on {name} has no Hugging Face counterpart; save with layout='minift'")
        hf, slot = mmap[name]
        groups.setdefault(hf, []).append((slot, name, m))
    tensors, rank_alpha = {}, {}
    for hf, members in groups.items():
        if members[0][0] is None:
            m = members[0][2]
            A, B, mag, r, alpha = m.lora_A, m.lora_B, getattr(m, "lora_magnitude", None), m.r, m.alpha
        else:
            A, B, mag, r, alpha = _fuse_qkv(model, hf, members)
        tensors[f"{PEFT_PREFIX}{hf}.lora_A.weight"] = A
        tensors[f"{PEFT_PREFIX}{hf}.lora_B.weight"] = B
        if mag is not None:
            tensors[f"{PEFT_PREFIX}{hf}.lora_magnitude_vector"] = mag
        rank_alpha[hf] = (r, alpha)
    pairs = list(rank_alpha.values())
    top_r, top_alpha = max(set(pairs), key=pairs.count)  # the most common (r, alpha); others by pattern
    # target_modules: last names ("c_attn", "query") when they select exactly the adapted modules,
    # else full module names (BERT's "dense" would also pick other layers).
    linears = {mmap[n][0] for n, m in model.named_modules()
               if n in mmap and isinstance(m, (nn.Linear, lora.LoRALinear))}
    short = sorted({h.rsplit(".", 1)[-1] for h in groups})
    targets = short if {h for h in linears if h.rsplit(".", 1)[-1] in short} == set(groups) else sorted(groups)
    to_save = set()
    for key, p in modules_to_save_params(model, cfg.modules_to_save).items():
        hk, transpose = hf_param_key(model, mmap, key)
        tensors[PEFT_PREFIX + hk] = p.t() if transpose else p
        to_save.add(hk.rpartition(".")[0])
    m0 = mods[0][1]
    config = {"peft_type": "LORA", "task_type": task_type(model), "r": top_r, "lora_alpha": top_alpha,
              "target_modules": targets, "lora_dropout": cfg.dropout, "use_rslora": m0.rslora,
              "use_dora": m0.dora, "modules_to_save": sorted(to_save) or None,
              "fan_in_fan_out": isinstance(model, GPT), "bias": "none", "lora_bias": False,
              "init_lora_weights": "gaussian" if m0.init == "gaussian" else True,
              "rank_pattern": {h: ra[0] for h, ra in rank_alpha.items() if ra[0] != top_r},
              "alpha_pattern": {h: ra[1] for h, ra in rank_alpha.items() if ra[1] != top_alpha},
              "inference_mode": True, "base_model_name_or_path": None, "revision": None,
              "layers_to_transform": None, "layers_pattern": None}
    return config, tensors


def _check_scaling(name: str, m: lora.LoRALinear, s_file: float) -> None:
    if abs(m.scaling - s_file) > 1e-6 * abs(s_file):
        raise ValueError(f"{name} has LoRA scaling {m.scaling:.6g} but the adapter file implies {s_file:.6g} "
                         f"(r, lora_alpha or use_rslora differ)")


def _split_qkv(model, hf: str, parts: dict, members, s_file: float) -> None:
    A, B, mag = parts["lora_A"], parts["lora_B"], parts.get("lora_magnitude_vector")
    members = sorted(members, key=lambda t: t[0])
    R, C = A.shape[0], members[0][2].out_features
    if B.shape != (3 * C, R):
        raise ValueError(f"adapter tensor for {hf}.lora_B has shape {tuple(B.shape)}; this model's c_attn "
                         f"needs ({3 * C}, {R}): the adapter was saved for a model of another shape")
    n, r = len(members), members[0][2].r
    shared = r == R  # each slot takes the full A and its row block of B
    if not shared and r * n != R:
        raise ValueError(f"{hf} LoRA has rank {R}; this model's LoRAs on {[nm for _, nm, _ in members]} "
                         f"have rank {r} (need {R}, or {R}/{n} for a block-structured file)")
    for k, (slot, name, m) in enumerate(members):
        _check_scaling(name, m, s_file)
        rows = slice(slot * C, (slot + 1) * C)
        cols = slice(None) if shared else slice(k * r, (k + 1) * r)
        if not shared and (B[rows].count_nonzero() != B[rows, cols].count_nonzero()):
            raise ValueError(f"{hf}.lora_B is not block-structured; load it into a model without LoRA "
                             f"layers to split it into q/k/v LoRAs of rank {R}")
        copy_checked(m.lora_A, A[cols.start:cols.stop] if not shared else A, f"{hf}.lora_A.weight", name)
        copy_checked(m.lora_B, B[rows, cols], f"{hf}.lora_B.weight", name)
        if m.dora:
            copy_checked(m.lora_magnitude, mag[rows], f"{hf}.lora_magnitude_vector", name)
    parent = members[0][1].rsplit(".", 1)[0]
    for j, p in enumerate("qkv"):  # slots this model does not adapt must get no update
        if j in {slot for slot, _, _ in members}:
            continue
        rows = slice(j * C, (j + 1) * C)
        w = model.get_submodule(f"{parent}.{p}_proj").weight
        if B[rows].count_nonzero() or (mag is not None and not torch.allclose(
                mag[rows], torch.linalg.vector_norm(w, dim=1), rtol=1e-5, atol=1e-7)):
            raise ValueError(f"{hf} LoRA updates {parent}.{p}_proj, which this model has no LoRA on; load it "
                             f"into a model without LoRA layers (q/k/v all get one)")


def lora_from_peft(model: nn.Module, config: dict, tensors: dict) -> None:
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise ValueError("PEFT LoRA with trained biases (bias != 'none' or lora_bias) is not supported")
    if str(config.get("init_lora_weights", True)).startswith("pissa"):
        raise ValueError("PEFT PiSSA adapters are stored against PEFT's residual base; not supported")
    mmap = module_map(model)
    inv: dict[str, list] = {}
    for name, (hf, slot) in mmap.items():
        inv.setdefault(hf, []).append((name, slot))
    lora_t: dict[str, dict] = {}
    extra: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if not key.startswith(PEFT_PREFIX):
            raise ValueError(f"adapter tensor {key!r} does not start with {PEFT_PREFIX!r}; not a PEFT LoRA file")
        key = key[len(PEFT_PREFIX):]
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B|lora_magnitude_vector)(\.weight)?", key)
        if m:
            if m[1] not in inv:
                raise ValueError(f"adapter has a LoRA on {m[1]!r}, which this {type(model).__name__} does not "
                                 f"have: the adapter was saved for a model of another shape")
            lora_t.setdefault(m[1], {})[m[2]] = t
        else:
            extra[key] = t
    rslora, dora = bool(config.get("use_rslora")), bool(config.get("use_dora"))
    scale = {}
    for hf, parts in lora_t.items():
        if "lora_A" not in parts or "lora_B" not in parts or (dora and "lora_magnitude_vector" not in parts):
            raise ValueError(f"adapter file lacks lora_A, lora_B or (DoRA) lora_magnitude_vector for {hf}")
        alpha = pattern_value(config.get("alpha_pattern"), hf, config["lora_alpha"])
        scale[hf] = (parts["lora_A"].shape[0], alpha)
    if not lora.lora_modules(model):
        ranks = {name: scale[hf] for hf in lora_t for name, _ in inv[hf]}
        mts = []
        for hk in extra:
            mod = hk.rpartition(".")[0]
            if mod not in inv or inv[mod][0][1] is not None:
                raise ValueError(f"adapter tensor {PEFT_PREFIX + hk!r} matches no module of this model")
            mts.append(inv[mod][0][0])
        init = "gaussian" if config.get("init_lora_weights") == "gaussian" else "default"
        cfg = lora.LoRAConfig(r=config["r"], alpha=config["lora_alpha"], dropout=config.get("lora_dropout", 0.0),
                              targets=tuple(ranks), rslora=rslora, dora=dora, init=init,
                              modules_to_save=tuple(dict.fromkeys(mts)))
        lora.apply(model, cfg, ranks=ranks)
    have = dict(lora.lora_modules(model))
    for hf, parts in lora_t.items():
        members = [(slot, name, have[name]) for name, slot in inv[hf] if name in have]
        if not members:
            raise ValueError(f"adapter has a LoRA on {hf} ({', '.join(n for n, _ in inv[hf])} in minift), "
                             f"which this model's LoRA layers do not include")
        if any(m.merged for _, _, m in members):
            raise ValueError(f"{members[0][1]} is merged; call lora.unmerge(model) before loading an adapter")
        if any(m.dora != dora for _, _, m in members):
            raise ValueError(f"{members[0][1]}: the adapter file has use_dora={dora}, the model's layer does not")
        s_file = lora.lora_scaling(*scale[hf], rslora)
        if members[0][0] is not None:
            _split_qkv(model, hf, parts, members, s_file)
            continue
        _, name, m = members[0]
        _check_scaling(name, m, s_file)
        copy_checked(m.lora_A, parts["lora_A"], f"{hf}.lora_A.weight", name)
        copy_checked(m.lora_B, parts["lora_B"], f"{hf}.lora_B.weight", name)
        if dora:
            copy_checked(m.lora_magnitude, parts["lora_magnitude_vector"], f"{hf}.lora_magnitude_vector", name)
    own = dict(model.named_parameters())
    for hk, t in extra.items():  # modules_to_save: whole-module tensors
        mod, _, pname = hk.rpartition(".")
        if mod not in inv or inv[mod][0][1] is not None or f"{inv[mod][0][0]}.{pname}" not in own:
            raise ValueError(f"adapter tensor {PEFT_PREFIX + hk!r} matches no parameter of this model")
        key = f"{inv[mod][0][0]}.{pname}"
        copy_checked(own[key], t.t() if pname == "weight" and is_conv1d(model, mod) else t, hk, key)


# ============================================================ 5. AdaLoRA  (peft_type "ADALORA")
# minift layout: the AdaLoRAConfig as JSON plus every module's rank; tensors lora_A, lora_E,
# lora_B and the kept-triplet mask lora_mask under minift's names (pruning state included).
# PEFT layout: only kept triplets are stored (as PEFT's resize_state_dict_by_rank_pattern does)
# and adapter_config.json holds ``rank_pattern`` {"<HF module>.lora_E": kept flags}; PEFT builds
# each layer at ``init_r``, keeps the flagged rows and scales by lora_alpha / (init_r + 1e-5).
# GPT-2's fused c_attn, as for LoRA (section 4): exporting, the q/k/v triplets are stacked
# (A and E by rows, B as a block matrix whose row block j holds only slot j's columns), so the
# stacked layer has n * r triplets; the file's init_r is the widest stacked layer R, shorter
# patterns are padded with pruned (False) entries, and Λ is multiplied by
# (R + 1e-5) / (init_r + 1e-5) so the scaling alpha / (R + 1e-5) gives the same update. Importing
# a c_attn, each of q/k/v takes the full A, E and its row block of B (exact, as for LoRA).

def _adalora_config_of(model: nn.Module) -> adalora.AdaLoRAConfig:
    cfg = getattr(model, "adalora_config", None)
    if cfg is None:
        raise ValueError("model has AdaLoRA layers but no adalora_config; apply them with adalora.apply")
    return cfg


def _adalora_load_or_undo(model: nn.Module, load, config: dict, tensors: dict) -> None:
    """Run an AdaLoRA loader; if it applied AdaLoRA to a plain model and then failed, take the
    layers out again (Λ is still zero, so unloading adds nothing to the weights)."""
    fresh = not adalora.svd_modules(model)
    flags = {id(p): p.requires_grad for p in model.parameters()}
    try:
        load(model, config, tensors)
    except Exception:
        if fresh and adalora.svd_modules(model):
            for _, m in adalora.svd_modules(model):
                m.lora_E.data.zero_()
            adalora.unload(model)
            for p in model.parameters():
                p.requires_grad_(flags.get(id(p), p.requires_grad))
        raise


def adalora_to_minift(model: nn.Module) -> tuple[dict, dict]:
    mods, cfg = adalora.svd_modules(model), _adalora_config_of(model)
    tensors = {f"{n}.{k}": t for n, m in mods for k, t in m.state_dict().items() if k.startswith("lora_")}
    tensors.update(modules_to_save_params(model, cfg.modules_to_save))
    c = asdict(cfg)
    c["targets"], c["modules_to_save"] = list(cfg.targets), list(cfg.modules_to_save)
    return {"format": "minift", "peft_type": "ADALORA", "config": c, "modules": {n: m.r for n, m in mods}}, tensors


def adalora_from_minift(model: nn.Module, config: dict, tensors: dict) -> None:
    modules = config["modules"]
    if not adalora.svd_modules(model):
        adalora.apply(model, adalora.AdaLoRAConfig(**config["config"]),
                      rank_pattern={n: [True] * r for n, r in modules.items()})
    have = dict(adalora.svd_modules(model))
    for n in modules:
        if n not in have:
            raise ValueError(f"adapter has AdaLoRA on {n!r}, which this model does not have as an AdaLoRA layer")
        if have[n].merged:
            raise ValueError(f"{n} is merged; call adalora.unmerge(model) before loading an adapter")
    own = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for key, t in tensors.items():
        if key not in own:
            raise ValueError(f"adapter tensor {key!r} has no place in this model (was it saved for another model?)")
        copy_checked(own[key], t, key, key.rpartition(".")[0])


def adalora_to_peft(model: nn.Module) -> tuple[dict, dict]:
    mods, cfg = adalora.svd_modules(model), _adalora_config_of(model)
    mmap = module_map(model)
    by_hf: dict[str, list] = {}
    for name, m in mods:
        if name not in mmap:
            raise ValueError(f"{name} has no Hugging Face counterpart; save with layout='minift'")
        if m.merged:
            raise ValueError(f"{name} is merged; call adalora.unmerge(model) before saving")
        by_hf.setdefault(mmap[name][0], []).append((mmap[name][1], m))
    stacked = {}
    for hf, members in by_hf.items():
        members.sort(key=lambda t: t[0] or 0)
        A = torch.cat([m.lora_A for _, m in members])  # (w, in), w = sum of the members' r
        E = torch.cat([m.lora_E for _, m in members])  # (w, 1)
        keep = torch.cat([m.lora_mask for _, m in members])  # (w,)
        if members[0][0] is None:
            B = members[0][1].lora_B  # (out, r)
        else:
            C = members[0][1].out_features
            B = A.new_zeros(3 * C, A.shape[0])  # (3C, w), block-structured
            col = 0
            for slot, m in members:
                B[slot * C:(slot + 1) * C, col:col + m.r] = m.lora_B
                col += m.r
        stacked[hf] = (A, E, B, keep)
    R = max(max(len(s[3]) for s in stacked.values()), 1)
    fix = (R + 1e-5) / (cfg.init_r + 1e-5)  # alpha/(init_r + 1e-5) * E == alpha/(R + 1e-5) * (fix * E)
    tensors, pattern = {}, {}
    for hf, (A, E, B, keep) in stacked.items():
        pattern[f"{hf}.lora_E"] = keep.tolist() + [False] * (R - len(keep))
        tensors[f"{PEFT_PREFIX}{hf}.lora_A"] = A[keep]
        tensors[f"{PEFT_PREFIX}{hf}.lora_E"] = E[keep] * fix if R != cfg.init_r else E[keep]
        tensors[f"{PEFT_PREFIX}{hf}.lora_B"] = B[:, keep]
    to_save = set()
    for key, p in modules_to_save_params(model, cfg.modules_to_save).items():
        hk, transpose = hf_param_key(model, mmap, key)
        tensors[PEFT_PREFIX + hk] = p.t() if transpose else p
        to_save.add(hk.rpartition(".")[0])
    config = {"peft_type": "ADALORA", "task_type": task_type(model), "init_r": R, "target_r": cfg.target_r,
              "lora_alpha": cfg.alpha, "target_modules": sorted(stacked), "lora_dropout": cfg.dropout,
              "tinit": cfg.tinit, "tfinal": cfg.tfinal, "deltaT": cfg.delta_t, "beta1": cfg.beta1,
              "beta2": cfg.beta2, "orth_reg_weight": cfg.orth_reg_weight, "total_step": cfg.total_step,
              "rank_pattern": pattern, "modules_to_save": sorted(to_save) or None,
              "fan_in_fan_out": isinstance(model, GPT), "bias": "none", "init_lora_weights": True,
              "inference_mode": True, "base_model_name_or_path": None, "revision": None,
              "layers_to_transform": None, "layers_pattern": None}
    return config, tensors


def adalora_from_peft(model: nn.Module, config: dict, tensors: dict) -> None:
    inv: dict[str, list] = {}
    for name, (hf, slot) in module_map(model).items():
        inv.setdefault(hf, []).append((name, slot))
    parts: dict[str, dict] = {}
    extra: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if not key.startswith(PEFT_PREFIX):
            raise ValueError(f"adapter tensor {key!r} does not start with {PEFT_PREFIX!r}; not a PEFT AdaLoRA file")
        m = re.fullmatch(r"(.+)\.(lora_A|lora_E|lora_B)(\.weight)?", key[len(PEFT_PREFIX):])
        if m and m[1] not in inv:
            raise ValueError(f"adapter has AdaLoRA on {m[1]!r}, which this {type(model).__name__} does not have: "
                             f"the adapter was saved for a model of another shape")
        if m:
            parts.setdefault(m[1], {})[m[2]] = t
        else:
            extra[key[len(PEFT_PREFIX):]] = t
    R, alpha = int(config["init_r"]), config["lora_alpha"]
    pattern = {re.sub(r"\.lora_E(\.default)?$", "", k): v for k, v in (config.get("rank_pattern") or {}).items()}
    for hf, flags in pattern.items():
        if hf not in inv:
            raise ValueError(f"rank_pattern names {hf!r}, which this {type(model).__name__} does not have "
                             f"(modules here: {', '.join(sorted(inv)[:6])}, ...)")
        if hf not in parts:
            raise ValueError(f"rank_pattern names {hf!r}, but the file has no AdaLoRA tensors for it")
    per = {}  # minift module -> (A, E, B)
    for hf, p in parts.items():
        if set(p) != {"lora_A", "lora_E", "lora_B"}:
            raise ValueError(f"adapter file lacks lora_A, lora_E or lora_B for {hf}")
        k = p["lora_E"].shape[0]
        if hf in pattern and (len(pattern[hf]) != R or sum(pattern[hf]) != k):
            raise ValueError(f"rank_pattern of {hf} keeps {sum(pattern[hf])} of {len(pattern[hf])} triplets, but "
                             f"the file holds {k} of init_r={R}")
        for name, slot in inv[hf]:
            rows = slice(None) if slot is None else slice(slot * (p["lora_B"].shape[0] // 3),
                                                          (slot + 1) * (p["lora_B"].shape[0] // 3))
            per[name] = (p["lora_A"], p["lora_E"], p["lora_B"][rows])
    if not adalora.svd_modules(model):
        mts = []
        for hk in extra:
            mod = hk.rpartition(".")[0]
            if mod not in inv or inv[mod][0][1] is not None:
                raise ValueError(f"adapter tensor {PEFT_PREFIX + hk!r} matches no module of this model")
            mts.append(inv[mod][0][0])
        kw = dict(init_r=R, target_r=min(config.get("target_r", R), R), alpha=alpha,
                  dropout=config.get("lora_dropout", 0.0), targets=tuple(per), beta1=config.get("beta1", 0.85),
                  beta2=config.get("beta2", 0.85), orth_reg_weight=config.get("orth_reg_weight", 0.5),
                  modules_to_save=tuple(dict.fromkeys(mts)))
        try:  # the file's schedule when it is a valid one (an inference-only file may lack it)
            cfg = adalora.AdaLoRAConfig(**kw, tinit=config.get("tinit"), tfinal=config.get("tfinal"),
                                        delta_t=config.get("deltaT"), total_step=config.get("total_step"))
        except (ValueError, TypeError):
            cfg = adalora.AdaLoRAConfig(**kw, tinit=0, tfinal=0, delta_t=1, total_step=2)
        adalora.apply(model, cfg, rank_pattern={n: [True] * t[1].shape[0] for n, t in per.items()})
    have = dict(adalora.svd_modules(model))
    s_file = alpha / (R + 1e-5)
    for name, (A, E, B) in per.items():
        if name not in have:
            raise ValueError(f"adapter has AdaLoRA on {name}, which this model's AdaLoRA layers do not include")
        m = have[name]
        if m.merged:
            raise ValueError(f"{name} is merged; call adalora.unmerge(model) before loading an adapter")
        if abs(m.scaling - s_file) > 1e-6 * abs(s_file):
            raise ValueError(f"{name} has scaling {m.scaling:.6g} but the file implies {s_file:.6g} "
                             f"(init_r or lora_alpha differ)")
        copy_checked(m.lora_A, A, f"{name}.lora_A", name)
        copy_checked(m.lora_E, E, f"{name}.lora_E", name)
        copy_checked(m.lora_B, B, f"{name}.lora_B", name)
        m.lora_mask.fill_(True)
    own = dict(model.named_parameters())
    for hk, t in extra.items():  # modules_to_save: whole-module tensors
        mod, _, pname = hk.rpartition(".")
        if mod not in inv or inv[mod][0][1] is not None or f"{inv[mod][0][0]}.{pname}" not in own:
            raise ValueError(f"adapter tensor {PEFT_PREFIX + hk!r} matches no parameter of this model")
        key = f"{inv[mod][0][0]}.{pname}"
        copy_checked(own[key], t.t() if pname == "weight" and is_conv1d(model, mod) else t, hk, key)


# ============================================================ 6. prefix tuning and prompt tuning
#    (peft_type "PREFIX_TUNING" / "PROMPT_TUNING")
# Both learn one table: prefix tuning (P, 2 * n_layer * n_embd) — per virtual token, layer by
# layer, the key then the value, each n_head x head_dim — and prompt tuning (P, n_embd). PEFT
# stores it as the single tensor "prompt_embeddings" (for a reparameterized prefix: the table
# the MLP computes, as prefix.export does) and modules to save under "base_model.<HF name>"
# (no ".model": a prompt-learning PeftModel wraps the transformers model directly). The
# minift layout keeps the module's own tensors (the MLP too, so training can resume).

PEFT_PROMPT_PREFIX = "base_model."
_PEFT_PROMPT_INIT = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB"}  # "text": see prompt_learning_to_peft


def _virtual_module(model: nn.Module, kind: str):
    return model.prefix_encoder if kind == "PREFIX_TUNING" else model.soft_prompt


def prompt_learning_to_peft(model: nn.Module, kind: str) -> tuple[dict, dict]:
    n_layer, n_head, n_embd, _ = prefix.model_dims(model)
    mod = _virtual_module(model, kind)
    cfg = mod.config
    table = mod.table() if kind == "PREFIX_TUNING" else mod.embedding  # (P, 2LC) or (P, C)
    tensors = {"prompt_embeddings": table.detach()}
    mmap, to_save = module_map(model), set()
    for key, p in modules_to_save_params(model, cfg.modules_to_save).items():
        hk, transpose = hf_param_key(model, mmap, key)
        tensors[PEFT_PROMPT_PREFIX + hk] = p.t() if transpose else p
        to_save.add(hk.rpartition(".")[0])
    config = {"peft_type": kind, "task_type": task_type(model), "num_virtual_tokens": mod.num_virtual_tokens,
              "token_dim": n_embd, "num_transformer_submodules": 1, "num_attention_heads": n_head,
              "num_layers": n_layer, "modules_to_save": sorted(to_save) or None, "inference_mode": True,
              "base_model_name_or_path": None, "revision": None}
    if kind == "PREFIX_TUNING":
        config.update(prefix_projection=cfg.projection_dim is not None, init_weights=None,
                      encoder_hidden_size=cfg.projection_dim or n_embd)
    else:  # PEFT's TEXT init needs a tokenizer it can load by name; the init no longer matters once trained
        config.update(prompt_tuning_init=_PEFT_PROMPT_INIT.get(cfg.init, "RANDOM"), prompt_tuning_init_text=None,
                      tokenizer_name_or_path=None, tokenizer_kwargs=None)
    return config, tensors


def prompt_learning_from_peft(model: nn.Module, config: dict, tensors: dict) -> None:
    kind = config["peft_type"]
    n_layer, n_head, n_embd, _ = prefix.model_dims(model)
    if config.get("num_transformer_submodules", 1) != 1:
        raise ValueError("adapter was saved for an encoder-decoder model (num_transformer_submodules=2)")
    want = {"num_layers": n_layer, "token_dim": n_embd, "num_attention_heads": n_head}
    for k, v in want.items():
        if k in config and config[k] != v:
            raise ValueError(f"adapter has {k}={config[k]}, this model has {v}: saved for a model of another shape")
    if "prompt_embeddings" not in tensors:
        raise ValueError(f"adapter file has no 'prompt_embeddings' tensor; not a PEFT {kind} file")
    table = tensors["prompt_embeddings"]
    P = table.shape[0]
    if config.get("num_virtual_tokens", P) != P:
        raise ValueError(f"prompt_embeddings has {P} rows, the config says num_virtual_tokens="
                         f"{config['num_virtual_tokens']}")
    inv = {hf: name for name, (hf, slot) in module_map(model).items() if slot is None}
    extra = {}
    for key, t in tensors.items():
        if key == "prompt_embeddings":
            continue
        hk = key[len(PEFT_PROMPT_PREFIX):] if key.startswith(PEFT_PROMPT_PREFIX) else key
        mod_hf, _, pname = hk.rpartition(".")
        if mod_hf not in inv:
            raise ValueError(f"adapter tensor {key!r} matches no module of this model")
        extra[f"{inv[mod_hf]}.{pname}"] = t.t() if pname == "weight" and is_conv1d(model, mod_hf) else t
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
    _copy_all([(mod.embedding, table, "prompt_embeddings", f"{attr}.embedding")]
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
    _copy_all([(own[k], t, k, k) for k, t in tensors.items()])


def _copy_all(pairs) -> None:
    """Check every (parameter, tensor) shape first, then copy: a bad file changes nothing."""
    for dst, src, key, where in pairs:
        if tuple(src.shape) != tuple(dst.shape):
            copy_checked(dst, src, key, where)  # raises, naming both shapes
    for dst, src, key, where in pairs:
        copy_checked(dst, src, key, where)


def _prompt_learning_load_or_undo(model: nn.Module, load, config: dict, tensors: dict) -> None:
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
