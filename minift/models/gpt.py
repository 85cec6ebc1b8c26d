"""A minimal GPT-2 in plain PyTorch.

Reads top to bottom: config, MLP, block, loss, model (forward, generation), loading. The
attention both models share lives in ``minift/models/layers.py``. The module names follow
minift's convention so one LoRA target list works for GPT and BERT alike: attention
``q_proj, k_proj, v_proj, o_proj``; MLP ``up_proj, down_proj``.

Hooks are explicit ``forward`` arguments, never monkey-patches:
- ``inputs_embeds``: token embeddings computed by the caller (prompt tuning);
- ``prefix``: one ``(k, v)`` pair per layer, each (B, n_head, P, head_dim), prepended to
  that layer's keys/values and visible to every query (prefix tuning; also the KV cache);
- ``output_hidden_states``: the embeddings and every block's output (probing).

Loss convention (the Hugging Face one): ``targets`` are aligned with ``input_ids`` and
shifted inside, so position t predicts ``targets[t + 1]``; pass ``targets=input_ids`` for
causal LM, with -100 wherever no loss is wanted (padding, prompts). The loss is plain
cross-entropy over the logits (``LMLoss``); ``minift.fast.loss.enable`` swaps in a fused
version that never builds the full logits.

Loading (the end of the file) maps Hugging Face GPT-2 checkpoints: their fused ``c_attn``
is split into q/k/v and their Conv1D weights (in, out) are transposed to nn.Linear's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from minift.files import InputError, field
from minift.models import hf
from minift.models.layers import (KV, SelfAttention, attention_bias, check_generate, frozen_below, next_token,
                                  run_block)


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    block_size: int = 1024  # maximum number of positions (HF: n_positions)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_inner: int | None = None  # MLP width; None means 4 * n_embd
    dropout: float = 0.0
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.n_inner is None:
            self.n_inner = 4 * self.n_embd


@dataclass
class GPTOutput:
    logits: torch.Tensor | None
    loss: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    kv: list[KV] | None = None  # per-layer keys/values incl. prefix, when return_kv=True


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.up_proj = nn.Linear(cfg.n_embd, cfg.n_inner)
        self.down_proj = nn.Linear(cfg.n_inner, cfg.n_embd)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.down_proj(F.gelu(self.up_proj(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LN: x = x + Attn(LN(x)); x = x + MLP(LN(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.attn = SelfAttention(cfg.n_embd, cfg.n_head, cfg.dropout, causal=True)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, bias=None, prefix: KV | None = None):
        a, kv = self.attn(self.ln_1(x), bias, prefix)
        x = x + self.resid_dropout(a)
        x = x + self.mlp(self.ln_2(x))
        return x, kv


class LMLoss(nn.Module):
    """Shifted next-token cross-entropy from the final hidden states: the LM head, then
    cross-entropy. Position t predicts ``targets[:, t + 1]``; the mean is over the targets
    that are not -100 (a batch with none gives 0, not NaN).

    It takes the hidden states rather than the logits so that ``minift.fast.loss.enable`` can
    replace it by a fused version with the same arguments and results.
    """

    def forward(self, x, weight, targets):
        logits = F.linear(x[:, :-1], weight)  # (B, T-1, vocab): the last position predicts nothing
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # the softmax in fp32
        t = targets[:, 1:]  # (B, T-1)
        loss = F.cross_entropy(logits.flatten(0, 1), t.flatten(), ignore_index=-100, reduction="sum")
        return loss / (t != -100).sum().clamp_min(1)


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.lm_loss = LMLoss()  # the LM head is tied to wte: the loss reads wte.weight
        # Layers below this index run without autograd when nothing below needs a gradient
        # (set by freeze.apply when the bottom layers and the embeddings are all frozen).
        self.grad_from_layer = 0
        self.checkpointing = False  # recompute each block in backward instead of keeping activations
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of residual projections
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, input_ids=None, targets=None, *, attention_mask=None, inputs_embeds=None,
                prefix: list[KV] | None = None, output_hidden_states=False, return_kv=False,
                compute_logits: bool | None = None) -> GPTOutput:
        """``compute_logits`` defaults to "only when no targets are given": training needs
        just the loss, which ``lm_loss`` computes from the hidden states."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.wte(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        B, T, _ = x.shape
        if prefix is not None and len(prefix) != len(self.layers):
            raise ValueError(f"prefix has {len(prefix)} layers, the model has {len(self.layers)}")
        P = 0 if prefix is None else prefix[0][0].shape[2]
        if P + T > self.config.block_size:
            raise ValueError(f"prefix ({P}) + sequence ({T}) = {P + T} exceeds block_size "
                             f"{self.config.block_size}")
        pos = torch.arange(P, P + T, device=x.device)  # real tokens start at position P
        x = self.drop(x + self.wpe(pos))
        bias = attention_bias(T, P, attention_mask, True, x.dtype, x.device)
        hidden, kvs = [x], []
        for i, block in enumerate(self.layers):
            with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen_below(self, i, x, prefix)):
                x, kv = run_block(self, block, x, bias, None if prefix is None else prefix[i])
            if output_hidden_states:  # kept only when asked: under no_grad nothing else holds them
                hidden.append(x)
            if return_kv:
                kvs.append(kv)
        x = self.ln_f(x)
        if output_hidden_states:
            hidden[-1] = x  # as in HF: the last hidden state is after the final LayerNorm
        logits = loss = None
        if targets is not None:
            loss = self.lm_loss(x, self.wte.weight, targets)
        if compute_logits or (compute_logits is None and targets is None):
            logits = F.linear(x, self.wte.weight)  # (B, T, vocab)
        return GPTOutput(logits, loss, tuple(hidden) if output_hidden_states else None,
                         kvs if return_kv else None)

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, *, prefix: list[KV] | None = None,
                 inputs_embeds=None, use_cache: bool = True):
        """Sample ``max_new_tokens`` tokens; temperature 0 means greedy.

        With ``use_cache`` the keys/values of everything seen so far are passed back as the
        ``prefix`` of the next step, so each new token costs one position. A prefix (prefix
        tuning) or ``inputs_embeds`` (a soft prompt followed by the prompt's embeddings)
        seeds the cache. Returns the prompt ids followed by the new ones (only the new ones when the
        prompt came as ``inputs_embeds``).
        """
        check_generate(max_new_tokens, temperature, top_k, input_ids, inputs_embeds)
        P = 0 if prefix is None else prefix[0][0].shape[2]
        B, T0 = (input_ids if inputs_embeds is None else inputs_embeds).shape[:2]
        if use_cache and P + T0 + max_new_tokens > self.config.block_size:
            raise ValueError(f"prefix + prompt + new tokens ({P + T0 + max_new_tokens}) exceeds "
                             f"block_size {self.config.block_size}")
        new = input_ids.new_zeros(B, 0) if input_ids is not None else \
            torch.zeros(inputs_embeds.shape[0], 0, dtype=torch.long, device=inputs_embeds.device)
        cache, step = prefix, None
        for _ in range(max_new_tokens):
            if use_cache:  # the first step feeds the whole prompt, later ones one token
                if step is None:
                    out = self(input_ids, inputs_embeds=inputs_embeds, prefix=cache, return_kv=True)
                else:
                    out = self(step, prefix=cache, return_kv=True)
                cache = out.kv
            else:  # recompute the whole sequence every step (the reference the cache must match)
                prompt = self.wte(input_ids) if inputs_embeds is None else inputs_embeds
                out = self(inputs_embeds=torch.cat([prompt, self.wte(new)], dim=1), prefix=prefix)
            step = next_token(out.logits[:, -1, :], temperature, top_k)  # (B, 1)
            new = torch.cat([new, step], dim=1)
        return new if input_ids is None else torch.cat([input_ids, new], dim=1)

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32) -> "GPT":
        """A GPT-2 from a Hugging Face directory (``config.json``, ``model.safetensors``)."""
        return load_hf(path, dtype)

    def save_pretrained(self, path) -> None:
        """Write a Hugging Face GPT-2 directory that ``transformers`` loads."""
        save_hf(self, path)


