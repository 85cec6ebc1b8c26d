"""Hugging Face checkpoints <-> minift, with explicit key maps.

A checkpoint directory holds ``config.json`` and ``model.safetensors`` (weights are only
ever read from safetensors: unpickling a checkpoint can run code).

GPT-2 differences handled here:
- HF's GPT-2 uses ``Conv1D`` layers whose weight is (in, out): transposed to nn.Linear's
  (out, in) on load and back on save;
- the fused ``attn.c_attn`` (in, 3*out) is split into ``q_proj, k_proj, v_proj`` on load and
  joined back on save.
BERT maps one-to-one: ``attention.self.query -> attn.q_proj``, ``attention.output.dense ->
attn.o_proj``, ``intermediate.dense -> mlp.up_proj``, ``output.dense -> mlp.down_proj`` and
the LayerNorms. Unknown or missing keys and shape mismatches are errors naming the key.
Every error about the files is an InputError (``minift.files``): one line naming the file
(and the field or tensor): unreadable or non-JSON config.json, a size field missing or not an
integer, unreadable safetensors, an integer or boolean weight (never cast to float).
A config.json field asking for a computation minift's models do not implement (relative
positions, a decoder BERT, GPT-2's per-layer attention scaling, an untied LM head, another
activation, ...) is an error naming the field, its value and the supported values
(``_GPT_FIELDS``, ``_BERT_FIELDS``): never a model that loads and computes something else.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from minift.files import InputError, MissingFile, MissingKey, check_floating, field, read_json, read_safetensors
from minift.models.bert import Bert, BertClassifier, BertConfig
from minift.models.gpt import GPT, GPTConfig

# Keys a checkpoint may carry that minift deliberately has no use for: non-persistent
# buffers older transformers versions saved, and pre-training heads of BERT checkpoints.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "embeddings.position_ids")
_IGNORED_PREFIXES = ("cls.",)


# ---------------------------------------------------------------------------- reading

class ModelConfig(dict):
    """A config.json's fields, remembering the file they came from (``.source``): the readers
    below name it in their errors when called without a ``source``."""
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
    ``_IGNORED_SUFFIXES``, e.g. BERT's int64 position_ids, are dropped later and may be anything)."""
    f = Path(path) / "model.safetensors"
    if not f.is_file():
        found = sorted(p.name for p in Path(path).iterdir()) if Path(path).is_dir() else []
        raise MissingFile(f"{f}: does not exist (found: {', '.join(found) or 'nothing'}); "
                          f"minift reads weights from safetensors only")
    sd = read_safetensors(f, "model weights", floating=False)
    check_floating(f, sd, skip=_ignored)
    return sd


def _ignored(key: str) -> bool:
    return key.endswith(_IGNORED_SUFFIXES) or key.startswith(_IGNORED_PREFIXES)


def _expect_type(raw: dict, model_type: str, path) -> None:
    got = raw.get("model_type")
    if got != model_type:
        raise InputError(f"{Path(path) / 'config.json'} has model_type {got!r}; this loader reads {model_type!r}")


# Config fields that change what a checkpoint computes, and the only values minift's models
# implement: (field, default when absent, allowed values, what minift does instead). A checkpoint
# asking for anything else is refused at load, never loaded to compute something else.
_GPT_FIELDS = (
    ("activation_function", "gelu_new", ("gelu_new", "gelu_pytorch_tanh"),
     "minift's GPT-2 MLP uses tanh-approximated GELU"),
    ("scale_attn_weights", True, (True,), "minift's GPT-2 attention always scales scores by 1/sqrt(head_dim)"),
    ("scale_attn_by_inverse_layer_idx", False, (False,),
     "minift's GPT-2 attention does not divide scores by layer index + 1"),
    ("add_cross_attention", False, (False,), "minift's GPT-2 is decoder-only, without cross-attention layers"),
    ("tie_word_embeddings", True, (True,), "minift's GPT-2 LM head is the token embedding wte"),
)
# GPT-2's ``reorder_and_upcast_attn`` is accepted: it only makes HF's eager attention compute
# q.k^T in fp32 with the 1/sqrt(head_dim) scale folded into the matmul (a guard against fp16
# overflow). The function is the same: fp32 results agree to rounding (tested), and minift's
# SDPA already accumulates scores and softmax in fp32 under bf16 autocast.
_BERT_FIELDS = (
    ("hidden_act", "gelu", ("gelu", "gelu_python"), "minift's BERT uses exact (erf) GELU"),
    ("position_embedding_type", "absolute", ("absolute",),
     "minift's BERT has learned absolute position embeddings only"),
    ("is_decoder", False, (False,), "minift's BERT is a bidirectional encoder, without a causal mask"),
    ("add_cross_attention", False, (False,), "minift's BERT has no cross-attention layers"),
)


