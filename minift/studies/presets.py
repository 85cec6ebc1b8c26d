"""Model shapes by name, for the studies that need a model's size but not its weights: the
benchmark (random init: weights do not change speed), the advisor and its memory estimator.
"""
from __future__ import annotations

from dataclasses import replace

from minift.models.bert import BertConfig
from minift.models.gpt import GPTConfig

PRESETS: dict[str, GPTConfig | BertConfig] = {
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),
    "bert-base": BertConfig(),
    "minilm": BertConfig(n_layer=6, n_head=12, n_embd=384, n_inner=1536),  # MiniLM-L6 (minift fetch minilm)
    "tiny-gpt": GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_embd=64),
    "tiny-bert": BertConfig(vocab_size=256, max_position_embeddings=64, n_layer=2, n_head=4, n_embd=64,
                            n_inner=128),
}


def preset(name: str) -> GPTConfig | BertConfig:
    """A copy of the shape ``name`` (ValueError listing the presets for an unknown one)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return replace(PRESETS[name])
