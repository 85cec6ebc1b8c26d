"""A small GPT or Llama pretrained on Python code (the standard library), and next-line completion
to score it on a package it never saw (the adaptation itself: ``minift/studies/codegen_case.py``).

    stdlib *.py ─ by top-level package ─┬─ pretraining packages ─► byte-level BPE ─► GPT | Llama ─► HF dir
                                        └─ held-out package ─┬─ adapt-train files ─► AdaLoRA | LoRA | full
                                                             └─ eval files ─► perplexity, next-line EM, ROUGE-L

The held-out package is removed before the tokenizer and the model see anything, and its
files are split again (seeded) into files to adapt on and files to evaluate on, so no eval
line was ever trained on. The pretrained directory (``config.json``, ``model.safetensors``,
``tokenizer.json``) loads with ``GPT.from_pretrained`` (``Llama.from_pretrained`` for ``arch="llama"``)
and with ``transformers`` (``GPT2LMHeadModel``, ``LlamaForCausalLM``); its
``corpus.json`` records the split, and ``minift.studies.codegen_case.run_case`` (the adaptation and
the results table) refuses a directory whose pretraining saw the package it is to adapt to.

Next-line completion: for a sampled line of an eval file, the context is every token of the
file before the token holding the newline that opens the line (cut at a token boundary, so
the model sees its input tokenized as in training), truncated on the left to fit the block.
The model decodes greedily until the line is complete; exact match compares stripped text,
ROUGE-L is ``minift.metrics.rouge_l`` (which scores alphanumeric words only).
"""
from __future__ import annotations

import copy
import json
import random
import sysconfig
import time
from bisect import bisect_right
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from minift.training.data import batches, eos_id, pad_id
from minift.metrics import perplexity, rouge_l
from minift.models.gpt import GPT, GPTConfig
from minift.models.llama import Llama, LlamaConfig
from minift.training.forward import extend_batch, forward_extended, lm_targets
from minift.training.loop import train
from minift.training.config import TrainConfig

SKIP_DIRS = frozenset({"test", "tests", "site-packages", "idlelib", "lib2to3", "__pycache__"})
EOT = "<|endoftext|>"
DEFAULT_HELD_OUT = ("asyncio",)  # 33 files, ~490 KB: the largest stdlib package of ordinary code


# ---------------------------------------------------------------------------- corpus

def stdlib_corpus(root=None) -> dict[str, list[Path]]:
    """{top-level package or module: its .py files, sorted} under ``root`` (default: this
    Python's standard library), without test suites, site-packages, idlelib, lib2to3,
    caches and files that are not UTF-8."""
    root = Path(sysconfig.get_paths()["stdlib"] if root is None else root)
    if not root.is_dir():
        raise FileNotFoundError(f"corpus directory {root} does not exist")
    groups: dict[str, list[Path]] = {}
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        key = rel.parts[0] if len(rel.parts) > 1 else p.stem
        if SKIP_DIRS.intersection(rel.parts[:-1]) or key in SKIP_DIRS or not p.is_file():
            continue
        try:
            p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        groups.setdefault(key, []).append(p)
    if not groups:
        raise ValueError(f"corpus directory {root} has no UTF-8 .py files")
    return dict(sorted(groups.items()))


@dataclass
class CorpusSplit:
    pretrain: list[Path]
    adapt_train: list[Path]
    adapt_eval: list[Path]
    pretrain_groups: list[str]
    held_out: tuple[str, ...]


def split_corpus(groups: dict[str, list[Path]], held_out=DEFAULT_HELD_OUT, eval_fraction: float = 0.3,
                 seed: int = 0) -> CorpusSplit:
    """Pretraining files are every group but ``held_out``; the held-out files are shuffled
    (seeded) and split into adapt-train and eval files (at least one each)."""
    held_out = (held_out,) if isinstance(held_out, str) else tuple(held_out)
    for h in held_out:
        if h not in groups:
            raise ValueError(f"held-out package {h!r} is not in the corpus ({len(groups)} packages: "
                             f"{', '.join(list(groups)[:10])}{', ...' if len(groups) > 10 else ''})")
    files = sorted(f for h in held_out for f in groups[h])
    if len(files) < 2:
        raise ValueError(f"held-out {', '.join(held_out)} has {len(files)} file(s); need 2 or more "
                         f"(one to adapt on, one to evaluate on)")
    pre_groups = [g for g in groups if g not in held_out]
    if not pre_groups:
        raise ValueError("every package is held out: nothing is left to pretrain on")
    shuffled = files[:]
    random.Random(seed).shuffle(shuffled)
    n_eval = min(len(files) - 1, max(1, round(eval_fraction * len(files))))
    return CorpusSplit(sorted(f for g in pre_groups for f in groups[g]), sorted(shuffled[n_eval:]),
                       sorted(shuffled[:n_eval]), pre_groups, held_out)