def _check_fields(raw: dict, table, model: str, source: str) -> None:
    """A one-line InputError naming the first field whose value minift does not implement."""
    for name, default, allowed, why in table:
        value = raw.get(name, default)
        if value is None:
            value = default
        if not any(type(value) is type(a) and value == a for a in allowed):  # true is not 1
            raise InputError(f"{source}: {name}={json.dumps(value)} is not supported for {model} ({why}; "
                             f"supported: {' or '.join(json.dumps(a) for a in allowed)})")


def _size(raw: dict, name: str, source: str, model: str, default=...) -> int:
    """An integer size field (>= 1): missing or of another type is an error naming the field."""
    if name not in raw and default is ...:
        raise InputError(f"{source} has no {name!r} key (needed for a {model} model)")
    value = field(raw, name, int, source, default=default)
    if value < 1:
        raise InputError(f"{source}: field {name!r} must be >= 1, got {value}")
    return value


def _rate(raw: dict, name: str, source: str, default: float, low: float, high: float) -> float:
    value = field(raw, name, float, source, default=default)
    if not low <= value < high:
        raise InputError(f"{source}: field {name!r} must be in [{low:g}, {high:g}), got {value}")
    return float(value)


def _build(cls, source: str, **kw):
    try:
        return cls(**kw)
    except ValueError as e:  # e.g. n_embd not divisible by n_head
        raise InputError(f"{source}: {e}") from None


def gpt_config_from_hf(raw: dict, source: str | None = None) -> GPTConfig:
    """The GPTConfig of a GPT-2 config.json. ``source`` names the file in errors (default: the
    file ``read_config`` read ``raw`` from)."""
    source = source or getattr(raw, "source", "config.json")
    _check_fields(raw, _GPT_FIELDS, "GPT-2", source)
    n_embd = _size(raw, "n_embd", source, "GPT-2")
    n_inner = field(raw, "n_inner", int, source, default=None)
    if n_inner is not None and n_inner < 1:
        raise InputError(f"{source}: field 'n_inner' must be >= 1 or null, got {n_inner}")
    return _build(GPTConfig, source, vocab_size=_size(raw, "vocab_size", source, "GPT-2"),
                  block_size=_size(raw, "n_positions", source, "GPT-2", default=1024),
                  n_layer=_size(raw, "n_layer", source, "GPT-2"), n_head=_size(raw, "n_head", source, "GPT-2"),
                  n_embd=n_embd, n_inner=n_inner, dropout=_rate(raw, "resid_pdrop", source, 0.0, 0.0, 1.0),
                  layer_norm_eps=_rate(raw, "layer_norm_epsilon", source, 1e-5, 0.0, math.inf))


