"""A minimal BERT encoder in plain PyTorch.

Reads top to bottom: config, embeddings, MLP, layer, encoder model, classifier, loading.
Post-LayerNorm blocks, exact (erf) GELU, a padding attention mask and a tanh pooler, as in
the original BERT; the attention is the one GPT uses too (``minift/models/layers.py``), not
causal. Module names follow minift's convention (``q_proj, k_proj, v_proj, o_proj``;
``up_proj, down_proj``) so LoRA targets are shared with GPT; the map to Hugging Face's
``query/key/value/attention.output.dense/intermediate.dense/output.dense`` is the loading
section at the end.

``prefix`` (one ``(k, v)`` per layer, each (B, n_head, P, head_dim)) is prepended to every
layer's keys/values and seen by every token: deep prompts / P-tuning v2 on an encoder. As in
Hugging Face BERT with past keys/values, the positions of the real tokens start at P.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from minift.files import InputError, MissingKey, field
from minift.models import hf
from minift.models.layers import KV, SelfAttention, attention_bias, frozen_below, run_block


@dataclass
class BertConfig:
    vocab_size: int = 30522
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_inner: int = 3072
    dropout: float = 0.1  # hidden and attention-probability dropout
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0

    def __post_init__(self):
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        for name in ("vocab_size", "max_position_embeddings", "n_layer", "n_head", "n_embd", "n_inner"):
            if getattr(self, name) < 1:
                raise ValueError(f"BertConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


@dataclass
class BertOutput:
    last_hidden_state: torch.Tensor
    pooled: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class ClassifierOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


class Embeddings(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.n_embd, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.n_embd)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.n_embd)
        self.ln = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, input_ids=None, token_type_ids=None, inputs_embeds=None, start: int = 0):
        x = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        B, T, _ = x.shape
        if token_type_ids is None:
            token_type_ids = torch.zeros(B, T, dtype=torch.long, device=x.device)
        pos = torch.arange(start, start + T, device=x.device)
        x = x + self.position_embeddings(pos) + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.ln(x))


class MLP(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.up_proj = nn.Linear(cfg.n_embd, cfg.n_inner)
        self.down_proj = nn.Linear(cfg.n_inner, cfg.n_embd)

    def forward(self, x):
        return self.down_proj(F.gelu(self.up_proj(x)))


class Layer(nn.Module):
    """Post-LN: x = LN(x + Attn(x)); x = LN(x + MLP(x))."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attn = SelfAttention(cfg.n_embd, cfg.n_head, cfg.dropout, causal=False)
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, bias=None, prefix: KV | None = None):
        a, _ = self.attn(x, bias, prefix)
        x = self.ln_1(x + self.dropout(a))
        return self.ln_2(x + self.dropout(self.mlp(x)))


class Bert(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.n_layer))
        self.pooler = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.grad_from_layer = 0  # as in GPT: layers below run without autograd when frozen
        self.checkpointing = False  # as in GPT: recompute each layer in backward
        self.apply(_init_weights)

    @property
    def wte(self) -> nn.Embedding:
        return self.embeddings.word_embeddings  # the same name as GPT's token embedding

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, *,
                inputs_embeds=None, prefix: list[KV] | None = None,
                output_hidden_states=False) -> BertOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if prefix is not None and len(prefix) != len(self.layers):
            raise ValueError(f"prefix has {len(prefix)} layers, the model has {len(self.layers)}")
        P = 0 if prefix is None else prefix[0][0].shape[2]
        T = (input_ids if inputs_embeds is None else inputs_embeds).shape[1]
        if P + T > self.config.max_position_embeddings:
            raise ValueError(f"prefix ({P}) + sequence ({T}) = {P + T} exceeds "
                             f"max_position_embeddings {self.config.max_position_embeddings}")
        x = self.embeddings(input_ids, token_type_ids, inputs_embeds, start=P)  # (B, T, C)
        bias = attention_bias(T, P, attention_mask, False, x.dtype, x.device)
        hidden = [x]
        for i, layer in enumerate(self.layers):
            with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen_below(self, i, x, prefix)):
                x = run_block(self, layer, x, bias, None if prefix is None else prefix[i])
            if output_hidden_states:  # kept only when asked: under no_grad nothing else holds them
                hidden.append(x)
        pooled = torch.tanh(self.pooler(x[:, 0]))  # (B, C) from the first ([CLS]) token
        return BertOutput(x, pooled, tuple(hidden) if output_hidden_states else None)

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32) -> "Bert":
        """A BERT encoder from a Hugging Face directory (``config.json``, ``model.safetensors``)."""
        return load_hf(path, dtype)

    def save_pretrained(self, path) -> None:
        """Write a Hugging Face BertModel directory."""
        save_hf(self, path)


