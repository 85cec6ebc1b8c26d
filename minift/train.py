"""One readable training loop for every method.

(Skeleton: the loop itself lands with the training issue.) ``model_forward`` is the one
place that turns a batch into a model call, including the explicit method hooks.
"""
from __future__ import annotations

import torch

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
    for hook in ("prefix_encoder", "soft_prompt"):
        module = getattr(model, hook, None)
        if module is not None:
            batch = module.extend(batch)
    kw = dict(batch)
    if isinstance(model, GPT):
        return model(kw.pop("input_ids", None), kw.pop("labels", None), **kw)
    return model(**kw)