def bert_config_from_hf(raw: dict, source: str | None = None) -> BertConfig:
    """The BertConfig of a BERT config.json. ``source`` names the file in errors (default: the
    file ``read_config`` read ``raw`` from)."""
    source = source or getattr(raw, "source", "config.json")
    _check_fields(raw, _BERT_FIELDS, "BERT", source)
    vocab_size = _size(raw, "vocab_size", source, "BERT")
    pad = field(raw, "pad_token_id", int, source, default=0)
    if not 0 <= pad < vocab_size:
        raise InputError(f"{source}: field 'pad_token_id' must be in [0, vocab_size={vocab_size}), got {pad}")
    return _build(BertConfig, source, vocab_size=vocab_size,
                  max_position_embeddings=_size(raw, "max_position_embeddings", source, "BERT"),
                  type_vocab_size=_size(raw, "type_vocab_size", source, "BERT", default=2),
                  n_layer=_size(raw, "num_hidden_layers", source, "BERT"),
                  n_head=_size(raw, "num_attention_heads", source, "BERT"),
                  n_embd=_size(raw, "hidden_size", source, "BERT"),
                  n_inner=_size(raw, "intermediate_size", source, "BERT"),
                  dropout=_rate(raw, "hidden_dropout_prob", source, 0.1, 0.0, 1.0),
                  layer_norm_eps=_rate(raw, "layer_norm_eps", source, 1e-12, 0.0, math.inf), pad_token_id=pad)


def _strip(sd: dict, prefix: str) -> dict:
    """Drop a model-class prefix ('transformer.', 'bert.') if the checkpoint has one."""
    if any(k.startswith(prefix) for k in sd):
        return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}
    return sd


def _load_into(model: torch.nn.Module, sd: dict, path, dtype) -> None:
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


# ---------------------------------------------------------------------------- GPT-2

_GPT_LAYER = {  # HF name inside transformer.h.{i}. -> minift name inside layers.{i}.
    "ln_1.weight": "ln_1.weight", "ln_1.bias": "ln_1.bias",
    "ln_2.weight": "ln_2.weight", "ln_2.bias": "ln_2.bias",
    "attn.c_proj.weight": "attn.o_proj.weight", "attn.c_proj.bias": "attn.o_proj.bias",
    "mlp.c_fc.weight": "mlp.up_proj.weight", "mlp.c_fc.bias": "mlp.up_proj.bias",
    "mlp.c_proj.weight": "mlp.down_proj.weight", "mlp.c_proj.bias": "mlp.down_proj.bias",
}
_GPT_CONV1D = ("attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight", "attn.c_attn.weight")


def gpt_state_from_hf(hf: dict, n_layer: int) -> dict:
    hf = _strip(hf, "transformer.")
    hf = {k: v for k, v in hf.items() if not k.endswith(_IGNORED_SUFFIXES)}
    hf.pop("lm_head.weight", None)  # tied to wte
    out = {}
    for name in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"):
        if name in hf:
            out[name] = hf.pop(name)
    for i in range(n_layer):
        src = f"h.{i}."
        for hk, mk in _GPT_LAYER.items():
            if src + hk in hf:
                w = hf.pop(src + hk)
                out[f"layers.{i}.{mk}"] = w.t().contiguous() if hk in _GPT_CONV1D else w
        if src + "attn.c_attn.weight" in hf:
            w = hf.pop(src + "attn.c_attn.weight").t()  # (3C, C) after the Conv1D transpose
            for name, part in zip(("q_proj", "k_proj", "v_proj"), w.chunk(3, dim=0)):
                out[f"layers.{i}.attn.{name}.weight"] = part.contiguous()
        if src + "attn.c_attn.bias" in hf:
            b = hf.pop(src + "attn.c_attn.bias")
            for name, part in zip(("q_proj", "k_proj", "v_proj"), b.chunk(3, dim=0)):
                out[f"layers.{i}.attn.{name}.bias"] = part.contiguous()
    out.update(hf)  # whatever is left is unknown and reported by _load_into
    return out


