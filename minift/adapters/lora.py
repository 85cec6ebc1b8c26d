"""LoRA adapter files (peft_type "LORA"), the worked example: a save and a load function for
each layout, and the undo that leaves a model as it was when a load fails.

minift layout: the LoRAConfig as JSON plus every module's own (r, alpha), keys as in
minift's state dict. PEFT layout: see lora_to_peft below.
"""
from __future__ import annotations

from dataclasses import asdict

import torch
import torch.nn as nn

from minift.adapters.hf_names import (PEFT_PREFIX, hf_modules, hf_param_key, module_map, modules_to_save_names,
                                      modules_to_save_pairs, pattern_value, require_modules_to_save, require_targets,
                                      split_peft_tensors, task_type)
from minift.adapters.io import (ConfigError, check_layers, check_pattern, check_peft_targets, copy_all,
                                modules_to_save_params, place_all, require_saved_params, settings_of, undo_fresh,
                                undo_point)
from minift.files import InputError, field
from minift.methods import lora
from minift.models.gpt import GPT


def lora_load_or_undo(model: nn.Module, load, config: dict, tensors: dict) -> None:
    """Run a LoRA loader; if it applied LoRA to a plain model and then failed (a file for
    another model shape), take the layers out again WITHOUT merging, so the model is left as it
    was, bit for bit. Every loader checks all keys and shapes before copying any tensor, so a
    failed load into a model that already has LoRA layers changes nothing either."""
    fresh = not lora.lora_modules(model)
    point = undo_point(model, "lora_config", _pissa_targets(model, config)) if fresh else None
    try:
        load(model, config, tensors)
    except Exception:
        if fresh and lora.lora_modules(model):
            undo_fresh(model, point, lora.LoRALinear, "lora_config")
        raise


def lora_check_config(config: dict, layout: str, where) -> None:
    """The fields the LoRA loaders read have the types they need: InputError naming ``where``."""
    if layout == "minift":
        modules = field(config, "modules", dict, where)
        for n, v in modules.items():
            if not isinstance(v, dict):
                raise InputError(f"{where}: modules[{n!r}] must be a JSON object with r and alpha")
            field(v, "r", int, f"{where}: modules[{n!r}]")
            field(v, "alpha", float, f"{where}: modules[{n!r}]")
        settings_of(lora.LoRAConfig, field(config, "config", dict, where), where)
        return
    if field(config, "r", int, where) < 1:
        raise InputError(f"{where}: field 'r' must be >= 1, got {config['r']}")
    field(config, "lora_alpha", float, where)
    field(config, "lora_dropout", float, where, default=0.0)
    for name in ("use_rslora", "use_dora"):
        field(config, name, bool, where, default=False)
    check_pattern(config, "rank_pattern", int, where)
    check_pattern(config, "alpha_pattern", float, where)
    check_peft_targets(config, where)


def _pissa_targets(model: nn.Module, config: dict) -> list[str]:
    """Linear layers a PiSSA init would rewrite (W0 -> residual): their weights are snapshotted."""
    c = config.get("config") or {}
    if c.get("init") != "pissa":
        return []
    targets = list(config.get("modules") or c.get("targets") or ())
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
            and (not targets or any(n == t or n.endswith("." + t) for t in targets))]


def lora_config_of(model: nn.Module, mods) -> lora.LoRAConfig:
    """``model.lora_config``, else one rebuilt from its LoRA layers ``mods`` (name, layer)."""
    cfg = getattr(model, "lora_config", None)
    if cfg is not None:
        return cfg
    m0 = mods[0][1]  # a model whose config attribute was dropped: rebuild one from the layers
    return lora.LoRAConfig(r=m0.r, alpha=m0.alpha, targets=tuple(n for n, _ in mods), rslora=m0.rslora,
                           dora=m0.dora, init=m0.init,
                           dropout=m0.dropout.p if isinstance(m0.dropout, nn.Dropout) else 0.0)


def lora_to_minift(model: nn.Module) -> tuple[dict, dict]:
    mods = lora.lora_modules(model)
    cfg = lora_config_of(model, mods)
    tensors = {f"{n}.{pn}": p for n, m in mods for pn, p in m.named_parameters() if pn.startswith("lora_")}
    tensors.update(modules_to_save_params(model, cfg.modules_to_save))
    c = asdict(cfg)
    c["targets"], c["modules_to_save"] = list(cfg.targets), list(cfg.modules_to_save)
    config = {"format": "minift", "peft_type": "LORA", "config": c,
              "modules": {n: {"r": m.r, "alpha": m.alpha} for n, m in mods}}
    return config, tensors


