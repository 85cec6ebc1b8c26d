"""Scoring a model on held-out batches: the one evaluator ``minift train`` (dev), ``minift eval``
and ``minift compare`` (dev and test) share.
"""
from __future__ import annotations

import torch

from minift.metrics import AVERAGES, classification_metrics, perplexity
from minift.training.forward import extend_batch, forward_extended, lm_targets, to_device

# The tasks, and the metrics ``evaluate`` reports for each: what ``--metric`` may name.
TASK_METRICS = {"classification": ("loss", "accuracy", *(f"{a}_{m}" for a in AVERAGES
                                                         for m in ("precision", "recall", "f1"))),
                "causal-lm": ("loss", "perplexity"), "prompt-completion": ("loss", "perplexity")}
TASKS = tuple(TASK_METRICS)


def evaluate(model: torch.nn.Module, batches, task: str, device=None) -> dict[str, float]:
    """Mean loss (per example, or per predicted token for GPT) and the task's metrics
    (``TASK_METRICS``) of ``model`` in eval mode on ``batches``.

    Args:
        device: where the batches go; None: the device the model is on.
    """
    device = device if device is not None else next(model.parameters()).device
    model.eval()
    total, n, gold, pred = 0.0, 0, [], []
    with torch.no_grad():
        for b in batches:
            b = extend_batch(model, to_device(b, device))  # the batch the model reads (soft prompt included)
            out = forward_extended(model, b)
            if task == "classification":
                k = b["labels"].numel()
                gold += b["labels"].tolist()
                pred += out.logits.argmax(-1).tolist()
            else:
                k = lm_targets(b)  # the targets out.loss is the mean over
            total, n = total + out.loss.item() * k, n + k
    loss = total / max(n, 1)
    if task == "classification":
        return {"loss": loss, **classification_metrics(gold, pred)}
    return {"loss": loss, "perplexity": perplexity(loss)}
