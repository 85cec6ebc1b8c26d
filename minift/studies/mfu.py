"""Model FLOPs utilization: FLOPs per token of a training step and the card's measured matmul rate.

Model FLOPs per token (the MFU numerator), with N the parameters used in matmuls:
  forward 2N + 4·L·T·d (attention scores and weighted sum, d the width of the query heads),
  backward 2N_in + 8·L_b·T·d for input gradients through the L_b layers backward runs in,
  plus 2N_w for weight gradients of the trainable weights.
Full fine-tuning gives the familiar 6N + 12·L·T·d; a frozen base (LoRA, prefix, ...) gives
4N + 12·L·T·d; frozen bottom layers that run without autograd cost forward only.
N counts every matmul as it is: on Llama the SwiGLU MLP's three matrices (gate, up, down:
3·d·d_ff), grouped-query attention's narrower k and v projections (2·d·n_kv·hs) and an untied
LM head; RoPE (a few elementwise products per query and key) and the norms are left out, as
GELU and LayerNorm are on GPT-2: under 1% of the total.
MFU divides achieved FLOP/s by the bf16 matmul rate measured on the same card in the same run
(``measure_matmul_tflops``).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from minift.models.gpt import GPT
from minift.models.llama import Llama


def matmul_params(model: nn.Module, lm_head: bool = True) -> tuple[int, int]:
    """(N, N_trainable): parameters of every matmul weight — the 2-D ``weight`` of any module
    that is not an embedding (nn.Linear, LoRALinear, SVDLinear, ...) — with the LM head when it
    is used (``lm_head``: feature extraction for probing never projects to the vocabulary): GPT's
    and a tied Llama's are their token embedding, added here; an untied Llama's ``lm_head`` is
    an nn.Linear, left out without ``lm_head``.
    Adapter factors (``lora_*``) are left out: their FLOPs are a rounding error at small r."""
    n = nt = 0
    untied = model.lm_head if isinstance(model, Llama) else None
    for m in model.modules():
        w = m._parameters.get("weight")
        if w is None or w.dim() != 2 or isinstance(m, nn.Embedding) or (m is untied and not lm_head):
            continue
        n += w.numel()
        nt += w.numel() if w.requires_grad else 0
    tied = model.wte if isinstance(model, GPT) else model.embed_tokens if isinstance(model, Llama) else None
    if lm_head and tied is not None and untied is None:
        n += tied.weight.numel()
        nt += tied.weight.numel() if tied.weight.requires_grad else 0
    return n, nt


def flops_per_token(n: int, n_trainable: int, n_layer: int, seq_len: int, d: int,
                    backward_layers: int | None = None, train: bool = True) -> float:
    """Model FLOPs per token; see the module docstring. ``backward_layers`` defaults to all."""
    lb = n_layer if backward_layers is None else backward_layers
    fwd = 2 * n + 4 * n_layer * seq_len * d
    if not train:
        return fwd
    n_in = n * lb / n_layer  # input gradients only through the layers backward reaches
    return fwd + 2 * n_in + 8 * lb * seq_len * d + 2 * n_trainable


def measure_matmul_tflops(device: str, size: int = 8192, reps: int = 10) -> float:
    """bf16 matmul rate of this card, measured now (the MFU denominator)."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * size ** 3 * reps / (start.elapsed_time(end) / 1e3) / 1e12
