"""AdaLoRA adapter files (peft_type "ADALORA"): a save and a load function for each layout,
and the undo that leaves a model as it was when a load fails."""
from __future__ import annotations

import re
from dataclasses import asdict

import torch
import torch.nn as nn

from minift.adapters.hf_names import (PEFT_PREFIX, hf_modules, hf_param_key, module_map, modules_to_save_names,
                                      modules_to_save_pairs, require_modules_to_save, require_targets,
                                      split_peft_tensors, task_type)
from minift.adapters.io import (ConfigError, check_layers, check_pattern, check_peft_targets, copy_all,
                                modules_to_save_params, place_all, require_saved_params, settings_of, undo_fresh,
                                undo_point)
from minift.files import InputError, field
from minift.methods import adalora
from minift.models.gpt import GPT


# minift layout: the AdaLoRAConfig as JSON plus every module's rank; tensors lora_A, lora_E,
# lora_B and the kept-triplet mask lora_mask under minift's names (pruning state included).
# PEFT layout: only kept triplets are stored (as PEFT's resize_state_dict_by_rank_pattern does)
# and adapter_config.json holds ``rank_pattern`` {"<HF module>.lora_E": kept flags}; PEFT builds
# each layer at ``init_r``, keeps the flagged rows and scales by lora_alpha / (init_r + 1e-5).
# GPT-2's fused c_attn, as for LoRA (adapters/lora.py): exporting, the q/k/v triplets
# are stacked (A and E by rows, B as a block matrix whose row block j holds only slot j's
# columns), so the stacked layer has n * r triplets; the file's init_r is the widest stacked
# layer R, shorter patterns are padded with pruned (False) entries, and Λ is multiplied by
# (R + 1e-5) / (init_r + 1e-5) so the scaling alpha / (R + 1e-5) gives the same update. Importing
# a c_attn, each of q/k/v takes the full A, E and its row block of B (exact, as for LoRA).

def _adalora_config_of(model: nn.Module) -> adalora.AdaLoRAConfig:
    cfg = getattr(model, "adalora_config", None)
    if cfg is None:
        raise ValueError("model has AdaLoRA layers but no adalora_config; apply them with adalora.apply")
    return cfg


def adalora_check_config(config: dict, layout: str, where) -> None:
    """The fields the AdaLoRA loaders read have the types they need: InputError naming ``where``."""
    if layout == "minift":
        for n in field(config, "modules", dict, where):
            if field(config["modules"], n, int, f"{where}: modules") < 0:
                raise InputError(f"{where}: modules[{n!r}] must be a rank >= 0, got {config['modules'][n]}")
        settings_of(adalora.AdaLoRAConfig, field(config, "config", dict, where), where)
        return
    if field(config, "init_r", int, where) < 1:
        raise InputError(f"{where}: field 'init_r' must be >= 1, got {config['init_r']}")
    field(config, "lora_alpha", float, where)
    field(config, "target_r", int, where, default=config["init_r"])
    for name in ("lora_dropout", "beta1", "beta2", "orth_reg_weight"):
        field(config, name, float, where, default=0.0)
    for k, flags in check_pattern(config, "rank_pattern", list, where).items():
        if not all(isinstance(b, bool) for b in flags):
            raise InputError(f"{where}: rank_pattern[{k!r}] must be a list of true/false flags")
    check_peft_targets(config, where)


def adalora_load_or_undo(model: nn.Module, load, config: dict, tensors: dict) -> None:
    """Run an AdaLoRA loader; if it applied AdaLoRA to a plain model and then failed, take the
    layers out again WITHOUT merging (the original nn.Linear modules go back), so the model is
    left as it was, bit for bit. Every loader checks all keys and shapes before copying any
    tensor, so a failed load into a model that already has AdaLoRA changes nothing either."""
    fresh = not adalora.svd_modules(model)
    point = undo_point(model, "adalora_config") if fresh else None
    try:
        load(model, config, tensors)
    except Exception:
        if fresh and adalora.svd_modules(model):
            undo_fresh(model, point, adalora.SVDLinear, "adalora_config")
        raise


