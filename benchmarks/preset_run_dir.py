"""A `minift train` run at `minift bench`'s GPT shape, without a model hub: a random GPT of a bench
preset saved as a Hugging Face directory, a word-level tokenizer over its whole vocabulary, and a
text of random words.

    python3 benchmarks/preset_run_dir.py --out DIR [--preset gpt2-medium] [--tokens N] [--seed S]

Writes DIR/model (``config.json``, ``model.safetensors``, ``tokenizer.json``) and DIR/train.txt.
The tokenizer maps the words ``w0 ... w{V-2}`` and ``<|endoftext|>`` to the preset's V ids, one token
a word, so `minift train --task causal-lm --max-len T --batch-size B` runs bench's B x T blocks
through the same vocabulary projection; the text has N words (``--tokens``, default 8 x 1,024 x 60:
sixty steps of bench's default shape), drawn uniformly. The weights are the preset's random init (GPT-2
medium: 1.4 GB in fp32), so the run measures speed, not learning.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from minift.models.gpt import GPT, GPTConfig  # noqa: E402
from minift.studies.presets import PRESETS  # noqa: E402


def fail(message: str):
    print(f"preset_run_dir.py: {message}", file=sys.stderr)
    raise SystemExit(2)


def build(out: Path, preset: str, tokens: int, seed: int = 0) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    cfg = PRESETS.get(preset)
    if not isinstance(cfg, GPTConfig):
        gpts = sorted(k for k, v in PRESETS.items() if isinstance(v, GPTConfig))
        fail(f"--preset {preset!r} is not a GPT preset; choose from {', '.join(gpts)}")
    if tokens < 1:
        fail(f"--tokens must be >= 1, got {tokens}")
    model_dir = out / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    words = [f"w{i}" for i in range(cfg.vocab_size - 1)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate([*words, "<|endoftext|>"])},
                                     unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(model_dir / "tokenizer.json"))
    torch.manual_seed(seed)
    GPT(cfg).save_pretrained(model_dir)
    ids = torch.randint(0, len(words), (tokens,), generator=torch.Generator().manual_seed(seed)).tolist()
    (out / "train.txt").write_text(" ".join(words[i] for i in ids) + "\n")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--preset", default="gpt2-medium")
    p.add_argument("--tokens", type=int, default=8 * 1024 * 60)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    out = build(Path(a.out), a.preset, a.tokens, a.seed)
    print(f"wrote {out / 'model'} and {out / 'train.txt'} ({a.tokens} words)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