def lora_from_minift(model: nn.Module, config: dict, tensors: dict) -> None:
    modules, c = config["modules"], config["config"]
    rslora, dora = bool(c.get("rslora", False)), bool(c.get("dora", False))
    if not lora.lora_modules(model):
        cfg = lora.LoRAConfig(**{**c, "targets": tuple(modules)})
        lora.apply(model, cfg, ranks={n: (v["r"], v["alpha"]) for n, v in modules.items()})
        model.lora_config = lora.LoRAConfig(**c)
    check_layers("LoRA", dict(lora.lora_modules(model)), modules,
                 lambda n, m: (("r", modules[n]["r"], m.r), ("alpha", modules[n]["alpha"], m.alpha),
                               ("rslora", rslora, m.rslora), ("dora", dora, m.dora)),
                 tensors, "lora.unmerge(model)")
    require_saved_params(model, c.get("modules_to_save"), tensors)
    place_all(model, tensors)


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
    cfg = lora_config_of(model, mods)
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


def _split_qkv(model, hf: str, parts: dict, members, s_file: float) -> list:
    """Check a c_attn LoRA against the model's q/k/v LoRAs; (dst, src, key, where) pairs to copy."""
    A, B, mag = parts["lora_A"], parts["lora_B"], parts.get("lora_magnitude_vector")
    members = sorted(members, key=lambda t: t[0])
    R, C = A.shape[0], members[0][2].out_features
    if B.shape != (3 * C, R):
        raise ValueError(f"adapter tensor for {hf}.lora_B has shape {tuple(B.shape)}; this model's c_attn "
                         f"needs ({3 * C}, {R}): the adapter was saved for a model of another shape")
    n, r = len(members), members[0][2].r
    pairs = []
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
        pairs.append((m.lora_A, A[cols.start:cols.stop] if not shared else A, f"{hf}.lora_A.weight", name))
        pairs.append((m.lora_B, B[rows, cols], f"{hf}.lora_B.weight", name))
        if m.dora:
            if mag is None or mag.shape != (3 * C,):
                raise ValueError(f"adapter tensor for {hf}.lora_magnitude_vector has shape "
                                 f"{None if mag is None else tuple(mag.shape)}; this model's c_attn needs ({3 * C},)")
            pairs.append((m.lora_magnitude, mag[rows], f"{hf}.lora_magnitude_vector", name))
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
    return pairs


def lora_from_peft(model: nn.Module, config: dict, tensors: dict) -> None:
    """Load a PEFT LoRA file: check the config and every factor, apply LoRA to a plain model (the
    file's ranks), match the model's LoRA layers one to one, then copy all tensors at once."""
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise ConfigError("PEFT LoRA with trained biases (bias != 'none' or lora_bias) is not supported")
    if str(config.get("init_lora_weights", True)).startswith("pissa"):
        raise ConfigError("PEFT PiSSA adapters are stored against PEFT's residual base; not supported")
    mmap = module_map(model)
    inv = hf_modules(mmap)
    factors, extra = split_peft_tensors(model, tensors, inv, "lora_A|lora_B|lora_magnitude_vector", "LoRA")
    dora = bool(config.get("use_dora"))
    require_targets(config, model, mmap, factors, "LoRA")
    require_modules_to_save(model, mmap, config.get("modules_to_save"), extra, PEFT_PREFIX)
    scale = {hf: _peft_rank_alpha(config, hf, parts, dora) for hf, parts in factors.items()}  # (r, alpha)
    if not lora.lora_modules(model):
        _apply_peft_config(model, config, inv, extra, scale)
    pairs = _peft_pairs(model, inv, factors, scale, bool(config.get("use_rslora")), dora)
    pairs += modules_to_save_pairs(model, inv, extra)  # modules_to_save: whole-module tensors
    copy_all(pairs)  # every shape checked before any tensor is copied


