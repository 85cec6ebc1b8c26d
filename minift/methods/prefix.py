"""Prefix tuning (Li & Liang 2021, https://arxiv.org/abs/2101.00190); on an encoder the same
deep prompts are P-tuning v2 (Liu et al. 2022, https://arxiv.org/abs/2110.07602).

Every layer l gets P trainable key/value vectors that every real token attends to, while
all weights of the model stay frozen:

    head_l(x) = softmax( q [P_k,l ; K_l(x)]^T / sqrt(d) ) [P_v,l ; V_l(x)]

    layer l:   keys    [ Pk_1 .. Pk_P | k_1 .. k_T ]     (P learned + T computed)
               values  [ Pv_1 .. Pv_P | v_1 .. v_T ]
                          ▲ seen by every query      ▲ causal (GPT, Llama) or full (BERT)

The real tokens take positions P, P+1, ... (the KV-cache convention: a prefix is exactly a
cache of P tokens nobody wrote; Llama's prefix keys count as already turned by RoPE). So on
GPT and Llama a prefix initialized from the activations of P real tokens ("tokens" init, the
paper's better init) reproduces running those tokens first (not on BERT, where those tokens
would also have attended to the text).

The learned table has PEFT's layout: one row per virtual token, (2 * n_layer * D) wide,
read as (n_layer, k|v, n_kv_head, head_dim), with D = n_kv_head * head_dim the width of one
layer's keys. On GPT-2 and BERT D is the model width C; Llama's grouped-query attention has
fewer key/value heads than query heads (each shared by a group of queries), and a prefix is
keys and values, so it has only n_kv_head heads: a smaller table. With ``projection_dim``
the table is reparameterized, as the paper found direct optimization unstable:

    table = Linear(projection_dim -> 2 L D)( tanh( Linear(D -> projection_dim)(E) ) ),  E: (P, D)

and ``export`` replaces the MLP by the table it computes (identical outputs; no MLP left to run).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn

from minift.methods.common import (base_model_only, check_virtual_tokens, freeze_all, require_method_inputs,
                                   unfreeze_modules)
from minift.models.bert import Bert, BertClassifier
from minift.models.gpt import GPT
from minift.models.llama import Llama

INITS = ("random", "tokens")
RANDOM_STD = 0.02  # the initializer range of GPT-2 and BERT


@dataclass
class PrefixConfig:
    """``init``: "random" draws the table from N(0, 0.02^2) (with ``projection_dim``: E from
    N(0, 1) and the MLP at PyTorch's default init, as PEFT); "tokens" sets it to the keys and
    values the frozen model computes for P real tokens: ``init_text`` (needs a tokenizer)
    repeated until it fills P, or P tokens sampled from the vocabulary when ``init_text`` is
    None. A text longer than P tokens is an error, never silently cut. With ``projection_dim``
    the MLP's last Linear is solved (least squares) to output that table: exactly when
    projection_dim >= P - 1, the closest fit otherwise."""
    num_virtual_tokens: int = 20
    projection_dim: int | None = None  # hidden width of the reparameterization MLP; None = plain table
    init: str = "random"
    init_text: str | None = None
    modules_to_save: tuple[str, ...] = ()  # fully trainable modules, e.g. ("classifier",)

    def __post_init__(self):
        check_virtual_tokens(self)
        d = self.projection_dim
        if d is not None and (isinstance(d, bool) or not isinstance(d, int) or d < 1):
            raise ValueError(f"PrefixConfig.projection_dim must be None or an integer >= 1, got {d!r}")
        if self.init not in INITS:
            raise ValueError(f"PrefixConfig.init must be one of {', '.join(INITS)}; got {self.init!r}")
        if self.init_text is not None and self.init != "tokens":
            raise ValueError("PrefixConfig.init_text is only used with init='tokens'")
        if self.init_text is not None and not self.init_text.strip():
            raise ValueError("PrefixConfig.init_text is empty; give some text or leave it None")


class PrefixEncoder(nn.Module):
    """P virtual tokens -> one (k, v) pair per layer, each (B, n_kv_head, P, head_dim)."""

    def __init__(self, cfg: PrefixConfig, n_layer: int, n_kv_head: int, head_dim: int, max_positions: int):
        super().__init__()
        self.config = cfg
        self.n_layer, self.n_kv_head, self.head_dim = n_layer, n_kv_head, head_dim
        self.max_positions = max_positions
        D = n_kv_head * head_dim  # one layer's keys (or values) per token
        P, width = cfg.num_virtual_tokens, 2 * n_layer * D
        if cfg.projection_dim is None:
            self.embedding = nn.Parameter(torch.randn(P, width) * RANDOM_STD)  # (P, 2LD)
            self.transform = None
        else:
            self.embedding = nn.Parameter(torch.randn(P, D))  # (P, D), the MLP's input (PEFT's token_dim)
            self.transform = nn.Sequential(nn.Linear(D, cfg.projection_dim), nn.Tanh(),
                                           nn.Linear(cfg.projection_dim, width))

    @property
    def num_virtual_tokens(self) -> int:
        return self.embedding.shape[0]

    def table(self) -> torch.Tensor:
        """The (P, 2 * n_layer * n_kv_head * head_dim) prefix table (PEFT's ``prompt_embeddings``)."""
        return self.embedding if self.transform is None else self.transform(self.embedding)

    def forward(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        P, L, nkv = self.num_virtual_tokens, self.n_layer, self.n_kv_head
        t = self.table().view(P, 2 * L, nkv, self.head_dim)  # (P, 2L, nkv, hs); row 2l = k, 2l+1 = v
        t = t.permute(1, 2, 0, 3)  # (2L, nkv, P, hs)
        return [(t[2 * i][None].expand(batch_size, -1, -1, -1),  # (B, nkv, P, hs)
                 t[2 * i + 1][None].expand(batch_size, -1, -1, -1)) for i in range(L)]

    def extend(self, batch: dict) -> dict:
        """The batch with ``prefix`` added and ``attention_mask`` lengthened to P + T (ones in
        front). Labels are unchanged: prefix slots are not positions of the sequence."""
        x = batch.get("input_ids")
        x = batch["inputs_embeds"] if x is None else x
        B, T = x.shape[:2]
        P = self.num_virtual_tokens
        if P + T > self.max_positions:
            raise ValueError(f"prefix ({P}) + sequence ({T}) = {P + T} exceeds the model's "
                             f"{self.max_positions} positions; shorten the input or the prefix")
        out = dict(batch)
        out["prefix"] = self(B)
        mask = batch.get("attention_mask")
        if mask is not None and mask.shape[1] == T:
            out["attention_mask"] = torch.cat([mask.new_ones(B, P), mask], dim=1)  # (B, P+T)
        return out

    def extra_repr(self) -> str:
        return (f"P={self.num_virtual_tokens}, layers={self.n_layer}, kv_heads={self.n_kv_head}, "
                f"projection_dim={None if self.transform is None else self.config.projection_dim}")


# ---------------------------------------------------------------------------- what they read of a model

@dataclass(frozen=True)
class ModelDims:
    """The shape prefix and prompt tuning read of a model (``model_dims``)."""
    n_layer: int
    n_head: int  # query heads
    n_kv_head: int  # key/value heads: a prefix has this many (Llama's GQA: fewer than n_head)
    head_dim: int
    n_embd: int  # the width of a token embedding: a soft prompt's rows
    max_positions: int  # prefix or prompt + text must fit (Llama: the context it was trained for)


def _unsupported(model: nn.Module) -> TypeError:
    return TypeError(f"prefix and prompt tuning support GPT, Llama, Bert and BertClassifier, got "
                     f"{type(model).__name__}")


def model_dims(model: nn.Module) -> ModelDims:
    """The ``ModelDims`` of a GPT, Llama, Bert or BertClassifier."""
    c = model.config
    if isinstance(model, GPT):
        return ModelDims(c.n_layer, c.n_head, c.n_head, c.n_embd // c.n_head, c.n_embd, c.block_size)
    if isinstance(model, Llama):
        return ModelDims(c.n_layer, c.n_head, c.n_kv_head, c.head_dim, c.n_embd, c.max_position_embeddings)
    if isinstance(model, (Bert, BertClassifier)):
        return ModelDims(c.n_layer, c.n_head, c.n_head, c.n_embd // c.n_head, c.n_embd, c.max_position_embeddings)
    raise _unsupported(model)


def token_embedding(model: nn.Module) -> nn.Embedding:
    """The table a model looks its input ids up in: Llama's ``embed_tokens`` (transformers'
    name), GPT's ``wte`` (BERT's ``embeddings.word_embeddings``, under GPT's name)."""
    if isinstance(model, Llama):
        return model.embed_tokens
    if isinstance(model, (GPT, Bert, BertClassifier)):
        return model.wte
    raise _unsupported(model)


# ---------------------------------------------------------------------------- apply / export

def apply(model: nn.Module, cfg: PrefixConfig, tokenizer=None) -> list[str]:
    """Freeze ``model`` (except ``cfg.modules_to_save``) and attach ``model.prefix_encoder``.
    Returns the names of the trainable parameters."""
    if getattr(model, "prefix_encoder", None) is not None:
        raise ValueError("model already has a prefix_encoder; delete it before applying prefix tuning again")
    if getattr(model, "soft_prompt", None) is not None:
        raise ValueError("model has a soft_prompt; prefix and prompt tuning are not combined here")
    d = model_dims(model)
    P = cfg.num_virtual_tokens
    if P >= d.max_positions:
        raise ValueError(f"num_virtual_tokens ({P}) leaves no room for text: the model has "
                         f"{d.max_positions} positions")
    ids = init_token_ids(cfg, tokenizer, model.config.vocab_size) if cfg.init == "tokens" else None
    device = token_embedding(model).weight.device
    enc = PrefixEncoder(cfg, d.n_layer, d.n_kv_head, d.head_dim, d.max_positions).to(device)
    if ids is not None:
        table = token_kv_table(model, ids.to(device))  # (P, 2LD)
        with torch.no_grad():
            if enc.transform is None:
                enc.embedding.copy_(table)
            else:  # solve the last Linear so the MLP outputs the table (exact if projection_dim >= P - 1)
                h = enc.transform[1](enc.transform[0](enc.embedding)).double()  # (P, d)
                a = torch.cat([h, h.new_ones(P, 1)], dim=1)  # (P, d + 1): weight columns, then bias
                sol = torch.linalg.lstsq(a, table.double()).solution  # (d + 1, 2LD)
                enc.transform[2].weight.copy_(sol[:-1].t())  # (2LD, d)
                enc.transform[2].bias.copy_(sol[-1])
    freeze_all(model)
    model.prefix_encoder = enc
    require_method_inputs(model)  # model(ids) alone would ignore it: refuse
    names = [f"prefix_encoder.{n}" for n, _ in enc.named_parameters()]
    if cfg.modules_to_save:
        names += unfreeze_modules(model, cfg.modules_to_save)
    return names


def export(model: nn.Module) -> PrefixEncoder:
    """Replace the reparameterization MLP of ``model.prefix_encoder`` by the table it computes
    (identical prefixes; the config's ``projection_dim`` becomes None). Returns the encoder."""
    enc = getattr(model, "prefix_encoder", None)
    if enc is None:
        raise ValueError("model has no prefix_encoder; call prefix.apply first")
    if enc.transform is not None:
        with torch.no_grad():
            table = enc.table().detach().clone()  # (P, 2LD)
        enc.embedding = nn.Parameter(table, requires_grad=enc.embedding.requires_grad)
        enc.transform = None
        enc.config = dataclasses.replace(enc.config, projection_dim=None)
    return enc


# ---------------------------------------------------------------------------- token init

def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of ``text``: a ``tokenizers.Tokenizer`` (``.encode(text).ids``) or anything
    whose ``encode(text)`` returns a list of ids."""
    if tokenizer is None:
        raise ValueError("init_text needs a tokenizer: pass tokenizer= to apply")
    enc = tokenizer.encode(text)
    return list(getattr(enc, "ids", enc))


def fill_ids(ids: list[int], P: int, what: str) -> torch.Tensor:
    """``ids`` repeated until they fill P slots; more than P ids is an error."""
    if not ids:
        raise ValueError(f"{what} encodes to no tokens")
    if len(ids) > P:
        raise ValueError(f"{what} is {len(ids)} tokens, longer than num_virtual_tokens={P}; "
                         f"shorten the text or raise num_virtual_tokens")
    reps = -(-P // len(ids))  # ceil
    return torch.tensor((ids * reps)[:P], dtype=torch.long)


def init_token_ids(cfg: PrefixConfig, tokenizer, vocab_size: int) -> torch.Tensor:
    P = cfg.num_virtual_tokens
    if cfg.init_text is None:
        return torch.randint(0, vocab_size, (P,))
    return fill_ids(encode_text(tokenizer, cfg.init_text), P, "init_text")


@torch.no_grad()
def token_kv_table(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The keys and values the frozen model computes at each layer for the tokens ``ids``
    (positions 0 .. P-1), as a (P, 2 * n_layer * D) table in the prefix layout. Llama's keys
    come rotated to their positions, as its KV cache holds them."""
    base = model.bert if isinstance(model, BertClassifier) else model
    was_training = base.training
    base.eval()  # no dropout in the activations we copy
    try:
        if isinstance(base, (GPT, Llama)):
            with base_model_only(base):  # the base model's activations, prefix or not
                kvs = base(ids[None], return_kv=True).kv  # per layer ((1, nkv, P, hs), (1, nkv, P, hs))
        else:  # BERT's attention reads the layer's input directly (post-LN blocks)
            hidden = base(ids[None], output_hidden_states=True).hidden_states
            kvs = []
            for layer, h in zip(base.layers, hidden):
                nh = layer.attn.n_head
                k = layer.attn.k_proj(h).view(1, h.shape[1], nh, -1).transpose(1, 2)  # (1, nh, P, hs)
                v = layer.attn.v_proj(h).view(1, h.shape[1], nh, -1).transpose(1, 2)  # (1, nh, P, hs)
                kvs.append((k, v))
    finally:
        base.train(was_training)
    rows = [t[0].transpose(0, 1) for kv in kvs for t in kv]  # 2L tensors (P, nkv, hs), k before v
    P = ids.shape[0]
    return torch.stack(rows, dim=1).reshape(P, -1)  # (P, 2L, nkv, hs) -> (P, 2LD)
