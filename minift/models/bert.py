"""A minimal BERT encoder in plain PyTorch.

Reads top to bottom: config, embeddings, attention, layer, encoder model, classifier.
Post-LayerNorm blocks, exact (erf) GELU, a padding attention mask and a tanh pooler, as in
the original BERT. Module names follow minift's convention (``q_proj, k_proj, v_proj,
o_proj``; ``up_proj, down_proj``) so LoRA targets are shared with GPT; the map to Hugging
Face's ``query/key/value/attention.output.dense/intermediate.dense/output.dense`` lives in
``minift/models/hf.py``.

``prefix`` (one ``(k, v)`` per layer, each (B, n_head, P, head_dim)) is prepended to every
layer's keys/values and seen by every token: deep prompts / P-tuning v2 on an encoder. As in
Hugging Face BERT with past keys/values, the positions of the real tokens start at P.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from minift.models.gpt import KV, attention_bias, cast_once, frozen_below, run_block


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


class SelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.o_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.attn_dropout = cfg.dropout

    def forward(self, x, bias=None, prefix: KV | None = None):
        B, T, C = x.shape
        hs = C // self.n_head
        x = cast_once(x)  # the residual stream itself stays in its own dtype
        q = self.q_proj(x).view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = self.v_proj(x).view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        if prefix is not None:
            pk, pv = prefix
            k = torch.cat([pk.to(k.dtype).expand(B, -1, -1, -1), k], dim=2)  # (B, nh, P+T, hs)
            v = torch.cat([pv.to(v.dtype).expand(B, -1, -1, -1), v], dim=2)  # (B, nh, P+T, hs)
        p = self.attn_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.up_proj = nn.Linear(cfg.n_embd, cfg.n_inner)
        self.down_proj = nn.Linear(cfg.n_inner, cfg.n_embd)

    def forward(self, x):
        return self.down_proj(F.gelu(self.up_proj(cast_once(x))))


class Layer(nn.Module):
    """Post-LN: x = LN(x + Attn(x)); x = LN(x + MLP(x))."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attn = SelfAttention(cfg)
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, bias=None, prefix: KV | None = None):
        x = self.ln_1(x + self.dropout(self.attn(x, bias, prefix)))
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
        from minift.models import hf
        return hf.load_bert(path, dtype=dtype)

    def save_pretrained(self, path) -> None:
        from minift.models import hf
        hf.save_bert(self, path)


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
                loss = F.cross_entropy(logits.float(), labels)
        return ClassifierOutput(logits, loss, out.hidden_states)

    @classmethod
    def from_pretrained(cls, path, num_labels: int | None = None, dtype=torch.float32) -> "BertClassifier":
        from minift.models import hf
        return hf.load_bert(path, dtype=dtype, classifier=True, num_labels=num_labels)

    def save_pretrained(self, path) -> None:
        from minift.models import hf
        hf.save_bert(self, path)


def _init_weights(m):
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, mean=0.0, std=0.02)
    if isinstance(m, nn.Linear) and m.bias is not None:
        nn.init.zeros_(m.bias)
    if isinstance(m, nn.Embedding) and m.padding_idx is not None:
        with torch.no_grad():
            m.weight[m.padding_idx].zero_()
