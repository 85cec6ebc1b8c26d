"""Scoring a model on held-out batches: the one evaluator ``minift train`` (dev), ``minift eval``
and ``minift compare`` (dev and test) share.
"""
from __future__ import annotations

import contextlib

import torch

from minift.metrics import AVERAGES, classification_metrics, perplexity
from minift.training.forward import extend_batch, forward_extended, lm_targets, to_device

# The tasks, and the metrics ``evaluate`` reports for each: what ``--metric`` may name.
TASK_METRICS = {"classification": ("loss", "accuracy", *(f"{a}_{m}" for a in AVERAGES
                                                         for m in ("precision", "recall", "f1"))),
                "causal-lm": ("loss", "perplexity"), "prompt-completion": ("loss", "perplexity")}
TASKS = tuple(TASK_METRICS)


def evaluate(model: torch.nn.Module, batches, task: str, device=None, *, predictions: list | None = None,
             progress: bool = False) -> dict[str, float]:
    """Mean loss (per example, or per predicted token for GPT) and the task's metrics
    (``TASK_METRICS``) of ``model`` in eval mode on ``batches``. A model whose frozen
    parameters are stored in bf16 (``minift train``'s default on CUDA, ``minift.fast.frozen``) is
    evaluated under bf16 autocast (``matmul_autocast``); any other in its own dtypes.

    Args:
        device: where the batches go; None: the device the model is on.
        predictions: classification only: a list that gets one record per example, in order:
            ``{"id": position, "gold": label id, "pred": label id, "score": probability of pred}``,
            from which every reported metric can be recomputed.
        progress: a progress bar over the batches.
    """
    if predictions is not None and task != "classification":
        raise ValueError(f"predictions are written for classification only, not {task}")
    device = device if device is not None else next(model.parameters()).device
    model.eval()
    total, n, gold, pred = 0.0, 0, [], []
    with torch.no_grad(), matmul_autocast(model, torch.device(device)):
        for b in _bar(batches, progress):
            b = extend_batch(model, to_device(b, device))  # the batch the model reads (soft prompt included)
            out = forward_extended(model, b)
            if task == "classification":
                k = b["labels"].numel()
                probs = out.logits.float().softmax(-1)
                score, label = probs.max(-1)
                if predictions is not None:
                    predictions += [{"id": len(gold) + i, "gold": g, "pred": p, "score": round(sc, 6)}
                                    for i, (g, p, sc) in enumerate(zip(b["labels"].tolist(), label.tolist(),
                                                                       score.tolist()))]
                gold += b["labels"].tolist()
                pred += label.tolist()
            else:
                k = lm_targets(b)  # the targets out.loss is the mean over
            total, n = total + out.loss.item() * k, n + k
    loss = total / max(n, 1)
    if task == "classification":
        return {"loss": loss, **classification_metrics(gold, pred)}
    return {"loss": loss, "perplexity": perplexity(loss)}


def matmul_autocast(model: torch.nn.Module, device: torch.device):
    """bf16 autocast on ``device`` when ``model`` holds bf16 weights beside fp32 ones (a frozen base
    stored in bf16, ``minift.fast.frozen``: its layers multiply in bf16, which outside autocast would
    meet fp32 inputs; it replaces an autocast the caller entered); otherwise nothing: the model
    runs in its own dtypes, under whatever autocast the caller entered."""
    dtypes = {p.dtype for p in model.parameters()}
    if {torch.bfloat16, torch.float32} <= dtypes and device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _bar(batches, enabled: bool):
    if not enabled:
        return batches
    from tqdm.auto import tqdm
    return tqdm(batches, desc="evaluate", leave=False, dynamic_ncols=True)
