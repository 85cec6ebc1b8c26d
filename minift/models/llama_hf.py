"""Llama's Hugging Face checkpoint layout: ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` directories
(``config.json`` + ``model.safetensors``) in minift's terms, for ``Llama.from_pretrained`` and
``save_pretrained`` (``llama.py``, which imports this module, never the other way round).

The architecture is in ``llama.py``; here is only what the files say and how it maps: the config
fields (with the two ways transformers has written RoPE's parameters), the fields minift refuses,
and the state-dict keys (transformers' names under ``model.``, the LM head apart).
"""
from __future__ import annotations

import json
import math

from minift.files import InputError, field
from minift.models import hf, rope
from minift.models.rope import RopeScaling

# Config fields that change what a checkpoint computes and the only values implemented here
# (field, default when absent, allowed values, what minift does instead); see ``hf.check_fields``.
HF_FIELDS = (
    ("hidden_act", "silu", ("silu",), "minift's Llama MLP is SwiGLU: silu(gate) * up"),
    ("use_sliding_window", False, (False,), "minift's Llama attends to the whole context"),
)
MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def rope_from_hf(raw: dict, source: str) -> tuple[float, RopeScaling | None]:
    """(rope_theta, rope_scaling) of a config.json: transformers 5 writes them in ``rope_parameters``,
    earlier versions as ``rope_theta`` and ``rope_scaling`` (whose kind was once called ``type``)."""
    r = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(r, dict):
        raise InputError(f"{source}: field 'rope_scaling' must be an object or null, got {r!r:.60}")
    theta = field(r, "rope_theta", float, source, default=None)
    theta = field(raw, "rope_theta", float, source, default=10000.0) if theta is None else theta
    kind = r.get("rope_type", r.get("type", "default"))
    if field(r, "partial_rotary_factor", float, source, default=1.0) != 1.0:
        raise InputError(f"{source}: partial_rotary_factor is not supported (minift's RoPE turns the whole head)")
    if kind == "default":
        return float(theta), None
    if kind not in rope.ROPE_TYPES:
        raise InputError(f"{source}: rope scaling {json.dumps(kind)} is not supported for Llama "
                         f"(supported: default, {', '.join(rope.ROPE_TYPES)})")
    kw = dict(type=kind, factor=float(field(r, "factor", float, source)))
    if kind == "llama3":
        kw.update(low_freq_factor=float(field(r, "low_freq_factor", float, source)),
                  high_freq_factor=float(field(r, "high_freq_factor", float, source)),
                  original_max_position_embeddings=field(
                      r, "original_max_position_embeddings", int, source,
                      default=field(raw, "max_position_embeddings", int, source, default=2048)))
    return float(theta), hf.build_config(RopeScaling, source, **kw)


def config_from_hf(raw: dict, source: str | None = None) -> dict:
    """The ``LlamaConfig`` fields of a Llama or Qwen2 config.json, checked (``hf.build_config``
    makes the config of them). ``source`` names the file in errors."""
    source = source or getattr(raw, "source", "config.json")
    hf.check_fields(raw, HF_FIELDS, "Llama", source)
    qwen2 = raw.get("model_type") == "qwen2"
    if qwen2 and any(t != "full_attention" for t in raw.get("layer_types") or []):
        raise InputError(f"{source}: layer_types other than 'full_attention' are not supported "
                         f"(minift's Llama attends to the whole context)")
    n_head = hf.size_field(raw, "num_attention_heads", source, "Llama")
    theta, scaling = rope_from_hf(raw, source)
    tok = (int, list, type(None))
    return dict(
        vocab_size=hf.size_field(raw, "vocab_size", source, "Llama"),
        n_layer=hf.size_field(raw, "num_hidden_layers", source, "Llama"), n_head=n_head,
        n_kv_head=hf.size_field(raw, "num_key_value_heads", source, "Llama", default=n_head),
        n_embd=hf.size_field(raw, "hidden_size", source, "Llama"),
        n_inner=hf.size_field(raw, "intermediate_size", source, "Llama"),
        head_dim=field(raw, "head_dim", int, source, default=None),
        max_position_embeddings=hf.size_field(raw, "max_position_embeddings", source, "Llama", default=2048),
        rms_norm_eps=hf.rate_field(raw, "rms_norm_eps", source, 1e-6, 0.0, math.inf),
        rope_theta=theta, rope_scaling=scaling,
        tie_word_embeddings=field(raw, "tie_word_embeddings", bool, source, default=False),
        attention_bias=not qwen2 and field(raw, "attention_bias", bool, source, default=False),
        qkv_bias=qwen2, mlp_bias=not qwen2 and field(raw, "mlp_bias", bool, source, default=False),
        attention_dropout=hf.rate_field(raw, "attention_dropout", source, 0.0, 0.0, 1.0),
        bos_token_id=field(raw, "bos_token_id", tok, source, default=None),
        eos_token_id=field(raw, "eos_token_id", tok, source, default=None),
        pad_token_id=field(raw, "pad_token_id", tok, source, default=None))


def state_from_hf(sd: dict, tied: bool) -> dict:
    """An HF Llama state dict in minift's names: the ``model.`` prefix dropped (and a tied
    ``lm_head``, and the RoPE buffers old checkpoints saved); unknown keys are passed through."""
    sd = hf.strip_prefix(sd, "model.")
    if tied:
        sd.pop("lm_head.weight", None)
    return {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}


def state_to_hf(sd: dict) -> dict:
    """minift's Llama state dict in HF's names (inverse of ``state_from_hf``)."""
    return {(k if k.startswith("lm_head.") else f"model.{k}"): v.detach().contiguous() for k, v in sd.items()}


def config_to_hf(c) -> dict:
    """The config.json of a ``LlamaConfig`` ``c``: ``LlamaForCausalLM``'s, or ``Qwen2ForCausalLM``'s
    for q/k/v-only biases."""
    qwen2 = c.qkv_bias and not c.attention_bias
    if qwen2 and c.mlp_bias:
        raise ValueError("q/k/v-only biases with MLP biases fit neither HF Llama nor Qwen2; cannot save_pretrained")
    s, scaling = c.rope_scaling, None
    if s is not None:
        scaling = {"rope_type": s.type, "factor": s.factor}
        if s.type == "llama3":
            scaling |= {"low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
                        "original_max_position_embeddings": s.original_max_position_embeddings}
    kind = "qwen2" if qwen2 else "llama"
    raw = {"model_type": kind, "architectures": [MODEL_TYPES[kind]], "vocab_size": c.vocab_size,
           "hidden_size": c.n_embd, "intermediate_size": c.n_inner, "num_hidden_layers": c.n_layer,
           "num_attention_heads": c.n_head, "num_key_value_heads": c.n_kv_head, "head_dim": c.head_dim,
           "hidden_act": "silu", "max_position_embeddings": c.max_position_embeddings,
           "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta, "rope_scaling": scaling,
           "tie_word_embeddings": c.tie_word_embeddings, "attention_dropout": c.attention_dropout,
           "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id}
    return raw | ({"use_sliding_window": False} if qwen2 else
                  {"attention_bias": c.attention_bias, "mlp_bias": c.mlp_bias})
