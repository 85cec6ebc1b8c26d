"""Everything in minift that exists only for speed. The pieces that change a model are switched on
by one explicit call, ``enable``, except the frozen base in bf16 (``frozen.enable``: a model so cast
runs under autocast only, and ``minift train`` chooses it per run); clipping and the AdamW step are
the training loop's choice (``adamw.chosen``, with ``TrainConfig.fast``).

The reference code (models, methods, adapters) never imports this package. Each model piece changes
reference modules in place (a forward pre-hook, a swapped submodule, a swapped layer class, the
dtype of frozen weights) and computes what they compute, outputs and gradients, up to floating-point
rounding (each module says where it rounds differently); its equivalence test checks that:

    piece         module        what it does                                      equivalence test
    cast once     fast.cast     under autocast, casts each attention/MLP input     tests/fast/test_loss_cast.py
                                once instead of once per matmul
    fused loss    fast.loss     GPT's cross-entropy chunk by chunk from the        tests/fast/test_loss_cast.py
                                hidden states, without full fp32 logits
    LoRA forward  fast.lora     plain LoRA layers through W0 + sBA in one GEMM     tests/fast/test_lora.py
                                (merged) or with the update inside one addmm
    q, k, v       fast.qkv      merged q/k/v LoRA layers of one attention module   tests/fast/test_qkv.py
                                as one node: their A's stacked, one GEMM for
                                the A x and one for the dA of all of them
    MLP act       fast.mlp      the MLP's activation inside down_proj's merged     tests/fast/test_mlp.py
                                LoRA, recomputed in its backward, not kept
                                (``lora_recompute_act``; minift train's plan
                                sets it for compiled runs)
    many LoRAs    fast.multi_lora  a mixed batch of many adapters in a fixed number   tests/fast/test_multi_lora.py
                                of kernels: each row's factors gathered, two bmm
    frozen base   fast.frozen   frozen parameters stored in bf16 (what autocast   tests/fast/test_frozen.py
                                casts the linear ones to every step; embeddings
                                and norms rounded too: a bf16 residual stream);
                                ``minift train``'s choice (``training.speed``)
    Triton        fast.kernels  the rebuild of W0 + sBA in one pass (CUDA), used   tests/fast/test_kernels.py
                                by the merged LoRA forward; the backward's g B
                                and g^T (A x) in one pass (opt-in)
    clipping      fast.clip     the global-norm gradient clipping in a fixed few   tests/fast/test_clip.py
                                kernels (one device and dtype)
    AdamW step    fast.adamw    fused AdamW's kernel called over lists gathered    tests/fast/test_adamw.py
                                once, the clipping folded into it; with fast.clip,
                                the training loop's, train_many's and bench's on
                                CUDA with ``TrainConfig.fast`` (``adamw.chosen``)

Each model piece's module also has its own ``enable``/``disable`` for switching one piece alone.
"""
from __future__ import annotations

import torch.nn as nn

from minift.fast import cast, lora, loss, mlp, multi_lora, qkv


def enable(model: nn.Module, *, merged_lora: bool = True, loss_chunk: int | None = None,
           lora_factor_kernel: bool = False, lora_recompute_act: bool = False) -> list[str]:
    """Switch on every speed piece that applies to ``model`` (see the table above).

    Args:
        model: a GPT, Bert or BertClassifier, with or without a method applied.
        merged_lora: plain LoRA layers take the merged forward (one GEMM through W0 + sBA; a layer
            with dropout takes it in evaluation only), and the merged ones among an attention module's
            q, k and v run as one node (``fast.qkv``); False: the addmm forward. DoRA layers keep
            the reference forward either way.
        loss_chunk: positions per vocabulary projection in the fused loss (None: its default).
        lora_factor_kernel: merged LoRA layers take A's and B's gradients through
            ``kernels.lora_factor_grads`` (off by default: docs/benchmarks.md has why).
        lora_recompute_act: every MLP keeps its activation's input and not its output where down_proj
            takes the merged forward (``fast.mlp``; ``minift train``'s plan turns it on for compiled
            runs: ``training.speed``).
    Returns:
        One line per piece switched on, e.g. ``"cast once: 4 modules"``; pieces that do not apply
        (no LoRA layers, no GPT loss) or are already on are left out.
    Raises:
        ValueError: ``loss_chunk`` < 1; ``lora_recompute_act`` without ``merged_lora`` (it is a backward
            of the merged forward) or with ``lora_factor_kernel`` (its down_proj has no factor kernel).
    """
    if lora_recompute_act and (not merged_lora or lora_factor_kernel):
        raise ValueError("lora_recompute_act runs down_proj's merged forward, without the factor kernel: "
                         "it needs merged_lora=True and lora_factor_kernel=False")
    on = [("cast once", cast.enable(model), "modules"),
          ("fused loss", loss.enable(model, loss_chunk), "modules"),
          (f"LoRA {'merged' if merged_lora else 'addmm'} forward",
           lora.enable(model, merged=merged_lora, factor_kernel=lora_factor_kernel), "layers"),
          ("q, k, v LoRA stacked", qkv.enable(model) if merged_lora else [], "attention modules"),
          ("gathered mixed-batch LoRA", multi_lora.enable(model), "layers")]
    if lora_recompute_act:
        on.append(("MLP activation recomputed", mlp.enable(model), "MLPs"))
    return [f"{piece}: {len(names)} {what}" for piece, names, what in on if names]


def disable(model: nn.Module) -> list[str]:
    """Put every piece back on the reference path; returns the names of the modules switched back."""
    return cast.disable(model) + loss.disable(model) + qkv.disable(model) + lora.disable(model) + \
        mlp.disable(model) + multi_lora.disable(model)
