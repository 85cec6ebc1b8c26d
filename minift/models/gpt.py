"""A minimal GPT-2 in plain PyTorch.

Reads top to bottom: config, attention, MLP, block, model, generation. The module names
follow minift's convention so one LoRA target list works for GPT and BERT alike:
attention ``q_proj, k_proj, v_proj, o_proj``; MLP ``up_proj, down_proj``. Hugging Face
GPT-2 checkpoints (fused ``c_attn``, Conv1D weights) are mapped in ``minift/models/hf.py``.

Hooks are explicit ``forward`` arguments, never monkey-patches:
- ``inputs_embeds``: token embeddings computed by the caller (prompt tuning);
- ``prefix``: one ``(k, v)`` pair per layer, each (B, n_head, P, head_dim), prepended to
  that layer's keys/values and visible to every query (prefix tuning; also the KV cache);
- ``output_hidden_states``: the embeddings and every block's output (probing).

Loss convention (the Hugging Face one): ``targets`` are aligned with ``input_ids`` and
shifted inside, so position t predicts ``targets[t + 1]``; pass ``targets=input_ids`` for
causal LM, with -100 wherever no loss is wanted (padding, prompts).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from minift.fast.loss import lm_loss

KV = tuple[torch.Tensor, torch.Tensor]


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


def attention_bias(T: int, P: int, attention_mask, causal: bool, dtype, device):
    """Additive attention bias (B or 1, 1, T, P + T), or None without an attention mask: then
    SDPA runs causal (with a prefix, bottom-right aligned: ``causal_lower_right``) or full.

    Every query sees all P prefix slots; among the T real tokens the mask is causal (GPT)
    or full (BERT); ``attention_mask`` (B, P + T) or (B, T) has 1 for tokens to attend to.
    Masked slots get the dtype's most negative value rather than -inf, so a fully masked
    row (a padding query) yields finite, ignorable outputs instead of NaN.
    """
    if attention_mask is None:  # plain causal or full attention: SDPA needs no bias tensor
        return None
    allowed = torch.ones(1, 1, T, P + T, dtype=torch.bool, device=device)
    if causal:
        allowed = torch.ones(T, P + T, dtype=torch.bool, device=device).tril(diagonal=P)[None, None]
    if attention_mask is not None:
        m = attention_mask.to(device=device, dtype=torch.bool)
        if m.shape[1] == T and P > 0:  # the caller gave a mask for the real tokens only
            m = torch.cat([m.new_ones(m.shape[0], P), m], dim=1)
        if m.shape[1] != P + T:
            raise ValueError(f"attention_mask has length {m.shape[1]}, expected {T} or {P + T}")
        allowed = allowed & m[:, None, None, :]  # (B, 1, T, P + T)
    if device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")  # q/k/v are in this dtype: its own finite minimum
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)


def cast_once(x: torch.Tensor) -> torch.Tensor:
    """Under CUDA autocast, cast a matmul input to the autocast dtype once.

    Autocast casts a non-parameter input again for every matmul that reads it: q, k, v (and
    each LoRA's A) would each cast the same LayerNorm output, in forward and in backward.
    Casting once gives the same numbers with one copy instead of several.
    """
    if x.is_cuda and torch.is_autocast_enabled("cuda"):
        return x.to(torch.get_autocast_dtype("cuda"))
    return x


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.o_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.attn_dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, bias=None, prefix: KV | None = None):
        B, T, C = x.shape
        hs = C // self.n_head
        x = cast_once(x)
        q = self.q_proj(x).view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = self.v_proj(x).view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        if prefix is not None:
            pk, pv = prefix
            k = torch.cat([pk.to(k.dtype).expand(B, -1, -1, -1), k], dim=2)  # (B, nh, P+T, hs)
            v = torch.cat([pv.to(v.dtype).expand(B, -1, -1, -1), v], dim=2)  # (B, nh, P+T, hs)
        p = self.attn_dropout if self.training else 0.0
        if bias is None and prefix is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        elif bias is None:  # a prefix, no mask: query t sees the P prefix slots and tokens <= t
            y = prefix_attention(q, k, v, p)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.o_proj(y)), (k, v)


def prefix_attention(q, k, v, dropout_p: float):
    """Causal attention of T queries over P prefix slots + T keys, every prefix slot visible.

    When P <= T, P zero queries are put in front: the square (P + T) problem is plain causal
    attention (flash kernels, also under torch.compile), where real query t sees keys <= P + t,
    exactly the prefix and tokens <= t; the padding rows are dropped. A single query (decoding
    with a KV cache) sees every key; otherwise (P > T) the bottom-right causal mask is passed."""
    B, H, T, hs = q.shape
    P = k.shape[2] - T
    if T == 1:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    if P <= T:
        q = torch.cat([q.new_zeros(B, H, P, hs), q], dim=2)  # (B, nh, P+T, hs)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)[:, :, P:]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(T, P + T), dropout_p=dropout_p)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.up_proj = nn.Linear(cfg.n_embd, cfg.n_inner)
        self.down_proj = nn.Linear(cfg.n_inner, cfg.n_embd)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.down_proj(F.gelu(self.up_proj(cast_once(x)), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, bias=None, prefix: KV | None = None):
        a, kv = self.attn(self.ln_1(x), bias, prefix)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, kv


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        # Layers below this index run without autograd when nothing below needs a gradient
        # (set by freeze.apply when the bottom layers and the embeddings are all frozen).
        self.grad_from_layer = 0
        self.checkpointing = False  # recompute each block in backward instead of keeping activations
        self.loss_chunk: int | None = None  # positions per vocabulary projection in the loss (None: lm_loss's default)
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

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.wte.weight  # the LM head is tied to the token embedding

    def forward(self, input_ids=None, targets=None, *, attention_mask=None, inputs_embeds=None,
                prefix: list[KV] | None = None, output_hidden_states=False, return_kv=False,
                compute_logits: bool | None = None) -> GPTOutput:
        """``compute_logits`` defaults to "only when no targets are given": training needs
        just the loss, which is computed chunk by chunk without full fp32 logits."""
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
            loss = lm_loss(x, self.wte.weight, targets, self.loss_chunk)
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
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
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
            logits = out.logits[:, -1, :]  # (B, vocab)
            if temperature == 0:
                step = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.shape[-1]))
                    logits = logits.masked_fill(logits < v[:, [-1]], float("-inf"))
                step = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            new = torch.cat([new, step], dim=1)
        return new if input_ids is None else torch.cat([input_ids, new], dim=1)

    # Hugging Face checkpoints: key maps live in hf.py
    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32) -> "GPT":
        from minift.models import hf
        return hf.load_gpt(path, dtype=dtype)

    def save_pretrained(self, path) -> None:
        from minift.models import hf
        hf.save_gpt(self, path)


def frozen_below(model, i: int, x, prefix) -> bool:
    """True when layer i may run without autograd: it is below ``model.grad_from_layer``,
    its input needs no gradient, no (possibly trainable) prefix enters it and none of its own
    parameters is trainable (an adapter added after freezing still gets its gradient)."""
    if i >= model.grad_from_layer or x.requires_grad or prefix is not None:
        return False
    return not any(p.requires_grad for p in model.layers[i].parameters())


def run_block(model, block, *args):
    """Call a block, through activation checkpointing when ``model.checkpointing`` is set
    and a graph is being built."""
    if model.checkpointing and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
    return block(*args)