class BertClassifier(nn.Module):
    """BERT + dropout + a linear head on the pooled [CLS] output (HF's BertForSequenceClassification)."""

    def __init__(self, cfg: BertConfig, num_labels: int = 2):
        super().__init__()
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        self.config = cfg
        self.num_labels = num_labels
        self.bert = Bert(cfg)
        self.dropout = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(cfg.n_embd, num_labels)
        _init_weights(self.classifier)

    @property
    def layers(self) -> nn.ModuleList:
        return self.bert.layers

    @property
    def wte(self) -> nn.Embedding:
        return self.bert.wte

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, *,
                inputs_embeds=None, prefix: list[KV] | None = None,
                output_hidden_states=False) -> ClassifierOutput:
        out = self.bert(input_ids, attention_mask, token_type_ids, inputs_embeds=inputs_embeds,
                        prefix=prefix, output_hidden_states=output_hidden_states)
        logits = self.classifier(self.dropout(out.pooled))  # (B, num_labels)
        loss = None
        if labels is not None:
            if self.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1).float(), labels.float())
            else:
                # the mean over labels that are not -100; 0 when there is none (a rank's rows may all
                # be rows that pad a batch to one shape, training/data.py pad_rows), not NaN
                n = (labels != -100).sum().clamp_min(1)
                loss = F.cross_entropy(logits.float(), labels, reduction="sum") / n
        return ClassifierOutput(logits, loss, out.hidden_states)

    @classmethod
    def from_pretrained(cls, path, num_labels: int | None = None, dtype=torch.float32) -> "BertClassifier":
        """A BertForSequenceClassification directory; a checkpoint without a head gets a new one
        with ``num_labels`` outputs (default: its config's id2label, else 2)."""
        return load_hf(path, dtype, classifier=True, num_labels=num_labels)

    def save_pretrained(self, path) -> None:
        """Write a Hugging Face BertForSequenceClassification directory."""
        save_hf(self, path)


def _init_weights(m):
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, mean=0.0, std=0.02)
    if isinstance(m, nn.Linear) and m.bias is not None:
        nn.init.zeros_(m.bias)
    if isinstance(m, nn.Embedding) and m.padding_idx is not None:
        with torch.no_grad():
            m.weight[m.padding_idx].zero_()


# ---------------------------------------------------------------------------- loading

# Config fields that change what a checkpoint computes and the only values this BERT implements
# (field, default when absent, allowed values, what it does instead); see ``hf.check_fields``.
HF_FIELDS = (
    ("hidden_act", "gelu", ("gelu", "gelu_python"), "minift's BERT uses exact (erf) GELU"),
    ("position_embedding_type", "absolute", ("absolute",),
     "minift's BERT has learned absolute position embeddings only"),
    ("is_decoder", False, (False,), "minift's BERT is a bidirectional encoder, without a causal mask"),
    ("add_cross_attention", False, (False,), "minift's BERT has no cross-attention layers"),
)


