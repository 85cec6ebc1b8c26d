"""What the models share: self-attention by SDPA over optional prefix keys/values, the
attention mask as an additive bias, how a stack of blocks runs (frozen layers without
autograd, activation checkpointing), and the next-token choice of GPT's and Llama's ``generate``.

A prefix is one ``(k, v)`` pair per layer, each (B or 1, n_head, P, head_dim), prepended to
that layer's keys/values and visible to every query (prefix tuning; for GPT also the KV cache).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

KV = tuple[torch.Tensor, torch.Tensor]  # one layer's keys and values, each (B, nh, S, hs)


def attention_bias(T: int, P: int, attention_mask, causal: bool, dtype, device):
    """Additive attention bias (B, 1, T, P + T), or None without an attention mask: then
    SDPA runs causal (with a prefix, see ``prefix_attention``) or full.

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
    m = attention_mask.to(device=device, dtype=torch.bool)
    if m.shape[1] == T and P > 0:  # the caller gave a mask for the real tokens only
        m = torch.cat([m.new_ones(m.shape[0], P), m], dim=1)  # (B, P + T)
    if m.shape[1] != P + T:
        raise ValueError(f"attention_mask has length {m.shape[1]}, expected {T} or {P + T}")
    allowed = allowed & m[:, None, None, :]  # (B, 1, T, P + T)
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)  # q/k/v are in this dtype: its own finite minimum
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)


class SelfAttention(nn.Module):
    """Multi-head self-attention: causal (GPT) or bidirectional (BERT), by SDPA.

    ``forward(x, bias, prefix)`` returns the output (B, T, C) and this layer's keys/values,
    prefix included (the KV cache of the next decoding step).
    """

    def __init__(self, n_embd: int, n_head: int, dropout: float, causal: bool):
        super().__init__()
        self.n_head = n_head
        self.causal = causal
        self.q_proj = nn.Linear(n_embd, n_embd)
        self.k_proj = nn.Linear(n_embd, n_embd)
        self.v_proj = nn.Linear(n_embd, n_embd)
        self.o_proj = nn.Linear(n_embd, n_embd)
        self.attn_dropout = dropout  # on the attention probabilities, inside SDPA

    def qkv(self, x):
        """The queries, keys and values of x (B, T, C), each (B, T, C)."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x, bias=None, prefix: KV | None = None):
        B, T, C = x.shape
        hs = C // self.n_head
        q, k, v = (t.view(B, T, self.n_head, hs).transpose(1, 2) for t in self.qkv(x))  # each (B, nh, T, hs)
        if prefix is not None:
            pk, pv = prefix
            k = torch.cat([pk.to(k.dtype).expand(B, -1, -1, -1), k], dim=2)  # (B, nh, P+T, hs)
            v = torch.cat([pv.to(v.dtype).expand(B, -1, -1, -1), v], dim=2)  # (B, nh, P+T, hs)
        p = self.attn_dropout if self.training else 0.0
        if bias is not None or not self.causal:  # the mask says it all (None: everyone sees everyone)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)
        elif prefix is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:  # query t sees the P prefix slots and tokens <= t
            y = prefix_attention(q, k, v, p)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.o_proj(y), (k, v)


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
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)  # (B, nh, P+T, hs)
        return y[:, :, P:]  # (B, nh, T, hs)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(T, P + T), dropout_p=dropout_p)


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


# ---------------------------------------------------------------------------- generation

def check_generate(max_new_tokens: int, temperature: float, top_k: int | None, input_ids, inputs_embeds) -> None:
    """The arguments ``generate`` takes (GPT and Llama alike), each checked: one-line ValueErrors."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids and inputs_embeds")


def next_token(logits: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
    """The next token of each row (B, 1) from the last position's logits (B, vocab): the argmax
    at temperature 0, else a sample from softmax(logits / temperature), over the top_k if given."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.shape[-1]))
        logits = logits.masked_fill(logits < v[:, [-1]], float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
