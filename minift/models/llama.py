"""A minimal Llama in plain PyTorch: the block of the models people fine-tune today.

Reads top to bottom: config, RMSNorm, attention with grouped-query heads, SwiGLU MLP,
block, model (forward, generation); its checkpoint files are ``llama_hf.py``. What changes from
GPT-2 (``gpt.py``):

    GPT-2 block                               Llama block
    x = x + Attn(LayerNorm(x))                x = x + Attn(RMSNorm(x))       RMSNorm: no mean, no bias
      learned positions wpe added to x          RoPE: q and k rotated by their position, in attention
      n_head key/value heads                    n_kv_head key/value heads, each shared by a group of
                                                n_head // n_kv_head query heads (GQA): a smaller KV cache
    x = x + MLP(LayerNorm(x))                 x = x + MLP(RMSNorm(x))
      down(gelu(up(x)))                         down(silu(gate(x)) * up(x))   SwiGLU: a gated MLP
    biases everywhere                         no biases (Qwen2: on q, k, v)
    LM head tied to wte                       lm_head, tied to embed_tokens or not

RoPE, and the ways checkpoints stretch it to longer contexts, live in ``rope.py``.

The module names are those of transformers' ``LlamaForCausalLM`` without its ``model.`` prefix
(``embed_tokens``, ``layers.N.self_attn.{q,k,v,o}_proj``, ``layers.N.mlp.{gate,up,down}_proj``,
``input_layernorm``, ``post_attention_layernorm``, ``norm``, ``lm_head``), so a LoRA target list
or a PEFT file names the same modules. The hooks are GPT's: ``inputs_embeds`` (prompt tuning),
``prefix`` (one (k, v) per layer, each (B, n_kv_head, P, head_dim), used as given, seen by every
query: prefix tuning, and the KV cache, whose keys are stored rotated; real tokens start at
position P) and
``output_hidden_states`` (probing). The loss and the output dataclass are GPT's too.

``from_pretrained`` (``llama_hf.py``) reads Hugging Face Llama checkpoints (SmolLM, TinyLlama, Llama 2 and 3 are of this layout)
and Qwen2's, which is Llama with biases on q, k and v.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from minift.models import hf, llama_hf, rope
from minift.models.gpt import GPTOutput, LMLoss
from minift.models.layers import (KV, attention_bias, check_generate, frozen_below, next_token, prefix_attention,
                                  run_block)
from minift.models.rope import RopeScaling


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    n_layer: int = 32  # HF: num_hidden_layers
    n_head: int = 32  # query heads (HF: num_attention_heads)
    n_kv_head: int | None = None  # key/value heads (HF: num_key_value_heads); None: n_head, no grouping
    n_embd: int = 4096  # HF: hidden_size
    n_inner: int = 11008  # SwiGLU width (HF: intermediate_size)
    head_dim: int | None = None  # None: n_embd // n_head
    max_position_embeddings: int = 2048  # the context it was trained for (RoPE itself has no table)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # biases on q, k, v and o (HF Llama's attention_bias)
    qkv_bias: bool = False  # biases on q, k and v only (Qwen2)
    mlp_bias: bool = False
    attention_dropout: float = 0.0
    bos_token_id: int | None = None  # carried from and to config.json; the model never reads them
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        for name in ("vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "n_inner", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"LlamaConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.head_dim is None:
            if self.n_embd % self.n_head != 0:
                raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}), "
                                 f"or head_dim given")
            self.head_dim = self.n_embd // self.n_head
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.head_dim < 2 or self.head_dim % 2 != 0:
            raise ValueError(f"head_dim must be even and >= 2 (RoPE turns pairs of dimensions), got {self.head_dim}")
        if not self.rope_theta > 0 or not self.rms_norm_eps >= 0:
            raise ValueError(f"rope_theta must be > 0 and rms_norm_eps >= 0, got {self.rope_theta}, "
                             f"{self.rms_norm_eps}")
        if not 0.0 <= self.attention_dropout < 1.0:
            raise ValueError(f"attention_dropout must be in [0, 1), got {self.attention_dropout}")


# ---------------------------------------------------------------------------- blocks

class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight (Zhang & Sennrich, 2019): LayerNorm without the mean and
    the bias. Normalized in fp32 whatever the input dtype, as transformers does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def repeat_kv(x, n_rep: int):
    """(B, n_kv, S, hs) -> (B, n_kv * n_rep, S, hs): key/value head j serves query heads
    j * n_rep .. (j + 1) * n_rep - 1."""
    if n_rep == 1:
        return x
    B, H, S, hs = x.shape
    return x[:, :, None].expand(B, H, n_rep, S, hs).reshape(B, H * n_rep, S, hs)  # (B, H * n_rep, S, hs)


class Attention(nn.Module):
    """Causal self-attention with RoPE and grouped-query heads, by SDPA.

    ``forward(x, cos, sin, bias, prefix)`` returns the output (B, T, C) and this layer's keys and
    values, prefix included, with n_kv_head heads: the KV cache of the next decoding step.
    """

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        qkv_bias = cfg.attention_bias or cfg.qkv_bias
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=cfg.attention_bias)
        self.attn_dropout = cfg.attention_dropout  # on the attention probabilities, inside SDPA

    def qkv(self, x):
        """The queries (B, T, nh * hs), keys and values (B, T, nkv * hs) of x (B, T, C)."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x, cos, sin, bias=None, prefix: KV | None = None):
        B, T, _ = x.shape
        hs = self.head_dim
        q, k, v = self.qkv(x)
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_head, hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, self.n_kv_head, hs).transpose(1, 2)  # (B, nkv, T, hs)
        q, k = rope.apply(q, cos, sin), rope.apply(k, cos, sin)  # values carry no position
        if prefix is not None:  # cached keys are stored rotated: used as they are
            pk, pv = prefix
            k = torch.cat([pk.to(k.dtype).expand(B, -1, -1, -1), k], dim=2)  # (B, nkv, P+T, hs)
            v = torch.cat([pv.to(v.dtype).expand(B, -1, -1, -1), v], dim=2)  # (B, nkv, P+T, hs)
        kv = (k, v)
        n_rep = self.n_head // self.n_kv_head
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)  # (B, nh, P+T, hs)
        p = self.attn_dropout if self.training else 0.0
        if bias is not None:  # the mask says it all
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)
        elif prefix is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:  # query t sees the P prefix slots and tokens <= t
            y = prefix_attention(q, k, v, p)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * hs)  # (B, T, nh * hs)
        return self.o_proj(y), kv