def config_from_hf(raw: dict, source: str | None = None) -> BertConfig:
    """The BertConfig of a BERT config.json. ``source`` names the file in errors (default: the
    file ``hf.read_config`` read ``raw`` from)."""
    source = source or getattr(raw, "source", "config.json")
    hf.check_fields(raw, HF_FIELDS, "BERT", source)
    vocab_size = hf.size_field(raw, "vocab_size", source, "BERT")
    pad = field(raw, "pad_token_id", int, source, default=0)
    if not 0 <= pad < vocab_size:
        raise InputError(f"{source}: field 'pad_token_id' must be in [0, vocab_size={vocab_size}), got {pad}")
    return hf.build_config(
        BertConfig, source, vocab_size=vocab_size,
        max_position_embeddings=hf.size_field(raw, "max_position_embeddings", source, "BERT"),
        type_vocab_size=hf.size_field(raw, "type_vocab_size", source, "BERT", default=2),
        n_layer=hf.size_field(raw, "num_hidden_layers", source, "BERT"),
        n_head=hf.size_field(raw, "num_attention_heads", source, "BERT"),
        n_embd=hf.size_field(raw, "hidden_size", source, "BERT"),
        n_inner=hf.size_field(raw, "intermediate_size", source, "BERT"),
        dropout=hf.rate_field(raw, "hidden_dropout_prob", source, 0.1, 0.0, 1.0),
        layer_norm_eps=hf.rate_field(raw, "layer_norm_eps", source, 1e-12, 0.0, math.inf), pad_token_id=pad)


HF_LAYER = {  # HF name inside encoder.layer.{i}. -> minift name inside layers.{i}.
    "attention.self.query": "attn.q_proj", "attention.self.key": "attn.k_proj",
    "attention.self.value": "attn.v_proj", "attention.output.dense": "attn.o_proj",
    "attention.output.LayerNorm": "ln_1", "intermediate.dense": "mlp.up_proj",
    "output.dense": "mlp.down_proj", "output.LayerNorm": "ln_2",
}
HF_TOP = {
    "embeddings.word_embeddings": "embeddings.word_embeddings",
    "embeddings.position_embeddings": "embeddings.position_embeddings",
    "embeddings.token_type_embeddings": "embeddings.token_type_embeddings",
    "embeddings.LayerNorm": "embeddings.ln", "pooler.dense": "pooler",
}


def hf_key_map(n_layer: int) -> dict[str, str]:
    """HF BertModel parameter name -> minift Bert parameter name."""
    m = {}
    for hk, mk in HF_TOP.items():
        for s in ("weight", "bias"):
            m[f"{hk}.{s}"] = f"{mk}.{s}"
    m.pop("embeddings.word_embeddings.bias"), m.pop("embeddings.position_embeddings.bias")
    m.pop("embeddings.token_type_embeddings.bias")
    for i in range(n_layer):
        for hk, mk in HF_LAYER.items():
            for s in ("weight", "bias"):
                m[f"encoder.layer.{i}.{hk}.{s}"] = f"layers.{i}.{mk}.{s}"
    return m


def load_hf(path, dtype=torch.float32, classifier: bool = False, num_labels: int | None = None):
    raw = hf.read_config(path)
    hf.expect_type(raw, "bert", path)
    cfg = config_from_hf(raw, raw.source)
    sd = {k: v for k, v in hf.read_weights(path).items() if not hf.ignored(k)}
    head = {k: sd.pop(k) for k in ("classifier.weight", "classifier.bias") if k in sd}
    sd = hf.strip_prefix(sd, "bert.")
    kmap = hf_key_map(cfg.n_layer)
    mapped = {kmap.get(k, k): v for k, v in sd.items()}
    if "pooler.weight" not in mapped:  # some checkpoints (e.g. sentence encoders) lack a pooler
        mapped["pooler.weight"] = torch.eye(cfg.n_embd)
        mapped["pooler.bias"] = torch.zeros(cfg.n_embd)
    if not classifier:
        model = Bert(cfg)
        hf.load_into(model, mapped, path, dtype)
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
    hf.load_into(model.bert, mapped, path, dtype)
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


def save_hf(model: Bert | BertClassifier, path) -> None:
    bert = model.bert if isinstance(model, BertClassifier) else model
    c = bert.config
    raw = {"model_type": "bert", "vocab_size": c.vocab_size, "hidden_size": c.n_embd,
           "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head,
           "intermediate_size": c.n_inner, "hidden_act": "gelu",
           "hidden_dropout_prob": c.dropout, "attention_probs_dropout_prob": c.dropout,
           "max_position_embeddings": c.max_position_embeddings, "type_vocab_size": c.type_vocab_size,
           "layer_norm_eps": c.layer_norm_eps, "pad_token_id": c.pad_token_id}
    inv = {v: k for k, v in hf_key_map(c.n_layer).items()}
    base = hf.base_state(bert)
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
    hf.write(path, raw, {k: v.detach().contiguous() for k, v in sd.items()})
