"""How a batch reaches a model: the method hooks (prefix / soft prompt) and the device.

Every caller (training, evaluation, compare, bench, the code-generation case) goes through
``model_forward``, so a method that changes the input changes it in one place.
"""
from __future__ import annotations

import torch

from minift.methods.common import host_to_device
from minift.models.gpt import GPT


def model_forward(model: torch.nn.Module, batch: dict):
    """Run ``model`` on a batch dict and return its output dataclass (with ``.loss``).

    A batch has ``input_ids``, ``attention_mask`` and ``labels`` (GPT: aligned with
    ``input_ids``, -100 where no loss; classifier: one label per example), and optionally
    ``token_type_ids``. Method hooks are explicit: a model with a ``prefix_encoder``
    (prefix tuning) or a ``soft_prompt`` (prompt tuning) attached gets its batch extended
    by that module's ``extend(batch)``, which returns the batch with ``prefix`` or
    ``inputs_embeds`` (and lengthened ``attention_mask``/``labels``) filled in.
    """
    return forward_extended(model, extend_batch(model, batch))


def extend_batch(model: torch.nn.Module, batch: dict) -> dict:
    """The batch as the model reads it: the ``prefix_encoder`` / ``soft_prompt`` hook applied."""
    for hook in ("prefix_encoder", "soft_prompt"):
        module = getattr(model, hook, None)
        if module is not None:
            batch = module.extend(batch)
    return batch


def forward_extended(model: torch.nn.Module, batch: dict):
    """``model_forward`` of a batch that ``extend_batch`` already extended."""
    kw = dict(batch)
    if isinstance(model, GPT):
        return model(kw.pop("input_ids", None), kw.pop("labels", None), **kw)
    return model(**kw)


def lm_targets(batch: dict) -> int:
    """How many targets GPT's loss on ``batch`` (as ``extend_batch`` returns it) is the mean
    over: labels after the internal shift that are not -100. Counted on the extended batch, as a
    soft prompt moves the targets: its virtual positions are -100, and the first real token,
    never a target without it, is predicted by the last virtual one."""
    return int((batch["labels"][:, 1:] != -100).sum())


# ---------------------------------------------------------------------------- device

def any_padded(batches) -> bool:
    """Whether some batch has padding (a 0 in its attention mask). A run under CUDA graphs whose
    batches are padded keeps every mask, all-ones ones too (``to_device(keep_mask=True)``): a batch
    without its mask would be another input signature, compiled and captured once more."""
    return any(not bool(b["attention_mask"].all()) for b in batches if "attention_mask" in b)


def check_device(name) -> None:
    """A one-line ValueError unless ``name`` is auto, cpu, or an available cuda / cuda:N."""
    if name == "auto":
        return
    try:
        d = torch.device(name)
    except (RuntimeError, TypeError):
        d = None
    if d is None or d.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r} is unknown; use auto, cpu, cuda or cuda:N")
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but no CUDA device is available (use cpu or auto)")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: there are only {torch.cuda.device_count()} CUDA device(s)")


def pick_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; any other name as given (see ``check_device``)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def to_device(batch: dict, device, keep_mask: bool = False) -> dict:
    """Move a batch to ``device`` (to a GPU from pinned memory: ``host_to_device``). An attention
    mask without padding (all ones, checked here on the CPU, before the copy) is dropped unless
    ``keep_mask``: it means the same as no mask, and without one the models can use SDPA's causal /
    flash path instead of building a dense bias."""
    mask = batch.get("attention_mask")
    if not keep_mask and torch.is_tensor(mask) and mask.device.type == "cpu" and bool(mask.all()):
        batch = {k: v for k, v in batch.items() if k != "attention_mask"}
    return {k: host_to_device(v, device) if torch.is_tensor(v) else v for k, v in batch.items()}