def _peft_rank_alpha(config: dict, hf: str, parts: dict, dora: bool) -> tuple[int, float]:
    """Check one LoRA's factors in a PEFT file; its (r, alpha) as the config gives them."""
    lacking = [k for k in ("lora_A", "lora_B") + (("lora_magnitude_vector",) if dora else ()) if k not in parts]
    if lacking:
        raise ValueError(f"adapter file has no {hf}.{lacking[0]} tensor (it has "
                         f"{', '.join(sorted(parts))} for that layer): the file is incomplete")
    A, B = parts["lora_A"], parts["lora_B"]
    if A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(f"adapter tensors {hf}.lora_A {tuple(A.shape)} and {hf}.lora_B {tuple(B.shape)} are "
                         f"not the factors (r, in) and (out, r) of one LoRA")
    if dora and parts["lora_magnitude_vector"].dim() != 1:
        raise ValueError(f"adapter tensor {hf}.lora_magnitude_vector has shape "
                         f"{tuple(parts['lora_magnitude_vector'].shape)}; it must be a vector")
    r = pattern_value(config.get("rank_pattern"), hf, config["r"])
    if A.shape[0] != r:
        source = "rank_pattern" if pattern_value(config.get("rank_pattern"), hf, None) is not None else "r"
        raise ConfigError(f"{hf}: the config's {source} gives r={r}, but its lora_A in the adapter file has "
                          f"rank {A.shape[0]} (shape {tuple(A.shape)})")
    return A.shape[0], pattern_value(config.get("alpha_pattern"), hf, config["lora_alpha"])


def _apply_peft_config(model: nn.Module, config: dict, inv: dict, extra: dict, scale: dict) -> None:
    """LoRA on a plain model as the PEFT file has it: every minift layer of each adapted HF module
    (q, k and v for GPT-2's c_attn) with that module's (r, alpha), and its modules_to_save."""
    ranks = {name: scale[hf] for hf in scale for name, _ in inv[hf]}
    modules_to_save = modules_to_save_names(inv, extra)
    init = "gaussian" if config.get("init_lora_weights") == "gaussian" else "default"
    try:
        cfg = lora.LoRAConfig(r=config["r"], alpha=config["lora_alpha"], dropout=config.get("lora_dropout") or 0.0,
                              targets=tuple(ranks), rslora=bool(config.get("use_rslora")),
                              dora=bool(config.get("use_dora")), init=init, modules_to_save=modules_to_save)
    except ValueError as e:  # e.g. lora_alpha <= 0, lora_dropout >= 1
        raise ConfigError(str(e)) from None
    lora.apply(model, cfg, ranks=ranks)


def _peft_pairs(model: nn.Module, inv: dict, factors: dict, scale: dict, rslora: bool, dora: bool) -> list:
    """(dst, src, key, where) for every LoRA factor of the file, each checked against its layer;
    the model's LoRA layers and the file's must match one to one. Copies nothing."""
    have = dict(lora.lora_modules(model))
    pairs, covered = [], set()
    for hf, parts in factors.items():
        members = [(slot, name, have[name]) for name, slot in inv[hf] if name in have]
        if not members:
            raise ValueError(f"adapter has a LoRA on {hf} ({', '.join(n for n, _ in inv[hf])} in minift), "
                             f"which this model's LoRA layers do not include")
        covered.update(name for _, name, _ in members)
        if any(m.merged for _, _, m in members):
            raise ValueError(f"{members[0][1]} is merged; call lora.unmerge(model) before loading an adapter")
        if any(m.dora != dora for _, _, m in members):
            raise ValueError(f"{members[0][1]}: the adapter file has use_dora={dora}, the model's layer does not")
        s_file = lora.lora_scaling(*scale[hf], rslora)
        if members[0][0] is not None:
            pairs += _split_qkv(model, hf, parts, members, s_file)
            continue
        _, name, m = members[0]
        _check_scaling(name, m, s_file)
        pairs.append((m.lora_A, parts["lora_A"], f"{hf}.lora_A.weight", name))
        pairs.append((m.lora_B, parts["lora_B"], f"{hf}.lora_B.weight", name))
        if dora:
            pairs.append((m.lora_magnitude, parts["lora_magnitude_vector"], f"{hf}.lora_magnitude_vector", name))
    for name in have:
        if name not in covered:
            raise ValueError(f"this model has a LoRA on {name!r}, the adapter file has none for it")
    return pairs