def adalora_to_minift(model: nn.Module) -> tuple[dict, dict]:
    mods, cfg = adalora.svd_modules(model), _adalora_config_of(model)
    tensors = {f"{n}.{k}": t for n, m in mods for k, t in m.state_dict().items() if k.startswith("lora_")}
    tensors.update(modules_to_save_params(model, cfg.modules_to_save))
    c = asdict(cfg)
    c["targets"], c["modules_to_save"] = list(cfg.targets), list(cfg.modules_to_save)
    return {"format": "minift", "peft_type": "ADALORA", "config": c, "modules": {n: m.r for n, m in mods}}, tensors


def adalora_from_minift(model: nn.Module, config: dict, tensors: dict) -> None:
    modules, cfg = config["modules"], adalora.AdaLoRAConfig(**config["config"])
    if not adalora.svd_modules(model):
        adalora.apply(model, cfg, rank_pattern={n: [True] * r for n, r in modules.items()})
    check_layers("AdaLoRA", dict(adalora.svd_modules(model)), modules,
                 lambda n, m: (("rank", modules[n], m.r), ("alpha", cfg.alpha, m.alpha),
                               ("init_r", cfg.init_r, m.ranknum)),
                 tensors, "adalora.unmerge(model)")
    require_saved_params(model, cfg.modules_to_save, tensors)
    place_all(model, tensors)


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
    """Load a PEFT AdaLoRA file: check the config, its rank_pattern and every triplet, apply AdaLoRA
    to a plain model (the file's kept ranks), match the layers one to one, then copy all at once."""
    mmap = module_map(model)
    inv = hf_modules(mmap)
    factors, extra = split_peft_tensors(model, tensors, inv, "lora_A|lora_E|lora_B", "AdaLoRA")
    R, alpha = int(config["init_r"]), config["lora_alpha"]
    pattern = _peft_rank_pattern(model, config, inv, factors)
    require_targets(config, model, mmap, factors, "AdaLoRA")
    require_modules_to_save(model, mmap, config.get("modules_to_save"), extra, PEFT_PREFIX)
    per = {}  # minift module -> (A, E, B)
    for hf, parts in factors.items():
        per.update(_peft_triplets(hf, parts, pattern, R, inv[hf]))
    if not adalora.svd_modules(model):
        _apply_peft_config(model, config, per, modules_to_save_names(inv, extra))
    pairs = _peft_pairs(model, per, s_file=alpha / (R + 1e-5))
    pairs += modules_to_save_pairs(model, inv, extra)  # modules_to_save: whole-module tensors
    copy_all(pairs)  # every shape checked before any tensor is copied


def _peft_rank_pattern(model: nn.Module, config: dict, inv: dict, factors: dict) -> dict[str, list]:
    """The config's rank_pattern keyed by HF module; each module it names exists and has triplets."""
    pattern = {re.sub(r"\.lora_E(\.default)?$", "", k): v for k, v in (config.get("rank_pattern") or {}).items()}
    for hf in pattern:
        if hf not in inv:
            raise ConfigError(f"rank_pattern names {hf!r}, which this {type(model).__name__} does not have "
                              f"(modules here: {', '.join(sorted(inv)[:6])}, ...)")
        if hf not in factors:
            raise ValueError(f"rank_pattern names {hf!r}, but the file has no AdaLoRA tensors for it: "
                             f"the file is incomplete")
    return pattern