# ---------------------------------------------------------------------------- tokenizer and blocks

def train_tokenizer(files, vocab_size: int, out=None):
    """Byte-level BPE (GPT-2's pre-tokenizer and decoder) trained on whole files, so merges
    may span a newline and the next line's indentation. ``<|endoftext|>`` is added last:
    its id is vocab size - 1, the bos/eos id ``save_pretrained`` writes to config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    if vocab_size < 258:
        raise ValueError(f"vocab_size must be >= 258 (256 bytes + a merge + {EOT}), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    files = list(files)
    tok.train_from_iterator((Path(f).read_text(encoding="utf-8") for f in files), trainer, length=len(files))
    tok.add_special_tokens([EOT])
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        tok.save(str(Path(out) / "tokenizer.json"))
    return tok


def encode_files(tok, files) -> list[int]:
    """All files as one token stream, each followed by ``<|endoftext|>``."""
    eot = eos_id(tok)
    texts = [Path(f).read_text(encoding="utf-8") for f in files]
    return [i for enc in tok.encode_batch(texts, add_special_tokens=False) for i in enc.ids + [eot]]


def blocks(ids: list[int], block_size: int) -> list[dict]:
    """Consecutive blocks of ``block_size`` tokens (the last may be shorter), labels = inputs."""
    out = [ids[i:i + block_size] for i in range(0, len(ids), block_size)]
    return [{"input_ids": b, "labels": b} for b in out if len(b) >= 2]


def _cap_chars(files: list[Path], max_chars: int | None, seed: int) -> list[Path]:
    """A seeded subset of ``files`` of at most ``max_chars`` characters (at least one file)."""
    if max_chars is None:
        return files
    order, kept, n = files[:], [], 0
    random.Random(seed).shuffle(order)
    for f in order:
        size = len(f.read_text(encoding="utf-8"))
        if kept and n + size > max_chars:
            continue
        kept.append(f)
        n += size
    return sorted(kept)


# ---------------------------------------------------------------------------- pretraining

def resolve_device(device: str) -> str:
    """"auto" -> "cuda" when available, else "cpu"; anything else as given."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def device_name(device: str) -> str:
    """The card's name (CUDA) or the CPU's, for result tables."""
    from minift.studies.bench import _device_name as name
    return name(resolve_device(device))


ARCHS = ("gpt2", "llama")


@dataclass
class PretrainConfig:
    """Defaults: the GPU model. GPT-2: 6 layers of width 512 (8 heads) hold 12 * 6 * 512^2 = 18.9M
    weights, the tied 8,192 x 512 embedding 4.2M and 512 positions 0.26M: ~23.4M parameters.
    Llama (``build_model``): the same layers, width and heads with 4 key/value heads, SwiGLU 1,536
    wide, RoPE, RMSNorm, the tied embedding and no position table: ~23.1M."""
    arch: str = "gpt2"                # "gpt2" or "llama"
    vocab_size: int = 8192
    n_layer: int = 6
    n_head: int = 8
    n_embd: int = 512
    block_size: int = 512
    dropout: float = 0.1
    steps: int | None = None          # None: as many as fit in `minutes` (timed on a throwaway copy)
    minutes: float = 7.0
    batch_size: int = 32
    lr: float = 1e-3
    warmup: float = 0.02
    weight_decay: float = 0.1
    max_chars: int | None = None      # cap on the pretraining text (the smoke run)
    seed: int = 0
    device: str = "auto"
    progress: bool = True

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        if not self.minutes > 0:  # also rejects nan
            raise ValueError(f"minutes must be > 0, got {self.minutes}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")


# The CPU smoke run: ~40k parameters (either arch), at most 150k characters of code, 30 steps.
SMOKE_PRETRAIN = dict(vocab_size=384, n_layer=2, n_head=4, n_embd=32, block_size=64, dropout=0.0,
                      steps=30, batch_size=8, lr=3e-3, max_chars=150_000)


