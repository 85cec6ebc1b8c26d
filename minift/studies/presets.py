"""Model shapes by name, for the studies that need a model's size but not its weights: the
benchmark (random init: weights do not change speed), the advisor and its memory estimator.

The Llama shapes are those of two public checkpoints (their ``config.json``), which ``minift train``
also reads: ``llama-1b`` is TinyLlama-1.1B (1,100,048,384 parameters; 22 layers of width 2048, 32
query heads sharing 4 key/value heads, SwiGLU width 5632, 32,000 tokens, untied LM head) and
``llama-350m`` SmolLM2-360M (361,821,120 parameters; 32 layers of width 960, 15 query heads sharing
5 key/value heads, SwiGLU width 2560, 49,152 tokens, LM head tied to the embeddings). Both use
grouped-query attention (GQA) and no biases.
"""
from __future__ import annotations

from dataclasses import replace

from minift.models.bert import BertConfig
from minift.models.gpt import GPTConfig
from minift.models.llama import LlamaConfig

ModelConfig = GPTConfig | BertConfig | LlamaConfig

PRESETS: dict[str, ModelConfig] = {
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),
    "bert-base": BertConfig(),
    "minilm": BertConfig(n_layer=6, n_head=12, n_embd=384, n_inner=1536),  # MiniLM-L6 (minift fetch minilm)
    "llama-350m": LlamaConfig(vocab_size=49152, n_layer=32, n_head=15, n_kv_head=5, n_embd=960, n_inner=2560,
                              max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                              tie_word_embeddings=True),  # SmolLM2-360M
    "llama-1b": LlamaConfig(vocab_size=32000, n_layer=22, n_head=32, n_kv_head=4, n_embd=2048, n_inner=5632,
                            max_position_embeddings=2048, rms_norm_eps=1e-5),  # TinyLlama-1.1B
    "tiny-gpt": GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_embd=64),
    "tiny-bert": BertConfig(vocab_size=256, max_position_embeddings=64, n_layer=2, n_head=4, n_embd=64,
                            n_inner=128),
    "tiny-llama": LlamaConfig(vocab_size=256, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, n_inner=160,
                              max_position_embeddings=64),
}


def preset(name: str) -> ModelConfig:
    """A copy of the shape ``name`` (ValueError listing the presets for an unknown one)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return replace(PRESETS[name])