def _peft_triplets(hf: str, p: dict, pattern: dict, R: int, members: list) -> dict[str, tuple]:
    """One HF module's kept triplets, checked against the config: minift module -> (A, E, B), each
    of q/k/v (``members``: [(name, slot)]) taking the full A and E and its row block of B."""
    lacking = [k for k in ("lora_A", "lora_E", "lora_B") if k not in p]
    if lacking:
        raise ValueError(f"adapter file has no {hf}.{lacking[0]} tensor (it has {', '.join(sorted(p))} "
                         f"for that layer): the file is incomplete")
    if p["lora_A"].dim() != 2 or p["lora_B"].dim() != 2 or p["lora_E"].dim() != 2 or p["lora_E"].shape[1] != 1:
        raise ValueError(f"adapter tensors of {hf} have shapes lora_A {tuple(p['lora_A'].shape)}, lora_E "
                         f"{tuple(p['lora_E'].shape)}, lora_B {tuple(p['lora_B'].shape)}; AdaLoRA needs "
                         f"(k, in), (k, 1) and (out, k)")
    k = p["lora_E"].shape[0]
    if hf in pattern and (len(pattern[hf]) != R or sum(pattern[hf]) != k):
        raise ConfigError(f"{hf}: rank_pattern keeps {sum(pattern[hf])} of {len(pattern[hf])} triplets, but "
                          f"the adapter file holds {k} (lora_E {tuple(p['lora_E'].shape)}) of init_r={R}")
    if hf not in pattern and k != R:
        raise ConfigError(f"{hf}: the config's init_r={R} (no rank_pattern entry for it), but the adapter file "
                          f"holds {k} triplets (lora_E {tuple(p['lora_E'].shape)})")
    out = {}
    for name, slot in members:
        rows = slice(None) if slot is None else slice(slot * (p["lora_B"].shape[0] // 3),
                                                      (slot + 1) * (p["lora_B"].shape[0] // 3))
        out[name] = (p["lora_A"], p["lora_E"], p["lora_B"][rows])
    return out


def _apply_peft_config(model: nn.Module, config: dict, per: dict, modules_to_save: tuple[str, ...]) -> None:
    """AdaLoRA on a plain model as the PEFT file has it: every layer in ``per`` with its kept
    triplets, the file's settings, and its schedule when that is a valid one."""
    R = int(config["init_r"])

    def get(name, default):  # PEFT's default for an absent or null field
        return default if config.get(name) is None else config[name]
    kw = dict(init_r=R, target_r=min(get("target_r", R), R), alpha=config["lora_alpha"],
              dropout=get("lora_dropout", 0.0), targets=tuple(per), beta1=get("beta1", 0.85),
              beta2=get("beta2", 0.85), orth_reg_weight=get("orth_reg_weight", 0.5), modules_to_save=modules_to_save)
    try:  # the file's schedule when it is a valid one (an inference-only file may lack it)
        cfg = adalora.AdaLoRAConfig(**kw, tinit=config.get("tinit"), tfinal=config.get("tfinal"),
                                    delta_t=config.get("deltaT"), total_step=config.get("total_step"))
    except (ValueError, TypeError):
        try:
            cfg = adalora.AdaLoRAConfig(**kw, tinit=0, tfinal=0, delta_t=1, total_step=2)
        except (ValueError, TypeError) as e:  # e.g. lora_alpha <= 0, beta1 >= 1
            raise ConfigError(str(e)) from None
    adalora.apply(model, cfg, rank_pattern={n: [True] * t[1].shape[0] for n, t in per.items()})


def _peft_pairs(model: nn.Module, per: dict, s_file: float) -> list:
    """(dst, src, key, where) for every triplet in ``per`` (and a mask keeping all of them), each
    checked against its layer; the model's AdaLoRA layers and the file's match one to one."""
    have = dict(adalora.svd_modules(model))
    pairs = []
    for name, (A, E, B) in per.items():
        if name not in have:
            raise ValueError(f"adapter has AdaLoRA on {name}, which this model's AdaLoRA layers do not include")
        m = have[name]
        if m.merged:
            raise ValueError(f"{name} is merged; call adalora.unmerge(model) before loading an adapter")
        if abs(m.scaling - s_file) > 1e-6 * abs(s_file):
            raise ValueError(f"{name} has scaling {m.scaling:.6g} but the file implies {s_file:.6g} "
                             f"(init_r or lora_alpha differ)")
        pairs += [(m.lora_A, A, f"{name}.lora_A", name), (m.lora_E, E, f"{name}.lora_E", name),
                  (m.lora_B, B, f"{name}.lora_B", name),
                  (m.lora_mask, torch.ones(E.shape[0], dtype=torch.bool), f"{name}.lora_mask", name)]
    for name in have:
        if name not in per:
            raise ValueError(f"this model has AdaLoRA on {name!r}, the adapter file has none for it")
    return pairs