def gpt_state_to_hf(sd: dict, n_layer: int) -> dict:
    out = {f"transformer.{k}": sd[k] for k in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias")}
    for i in range(n_layer):
        for hk, mk in _GPT_LAYER.items():
            w = sd[f"layers.{i}.{mk}"]
            out[f"transformer.h.{i}.{hk}"] = w.t() if hk in _GPT_CONV1D else w
        qkv = [sd[f"layers.{i}.attn.{n}_proj.weight"] for n in "qkv"]
        out[f"transformer.h.{i}.attn.c_attn.weight"] = torch.cat(qkv, dim=0).t()  # (C, 3C)
        out[f"transformer.h.{i}.attn.c_attn.bias"] = torch.cat(
            [sd[f"layers.{i}.attn.{n}_proj.bias"] for n in "qkv"], dim=0)
    return {k: v.detach().contiguous() for k, v in out.items()}


def load_gpt(path, dtype=torch.float32) -> GPT:
    raw = read_config(path)
    _expect_type(raw, "gpt2", path)
    cfg = gpt_config_from_hf(raw, raw.source)
    model = GPT(cfg)
    _load_into(model, gpt_state_from_hf(read_weights(path), cfg.n_layer), path, dtype)
    return model


def save_gpt(model: GPT, path) -> None:
    c = model.config
    raw = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": c.vocab_size,
           "n_positions": c.block_size, "n_ctx": c.block_size, "n_layer": c.n_layer, "n_head": c.n_head,
           "n_embd": c.n_embd, "n_inner": c.n_inner, "activation_function": "gelu_new",
           "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout,
           "layer_norm_epsilon": c.layer_norm_eps, "tie_word_embeddings": True,
           "bos_token_id": c.vocab_size - 1, "eos_token_id": c.vocab_size - 1}
    _write(path, raw, gpt_state_to_hf(_base_state(model), c.n_layer))


# ---------------------------------------------------------------------------- BERT

_BERT_LAYER = {  # HF name inside encoder.layer.{i}. -> minift name inside layers.{i}.
    "attention.self.query": "attn.q_proj", "attention.self.key": "attn.k_proj",
    "attention.self.value": "attn.v_proj", "attention.output.dense": "attn.o_proj",
    "attention.output.LayerNorm": "ln_1", "intermediate.dense": "mlp.up_proj",
    "output.dense": "mlp.down_proj", "output.LayerNorm": "ln_2",
}
_BERT_TOP = {
    "embeddings.word_embeddings": "embeddings.word_embeddings",
    "embeddings.position_embeddings": "embeddings.position_embeddings",
    "embeddings.token_type_embeddings": "embeddings.token_type_embeddings",
    "embeddings.LayerNorm": "embeddings.ln", "pooler.dense": "pooler",
}


def bert_key_map(n_layer: int) -> dict[str, str]:
    """HF BertModel parameter name -> minift Bert parameter name."""
    m = {}
    for hk, mk in _BERT_TOP.items():
        for s in ("weight", "bias"):
            m[f"{hk}.{s}"] = f"{mk}.{s}"
    m.pop("embeddings.word_embeddings.bias"), m.pop("embeddings.position_embeddings.bias")
    m.pop("embeddings.token_type_embeddings.bias")
    for i in range(n_layer):
        for hk, mk in _BERT_LAYER.items():
            for s in ("weight", "bias"):
                m[f"encoder.layer.{i}.{hk}.{s}"] = f"layers.{i}.{mk}.{s}"
    return m