class MLP(nn.Module):
    """SwiGLU (Shazeer, 2020): down(silu(gate(x)) * up(x)); the gate decides, per unit, how much passes."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.n_inner, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.n_inner, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.n_inner, cfg.n_embd, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm: x = x + Attn(RMSNorm(x)); x = x + MLP(RMSNorm(x))."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, bias=None, prefix: KV | None = None):
        a, kv = self.self_attn(self.input_layernorm(x), cos, sin, bias, prefix)
        x = x + a
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, kv


# ---------------------------------------------------------------------------- model

class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.rms_norm_eps)
        # Tied: the LM head is embed_tokens' matrix and there is no lm_head module.
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_loss = LMLoss()  # GPT's: reads the head's matrix, so minift.fast can fuse it
        self.grad_from_layer = 0  # as in GPT: layers below run without autograd when all is frozen there
        self.checkpointing = False  # recompute each block in backward instead of keeping activations
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):  # transformers' Llama init: N(0, 0.02), zero biases, RMSNorm weights 1
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, input_ids=None, labels=None, *, attention_mask=None, inputs_embeds=None,
                prefix: list[KV] | None = None, output_hidden_states=False, return_kv=False,
                compute_logits: bool | None = None) -> GPTOutput:
        """GPT's forward (``labels`` is GPT's ``targets``: aligned with ``input_ids``, shifted
        inside, -100 for no loss). ``compute_logits`` defaults to "only when no labels are given"."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        B, T, _ = x.shape
        if prefix is not None and len(prefix) != len(self.layers):
            raise ValueError(f"prefix has {len(prefix)} layers, the model has {len(self.layers)}")
        P = 0 if prefix is None else prefix[0][0].shape[2]
        c = self.config
        w = rope.frequencies(c.head_dim, c.rope_theta, c.rope_scaling, x.device)  # (hs/2,)
        cos, sin = rope.cos_sin(w, P, T, x.dtype)  # (T, hs) each: real tokens start at position P
        bias = attention_bias(T, P, attention_mask, True, x.dtype, x.device)
        hidden, kvs = [x], []
        for i, block in enumerate(self.layers):
            with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen_below(self, i, x, prefix)):
                x, kv = run_block(self, block, x, cos, sin, bias, None if prefix is None else prefix[i])
            if output_hidden_states:
                hidden.append(x)
            if return_kv:
                kvs.append(kv)
        x = self.norm(x)
        if output_hidden_states:
            hidden[-1] = x  # as in HF: the last hidden state is after the final norm
        logits, loss = self.head(x, labels, compute_logits or (compute_logits is None and labels is None))
        return GPTOutput(logits, loss, tuple(hidden) if output_hidden_states else None,
                         kvs if return_kv else None)

    def head(self, x, labels, want_logits: bool):
        """(logits or None, loss or None) from the final hidden states x (B, T, C).

        A plain head matrix (embed_tokens' when tied, else lm_head's) goes to ``lm_loss``, GPT's
        loss, which ``minift.fast`` can fuse; an adapter on lm_head runs its own forward."""
        logits = loss = None
        if self.lm_head is None or type(self.lm_head) is nn.Linear:
            w = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight  # (vocab, C)
            if labels is not None:
                loss = self.lm_loss(x, w, labels)
            if want_logits:
                logits = F.linear(x, w)  # (B, T, vocab)
            return logits, loss
        logits = self.lm_head(x)  # (B, T, vocab)
        if labels is not None:  # LMLoss's computation, from the logits
            t = labels[:, 1:]  # (B, T-1): position t predicts labels[t + 1]
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), t.flatten(), ignore_index=-100,
                                   reduction="sum") / (t != -100).sum().clamp_min(1)
        return (logits if want_logits else None), loss

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, *, prefix: list[KV] | None = None,
                 inputs_embeds=None, use_cache: bool = True):
        """GPT's ``generate``: sample ``max_new_tokens`` tokens (temperature 0: greedy), each step
        feeding back the keys/values so far as the next ``prefix`` (``use_cache``) or recomputing
        the whole sequence. Returns the prompt ids and the new ones (only the new ones when the
        prompt came as ``inputs_embeds``)."""
        check_generate(max_new_tokens, temperature, top_k, input_ids, inputs_embeds)
        prompt = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T0, C)
        new = torch.zeros(prompt.shape[0], 0, dtype=torch.long, device=prompt.device)
        cache, step = prefix, None
        for _ in range(max_new_tokens):
            if use_cache:  # the first step feeds the whole prompt, later ones one token
                x = prompt if step is None else self.embed_tokens(step)
                out = self(inputs_embeds=x, prefix=cache, return_kv=True)
                cache = out.kv
            else:  # recompute the whole sequence every step (the reference the cache must match)
                out = self(inputs_embeds=torch.cat([prompt, self.embed_tokens(new)], dim=1), prefix=prefix)
            step = next_token(out.logits[:, -1, :], temperature, top_k)  # (B, 1)
            new = torch.cat([new, step], dim=1)
        return new if input_ids is None else torch.cat([input_ids, new], dim=1)

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32) -> "Llama":
        """A Llama (or Qwen2) from a Hugging Face directory (``config.json``, ``model.safetensors``)."""
        raw = hf.read_config(path)
        if raw.get("model_type") not in llama_hf.MODEL_TYPES:
            hf.expect_type(raw, "llama", path)
        cfg = hf.build_config(LlamaConfig, raw.source, **llama_hf.config_from_hf(raw, raw.source))
        model = cls(cfg)
        hf.load_into(model, llama_hf.state_from_hf(hf.read_weights(path), cfg.tie_word_embeddings), path, dtype)
        return model

    def save_pretrained(self, path) -> None:
        """Write a Hugging Face ``LlamaForCausalLM`` directory (``Qwen2ForCausalLM`` for q/k/v-only biases)."""
        hf.write(path, llama_hf.config_to_hf(self.config), llama_hf.state_to_hf(hf.base_state(self)))