# ---------------------------------------------------------------------------- loading

# Config fields that change what a checkpoint computes and the only values this GPT implements
# (field, default when absent, allowed values, what it does instead); see ``hf.check_fields``.
HF_FIELDS = (
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


def config_from_hf(raw: dict, source: str | None = None) -> GPTConfig:
    """The GPTConfig of a GPT-2 config.json. ``source`` names the file in errors (default: the
    file ``hf.read_config`` read ``raw`` from)."""
    source = source or getattr(raw, "source", "config.json")
    hf.check_fields(raw, HF_FIELDS, "GPT-2", source)
    n_inner = field(raw, "n_inner", int, source, default=None)
    if n_inner is not None and n_inner < 1:
        raise InputError(f"{source}: field 'n_inner' must be >= 1 or null, got {n_inner}")
    return hf.build_config(
        GPTConfig, source, vocab_size=hf.size_field(raw, "vocab_size", source, "GPT-2"),
        block_size=hf.size_field(raw, "n_positions", source, "GPT-2", default=1024),
        n_layer=hf.size_field(raw, "n_layer", source, "GPT-2"), n_head=hf.size_field(raw, "n_head", source, "GPT-2"),
        n_embd=hf.size_field(raw, "n_embd", source, "GPT-2"), n_inner=n_inner,
        dropout=hf.rate_field(raw, "resid_pdrop", source, 0.0, 0.0, 1.0),
        layer_norm_eps=hf.rate_field(raw, "layer_norm_epsilon", source, 1e-5, 0.0, math.inf))


HF_LAYER = {  # HF name inside transformer.h.{i}. -> minift name inside layers.{i}. (c_attn aside)
    "ln_1.weight": "ln_1.weight", "ln_1.bias": "ln_1.bias",
    "ln_2.weight": "ln_2.weight", "ln_2.bias": "ln_2.bias",
    "attn.c_proj.weight": "attn.o_proj.weight", "attn.c_proj.bias": "attn.o_proj.bias",
    "mlp.c_fc.weight": "mlp.up_proj.weight", "mlp.c_fc.bias": "mlp.up_proj.bias",
    "mlp.c_proj.weight": "mlp.down_proj.weight", "mlp.c_proj.bias": "mlp.down_proj.bias",
}
HF_CONV1D = ("attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")  # (in, out): transposed


def state_from_hf(sd: dict, n_layer: int) -> dict:
    """An HF GPT-2 state dict in minift's names; keys it does not know are passed through."""
    sd = {k: v for k, v in hf.strip_prefix(sd, "transformer.").items() if not hf.ignored(k)}
    sd.pop("lm_head.weight", None)  # tied to wte
    out = {}
    for name in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"):
        if name in sd:
            out[name] = sd.pop(name)
    for i in range(n_layer):
        src = f"h.{i}."
        for hk, mk in HF_LAYER.items():
            if src + hk in sd:
                w = sd.pop(src + hk)
                out[f"layers.{i}.{mk}"] = w.t().contiguous() if hk in HF_CONV1D else w  # (out, in)
        if src + "attn.c_attn.weight" in sd:
            w = sd.pop(src + "attn.c_attn.weight").t()  # (3C, C) after the Conv1D transpose
            for name, part in zip(("q_proj", "k_proj", "v_proj"), w.chunk(3, dim=0)):  # each (C, C)
                out[f"layers.{i}.attn.{name}.weight"] = part.contiguous()
        if src + "attn.c_attn.bias" in sd:
            b = sd.pop(src + "attn.c_attn.bias")  # (3C,)
            for name, part in zip(("q_proj", "k_proj", "v_proj"), b.chunk(3, dim=0)):  # each (C,)
                out[f"layers.{i}.attn.{name}.bias"] = part.contiguous()
    out.update(sd)  # whatever is left is unknown and reported by hf.load_into
    return out


def state_to_hf(sd: dict, n_layer: int) -> dict:
    """minift's GPT state dict in HF GPT-2's names and layout (inverse of ``state_from_hf``)."""
    out = {f"transformer.{k}": sd[k] for k in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias")}
    for i in range(n_layer):
        for hk, mk in HF_LAYER.items():
            w = sd[f"layers.{i}.{mk}"]
            out[f"transformer.h.{i}.{hk}"] = w.t() if hk in HF_CONV1D else w  # (in, out)
        qkv = [sd[f"layers.{i}.attn.{n}_proj.weight"] for n in "qkv"]  # each (C, C)
        out[f"transformer.h.{i}.attn.c_attn.weight"] = torch.cat(qkv, dim=0).t()  # (C, 3C)
        out[f"transformer.h.{i}.attn.c_attn.bias"] = torch.cat(
            [sd[f"layers.{i}.attn.{n}_proj.bias"] for n in "qkv"], dim=0)  # (3C,)
    return {k: v.detach().contiguous() for k, v in out.items()}


def load_hf(path, dtype=torch.float32) -> GPT:
    raw = hf.read_config(path)
    hf.expect_type(raw, "gpt2", path)
    cfg = config_from_hf(raw, raw.source)
    model = GPT(cfg)
    hf.load_into(model, state_from_hf(hf.read_weights(path), cfg.n_layer), path, dtype)
    return model


def save_hf(model: GPT, path) -> None:
    c = model.config
    raw = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": c.vocab_size,
           "n_positions": c.block_size, "n_ctx": c.block_size, "n_layer": c.n_layer, "n_head": c.n_head,
           "n_embd": c.n_embd, "n_inner": c.n_inner, "activation_function": "gelu_new",
           "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout,
           "layer_norm_epsilon": c.layer_norm_eps, "tie_word_embeddings": True,
           "bos_token_id": c.vocab_size - 1, "eos_token_id": c.vocab_size - 1}
    hf.write(path, raw, state_to_hf(hf.base_state(model), c.n_layer))
