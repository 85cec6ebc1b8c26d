"""Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt
Tuning", https://arxiv.org/abs/2104.08691).

Only P input vectors are learned; they are prepended to the token embeddings and the frozen
model reads them like words:

    h_0 = [ p_1 .. p_P ; wte(x_1) .. wte(x_T) ] + wpe(0 .. P+T-1)        p_i ∈ R^C trainable

      p_1 .. p_P   x_1 ........ x_T
      [ soft ]     [ wte (frozen) ] ──► frozen transformer ──► logits (P + T positions)
      labels:  -100 .. -100  y_1 .. y_T          (GPT, Llama: no loss on prompt slots)

``wte`` is the model's token embedding (``prefix.token_embedding``: Llama's ``embed_tokens``;
Llama adds no ``wpe``, RoPE turns q and k by the same positions 0 .. P+T-1 instead).
Unlike prefix tuning (``prefix.py``) the prompt occupies real positions 0 .. P-1 and only
the first layer sees it directly. Inits (``PromptConfig.init``): "random" (N(0, s^2) with s
the std of the model's own token embeddings), "vocab" (the embeddings of P tokens sampled
from the vocabulary), "text" (the embeddings of ``init_text``'s tokens — a task description,
or the class labels as the paper did — repeated until it fills P; an error when longer).

The learned (P, C) table is PEFT's ``prompt_embeddings``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from minift.methods.common import check_virtual_tokens, freeze_all, require_method_inputs, unfreeze_modules
from minift.methods.prefix import encode_text, fill_ids, model_dims, token_embedding

INITS = ("random", "vocab", "text")


@dataclass
class PromptConfig:
    num_virtual_tokens: int = 20
    init: str = "random"  # "random" | "vocab" | "text"
    init_text: str | None = None  # required by init="text" (with a tokenizer passed to apply)
    modules_to_save: tuple[str, ...] = ()  # fully trainable modules, e.g. ("classifier",)

    def __post_init__(self):
        check_virtual_tokens(self)
        if self.init not in INITS:
            raise ValueError(f"PromptConfig.init must be one of {', '.join(INITS)}; got {self.init!r}")
        if self.init == "text" and (self.init_text is None or not self.init_text.strip()):
            raise ValueError("PromptConfig.init='text' needs a non-empty init_text")
        if self.init != "text" and self.init_text is not None:
            raise ValueError("PromptConfig.init_text is only used with init='text'")


class SoftPrompt(nn.Module):
    """P trainable vectors (P, C) placed before the token embeddings."""

    def __init__(self, cfg: PromptConfig, wte: nn.Embedding, max_positions: int):
        super().__init__()
        self.config = cfg
        self.max_positions = max_positions
        self.embedding = nn.Parameter(torch.zeros(cfg.num_virtual_tokens, wte.embedding_dim))  # (P, C)
        # The model owns the token embedding; held by reference, not registered, so it adds
        # no state-dict key and no parameter to this module.
        self.__dict__["wte"] = wte

    @property
    def num_virtual_tokens(self) -> int:
        return self.embedding.shape[0]

    def embed(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None
              ) -> torch.Tensor:
        """[prompt; wte(input_ids)] (or [prompt; inputs_embeds]): (B, P + T, C)."""
        x = self.wte(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        B, T = x.shape[:2]
        P = self.num_virtual_tokens
        if P + T > self.max_positions:
            raise ValueError(f"soft prompt ({P}) + sequence ({T}) = {P + T} exceeds the model's "
                             f"{self.max_positions} positions; shorten the input or the prompt")
        prompt = self.embedding.to(x.dtype)[None].expand(B, -1, -1)  # (B, P, C)
        return torch.cat([prompt, x], dim=1)  # (B, P+T, C)

    def extend(self, batch: dict) -> dict:
        """The batch with ``input_ids`` replaced by ``inputs_embeds`` = [prompt; wte(ids)],
        P ones before ``attention_mask``, P zeros before ``token_type_ids`` and, when labels
        have a time dimension (GPT), P ignored (-100) labels before them."""
        out = dict(batch)
        ids = out.pop("input_ids", None)
        x = self.embed(ids, out.pop("inputs_embeds", None) if ids is None else None)
        B, P = x.shape[0], self.num_virtual_tokens
        out["inputs_embeds"] = x
        if out.get("attention_mask") is not None:
            m = out["attention_mask"]
            out["attention_mask"] = torch.cat([m.new_ones(B, P), m], dim=1)  # (B, P+T)
        if out.get("token_type_ids") is not None:
            t = out["token_type_ids"]
            out["token_type_ids"] = torch.cat([t.new_zeros(B, P), t], dim=1)  # (B, P+T)
        labels = out.get("labels")
        if labels is not None and labels.dim() == 2:
            out["labels"] = torch.cat([labels.new_full((B, P), -100), labels], dim=1)  # (B, P+T)
        return out

    def extra_repr(self) -> str:
        return f"P={self.num_virtual_tokens}, dim={self.embedding.shape[1]}"


def apply(model: nn.Module, cfg: PromptConfig, tokenizer=None) -> list[str]:
    """Freeze ``model`` (except ``cfg.modules_to_save``) and attach ``model.soft_prompt``.
    Returns the names of the trainable parameters."""
    if getattr(model, "soft_prompt", None) is not None:
        raise ValueError("model already has a soft_prompt; delete it before applying prompt tuning again")
    if getattr(model, "prefix_encoder", None) is not None:
        raise ValueError("model has a prefix_encoder; prefix and prompt tuning are not combined here")
    max_positions = model_dims(model).max_positions
    P = cfg.num_virtual_tokens
    if P >= max_positions:
        raise ValueError(f"num_virtual_tokens ({P}) leaves no room for text: the model has "
                         f"{max_positions} positions")
    wte = token_embedding(model)
    sp = SoftPrompt(cfg, wte, max_positions).to(wte.weight.device)
    with torch.no_grad():
        if cfg.init == "random":
            sp.embedding.normal_(0.0, wte.weight.float().std().item())
        else:
            ids = (torch.randint(0, wte.num_embeddings, (P,)) if cfg.init == "vocab"
                   else fill_ids(encode_text(tokenizer, cfg.init_text), P, "init_text"))
            sp.embedding.copy_(wte(ids.to(wte.weight.device)))
    freeze_all(model)
    model.soft_prompt = sp
    require_method_inputs(model)  # model(ids) alone would ignore it: refuse
    names = ["soft_prompt.embedding"]
    if cfg.modules_to_save:
        names += unfreeze_modules(model, cfg.modules_to_save)
    return names