def load_bert(path, dtype=torch.float32, classifier: bool = False, num_labels: int | None = None):
    raw = read_config(path)
    _expect_type(raw, "bert", path)
    cfg = bert_config_from_hf(raw, raw.source)
    sd = {k: v for k, v in read_weights(path).items()
          if not k.endswith(_IGNORED_SUFFIXES) and not k.startswith(_IGNORED_PREFIXES)}
    head = {k: sd.pop(k) for k in ("classifier.weight", "classifier.bias") if k in sd}
    sd = _strip(sd, "bert.")
    kmap = bert_key_map(cfg.n_layer)
    mapped = {kmap.get(k, k): v for k, v in sd.items()}
    if "pooler.weight" not in mapped:  # some checkpoints (e.g. sentence encoders) lack a pooler
        mapped["pooler.weight"] = torch.eye(cfg.n_embd)
        mapped["pooler.bias"] = torch.zeros(cfg.n_embd)
    if not classifier:
        model = Bert(cfg)
        _load_into(model, mapped, path, dtype)
        return model
    f = Path(path) / "model.safetensors"
    if len(head) == 1:
        raise MissingKey(f"{f}: checkpoint has {next(iter(head))!r} but not "
                         f"{({'classifier.weight', 'classifier.bias'} - set(head)).pop()!r}")
    if head and (head["classifier.weight"].dim() != 2 or head["classifier.bias"].dim() != 1):
        raise InputError(f"{f}: classifier.weight must be 2-D and classifier.bias 1-D, got shapes "
                         f"{tuple(head['classifier.weight'].shape)} and {tuple(head['classifier.bias'].shape)}")
    if num_labels is None:
        labels = field(raw, "id2label", dict, raw.source, default={})
        num_labels = head["classifier.weight"].shape[0] if head else len(labels) or 2
    model = BertClassifier(cfg, num_labels)
    _load_into(model.bert, mapped, path, dtype)
    if head:
        if head["classifier.weight"].shape[0] != num_labels:
            raise InputError(f"{f}: checkpoint head has {head['classifier.weight'].shape[0]} labels, "
                             f"asked for num_labels={num_labels}")
        want = {"weight": tuple(model.classifier.weight.shape), "bias": tuple(model.classifier.bias.shape)}
        for k, v in head.items():
            if tuple(v.shape) != want[k.split(".", 1)[1]]:
                raise InputError(f"{f}: tensor {k!r} has shape {tuple(v.shape)}, the config implies "
                                 f"{want[k.split('.', 1)[1]]}")
        model.classifier.load_state_dict({k.split(".", 1)[1]: v for k, v in head.items()})
    model.to(dtype)
    return model


def save_bert(model: Bert | BertClassifier, path) -> None:
    bert = model.bert if isinstance(model, BertClassifier) else model
    c = bert.config
    raw = {"model_type": "bert", "vocab_size": c.vocab_size, "hidden_size": c.n_embd,
           "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head,
           "intermediate_size": c.n_inner, "hidden_act": "gelu",
           "hidden_dropout_prob": c.dropout, "attention_probs_dropout_prob": c.dropout,
           "max_position_embeddings": c.max_position_embeddings, "type_vocab_size": c.type_vocab_size,
           "layer_norm_eps": c.layer_norm_eps, "pad_token_id": c.pad_token_id}
    inv = {v: k for k, v in bert_key_map(c.n_layer).items()}
    base = _base_state(bert)
    if isinstance(model, BertClassifier):
        sd = {f"bert.{inv[k]}": v for k, v in base.items()}
        sd["classifier.weight"] = model.classifier.weight
        sd["classifier.bias"] = model.classifier.bias
        raw["architectures"] = ["BertForSequenceClassification"]
        raw["id2label"] = {str(i): f"LABEL_{i}" for i in range(model.num_labels)}
        raw["label2id"] = {f"LABEL_{i}": i for i in range(model.num_labels)}
    else:
        sd = {inv[k]: v for k, v in base.items()}
        raw["architectures"] = ["BertModel"]
    _write(path, raw, {k: v.detach().contiguous() for k, v in sd.items()})


# ---------------------------------------------------------------------------- writing

def _base_state(model: torch.nn.Module) -> dict:
    """The model's base weights. A model that carries an adapter is refused: its weights alone
    would silently drop the adaptation (merge + unload a LoRA first, or use save_adapter)."""
    plain = (torch.nn.Linear, torch.nn.Embedding, torch.nn.LayerNorm, torch.nn.Dropout, torch.nn.ModuleList)
    own = (GPT, Bert, BertClassifier)
    for name, m in model.named_modules():
        if not isinstance(m, plain + own) and not type(m).__module__.startswith("minift.models"):
            raise ValueError(f"cannot save_pretrained a model with an adapter ({name}: {type(m).__name__}); "
                             f"merge and unload it first (lora.unload / adalora.unload) or use save_adapter")
    return model.state_dict()


def _write(path, raw: dict, sd: dict) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / "model.safetensors.tmp"
    save_file(sd, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path / "model.safetensors")  # atomic: a crash never leaves half a file
    (path / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