def build_model(cfg: PretrainConfig, vocab_size: int) -> GPT | Llama:
    """The untrained model of ``cfg.arch``. The Llama matches GPT-2's parameter count at the same
    depth and width: per layer, grouped-query attention with n_head // 2 key/value heads holds
    3C^2 (GPT-2: 4C^2) and a SwiGLU of width 3C holds 9C^2 (GPT-2's MLP: 8C^2), 12C^2 in all.
    Its LM head is tied to the embedding, as GPT-2's is. Its one dropout, on the attention
    probabilities, is ``cfg.dropout`` (GPT-2 drops out its residuals and embeddings too)."""
    if cfg.arch == "gpt2":
        return GPT(GPTConfig(vocab_size=vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer,
                             n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout))
    eot = vocab_size - 1  # <|endoftext|>, the bos/eos id GPT-2's save_pretrained writes too
    return Llama(LlamaConfig(vocab_size=vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                             n_kv_head=max(1, cfg.n_head // 2), n_embd=cfg.n_embd, n_inner=3 * cfg.n_embd,
                             max_position_embeddings=cfg.block_size, tie_word_embeddings=True,
                             attention_dropout=cfg.dropout, bos_token_id=eot, eos_token_id=eot))


def context_size(model: GPT | Llama) -> int:
    """The positions ``model`` was built for (GPT-2's block, Llama's max_position_embeddings)."""
    c = model.config
    return c.block_size if isinstance(c, GPTConfig) else c.max_position_embeddings


def _steps_for(minutes: float, model: GPT | Llama, data: list[dict], cfg: PretrainConfig) -> int:
    """Optimizer steps that fit in ``minutes``: 12 steps of a throwaway copy, the last 8 timed."""
    stamps: list[float] = []
    probe = TrainConfig(lr=cfg.lr, steps=12, device=cfg.device, progress=False, plot=False)
    train(copy.deepcopy(model), data, probe, on_step=lambda s, loss: stamps.append(time.perf_counter()))
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return max(1, int(minutes * 60 / ((stamps[-1] - stamps[3]) / 8)))


def pretrain(corpus, out, held_out=DEFAULT_HELD_OUT, cfg: PretrainConfig | None = None, log=print) -> dict:
    """Tokenizer + GPT-2 or Llama (``cfg.arch``) pretrained on ``corpus`` ("stdlib" or a directory) minus
    ``held_out``, written to ``out`` as an HF directory with ``corpus.json``. Returns that record."""
    cfg = cfg or PretrainConfig()
    root = None if corpus in (None, "stdlib") else Path(corpus)
    split = split_corpus(stdlib_corpus(root), held_out, seed=cfg.seed)
    files = _cap_chars(split.pretrain, cfg.max_chars, cfg.seed)
    out = Path(out)
    tok = train_tokenizer(files, cfg.vocab_size, out)
    ids = encode_files(tok, files)
    data = batches(blocks(ids, cfg.block_size), cfg.batch_size, shuffle=True, seed=cfg.seed, pad_id=pad_id(tok))
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, tok.get_vocab_size())
    n_params = sum(p.numel() for p in model.parameters())
    steps = cfg.steps or _steps_for(cfg.minutes, model, data, cfg)
    log(f"pretrain: {cfg.arch}, {len(files)} files, {len(ids):,} tokens, {n_params / 1e6:.2f}M parameters, "
        f"{steps} steps")
    t0 = time.perf_counter()
    res = train(model, data, TrainConfig(lr=cfg.lr, steps=steps, warmup=cfg.warmup, schedule="cosine",
                                         weight_decay=cfg.weight_decay, device=cfg.device, seed=cfg.seed,
                                         progress=cfg.progress, plot=False))
    model.to("cpu").save_pretrained(out)
    root = Path(sysconfig.get_paths()["stdlib"]) if root is None else root
    rel = lambda fs: [str(f.relative_to(root)) for f in fs]  # noqa: E731
    record = {"arch": cfg.arch, "corpus": str(root), "pretrain_packages": split.pretrain_groups,
              "held_out": list(split.held_out),
              "adapt_train": rel(split.adapt_train), "adapt_eval": rel(split.adapt_eval),
              "pretrain_files": len(files), "pretrain_tokens": len(ids), "params": n_params,
              "config": asdict(cfg), "steps": steps, "time_s": time.perf_counter() - t0,
              "tokens_per_s": res.tokens_per_s, "final_loss": sum(res.losses[-20:]) / len(res.losses[-20:]),
              "device": device_name(cfg.device)}
    (out / "corpus.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


# ---------------------------------------------------------------------------- evaluation

@torch.no_grad()
def lm_perplexity(model: GPT | Llama, examples: list[dict], batch_size: int = 16, device: str = "cpu",
                  pad: int = 0) -> float:
    """exp(mean next-token loss over every predicted token of ``examples``)."""
    model.eval()
    total, n = 0.0, 0
    for b in batches(examples, batch_size, pad_id=pad):
        b = {k: v.to(device) for k, v in b.items()}
        b = extend_batch(model, b)  # a soft prompt moves the targets: count them as the model sees them
        k = lm_targets(b)  # tokens with a loss: the shift drops one per row
        total += forward_extended(model, b).loss.item() * k
        n += k
    return perplexity(total / n)


def line_cuts(text: str, offsets: list[tuple[int, int]]) -> list[tuple[int, int, str]]:
    """(s, k, line) for every non-blank line after the first: the line starts at character s
    and k is the token holding the "\n" at s - 1. The context ``ids[:k]`` decodes to exactly
    ``text[:offsets[k][0]]`` (that token starts in a run of whitespace, never inside a character)."""
    ends, out = [e for _, e in offsets], []
    for s in (i + 1 for i, ch in enumerate(text) if ch == "\n" and i + 1 < len(text)):
        k = bisect_right(ends, s - 1)  # the first token ending after the "\n"
        e = text.find("\n", s)
        line = text[s:e if e >= 0 else len(text)]
        if line.strip() and 0 < k < len(offsets):
            out.append((s, k, line))
    return out


@torch.no_grad()
def next_line_eval(model: GPT | Llama, tok, files, n_lines: int = 200, max_new_tokens: int = 64, seed: int = 0,
                   device: str = "cpu", batch_size: int = 16, max_eval_blocks: int | None = None) -> dict:
    """Greedy next-line completion on ``n_lines`` sampled non-blank lines of ``files``
    (exact match, ROUGE-L) and perplexity on the files' blocks. Returns means and examples."""
    model.eval().to(device)
    block = context_size(model)
    if max_new_tokens >= block:
        raise ValueError(f"max_new_tokens {max_new_tokens} leaves no context in a block of {block}")
    eot, cands, encoded = eos_id(tok), [], []
    for f in files:
        text = Path(f).read_text(encoding="utf-8")
        enc = tok.encode(text, add_special_tokens=False)
        cands += [(len(encoded), s, k, line) for s, k, line in line_cuts(text, enc.offsets)]
        encoded.append((text, enc.ids, enc.offsets))
    if not cands:
        raise ValueError("the eval files have no non-blank line after the first")
    picked = random.Random(seed).sample(cands, min(n_lines, len(cands)))
    exact, rl, examples = 0, 0.0, []
    for fi, s, k, line in picked:
        text, ids, offsets = encoded[fi]
        gap = text[offsets[k][0]:s]  # the text of token k before the line: "\n" (plus any trailing spaces)
        ctx = ids[max(0, k - (block - max_new_tokens)):k]
        out = model(torch.tensor([ctx], device=device), return_kv=True)  # (1, T) -> logits (1, T, V)
        gen, rest = [], ""
        for _ in range(max_new_tokens):
            nxt = int(out.logits[0, -1].argmax())
            if nxt == eot:
                break
            gen.append(nxt)
            g = tok.decode(gen)
            rest = g[len(gap):] if g.startswith(gap) else g.partition("\n")[2]
            if "\n" in rest:
                break
            out = model(torch.tensor([[nxt]], device=device), prefix=out.kv, return_kv=True)  # (1, 1)
        pred = rest.split("\n", 1)[0]
        exact += pred.strip() == line.strip()
        rl += rouge_l(pred, line)
        if len(examples) < 5:
            examples.append({"reference": line, "prediction": pred})
    ex = blocks([i for _, ids, _ in encoded for i in ids + [eot]], block)[:max_eval_blocks]
    return {"perplexity": lm_perplexity(model, ex, batch_size, device, pad_id(tok)),
            "exact_match": exact / len(picked), "rouge_l": rl / len(picked), "lines": len(picked),
            "examples": examples}

