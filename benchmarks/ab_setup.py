"""A GPT-2-medium-shaped model directory for timing `minift train` on a GPU: random weights
(gpt2-medium's shapes, GPT-2's vocabulary size), a byte-level BPE tokenizer trained on the
Python standard library's sources (the code corpus every install carries), and that corpus
as a .txt file.

    python3 benchmarks/ab_setup.py DIR   -> DIR/{config.json, model.safetensors, tokenizer.json, corpus.txt}

Run from a checkout: it builds the model with that checkout's minift.
"""
from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's minift


def corpus(limit_bytes: int = 24_000_000) -> str:
    """Standard-library Python sources, sorted by path, up to ``limit_bytes``."""
    parts, size = [], 0
    for p in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        parts.append(text)
        size += len(text)
        if size >= limit_bytes:
            break
    return "\n".join(parts)


def main(out: Path) -> None:
    from minift.models.gpt import GPT, GPTConfig
    out.mkdir(parents=True, exist_ok=True)
    text = corpus()
    (out / "corpus.txt").write_text(text)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([str(out / "corpus.txt")], trainers.BpeTrainer(vocab_size=8192, special_tokens=["<|endoftext|>"]))
    tok.save(str(out / "tokenizer.json"))
    torch.manual_seed(0)
    GPT(GPTConfig(vocab_size=50257, block_size=1024, n_layer=24, n_head=16, n_embd=1024)).save_pretrained(out)
    print(f"{out}: {len(text):,} characters, tokenizer of {tok.get_vocab_size()} tokens")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
