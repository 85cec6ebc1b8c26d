"""The settings of one training run (``TrainConfig``) and its learning-rate schedule.

``minift train`` fills a ``TrainConfig`` from its flags, ``--config`` TOML and recipes
(``settings.py`` lists them from this dataclass's fields); ``loop.train`` runs it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from minift.training.forward import check_device

SCHEDULES = ("linear", "cosine", "constant")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")


@dataclass
class TrainConfig:
    lr: float = 1e-4
    steps: int | None = None          # optimizer steps; or give epochs
    epochs: float | None = None       # passes over the batches (steps = ceil(epochs * n / grad_accum))
    batch_size: int = 8               # examples per micro-batch (used by whoever builds the batches); on
                                      # several ranks the global micro-batch, split over them (distributed.py)
    grad_accum: int = 1               # micro-batches per optimizer step
    warmup: float = 0.0               # >= 1: warmup steps; in [0, 1): a fraction of all steps
    schedule: str = "linear"          # decay after warmup: linear | cosine | constant
    weight_decay: float = 0.0         # AdamW decay on >= 2-D parameters (not biases/LayerNorms)
    max_grad_norm: float | None = 1.0
    eval_every: int = 0               # optimizer steps between evaluations; 0 = only at the end
    patience: int = 0                 # early stopping: evaluations without improvement; 0 = off
    metric: str = "loss"              # the eval metric early stopping and best/ watch
    higher_is_better: bool = False
    shuffle: bool = True
    seed: int = 0
    device: str | None = None         # None: train where the model is; auto | cpu | cuda | cuda:N: move it there
    bf16: bool = True                 # bf16 autocast, on CUDA only
    compile: bool = False             # torch.compile the model (nn.Module.compile: state-dict keys unchanged)
    compile_mode: str = "default"     # torch.compile mode; "reduce-overhead" adds CUDA graphs
    activation_budget: float | None = None  # compiled runs: the share of saved activations kept (speed.py)
    recompute_act: bool = True        # compiled CUDA runs: the MLP's activation recomputed (fast.mlp, speed.py)
    fast: bool = True                 # minift.fast: the speed plan's pieces; on CUDA, train()'s clipping,
                                      # AdamW step (fast.adamw) and data (feed.py)
    out_dir: str | None = None        # checkpoints, metrics.jsonl, loss.png
    save_every: int = 0               # optimizer steps between checkpoints; 0 = only at the end
    resume: bool = False              # continue from out_dir/last if it exists
    log_path: str | None = None       # JSONL metrics; default out_dir/metrics.jsonl
    log_every: int = 10               # optimizer steps between reads of the loss (one host sync each)
    progress: bool = True             # tqdm bar
    plot: bool = True                 # loss curve PNG in out_dir when matplotlib is installed

    def __post_init__(self):
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of steps and epochs")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode {self.compile_mode!r} is unknown; choose one of {', '.join(COMPILE_MODES)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule {self.schedule!r} is unknown; choose one of {', '.join(SCHEDULES)}")
        for name in ("batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")
        for name in ("eval_every", "patience", "save_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "warmup", "weight_decay", "max_grad_norm", "epochs"):
            v = getattr(self, name)
            if v is not None and not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v}")
        if self.lr <= 0 or self.warmup < 0 or self.weight_decay < 0:
            raise ValueError(f"lr must be > 0, warmup and weight_decay >= 0; got lr={self.lr}, "
                             f"warmup={self.warmup}, weight_decay={self.weight_decay}")
        if self.activation_budget is not None and not 0 < self.activation_budget <= 1:
            raise ValueError(f"activation_budget must be in (0, 1] (the share of saved activations kept), "
                             f"got {self.activation_budget}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}")
        if self.device is not None:
            check_device(self.device)

    def total_steps(self, n_batches: int) -> int:
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil(self.epochs * n_batches / self.grad_accum))

    def warmup_steps(self, total: int) -> int:
        return int(self.warmup) if self.warmup >= 1 else int(self.warmup * total)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier on each group's base lr for optimizer step ``step`` (0-based)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)  # in [0, 1)
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))
