"""Next-token cross-entropy straight from final hidden states, without full fp32 logits.

The naive loss builds (B*T, vocab) logits, upcasts them to fp32 and keeps them (or the
log-softmax) for backward: 1.6 GB for GPT-2 at 8 x 1024. Here the vocabulary projection
runs ``chunk`` positions at a time, and because d(loss)/d(logits) = softmax - one_hot is
known as soon as a chunk's logits are, each chunk's gradients are computed right away, in
the forward pass (the "fused linear cross-entropy" of Liger-Kernel and others):

    logits = x_c W^T            (chunk, V)     fp32 only for this chunk
    loss  += logsumexp(logits) - logits[target]
    dlogits = softmax(logits) - one_hot(target)
    dx_c    = dlogits W         (chunk, C)     kept for backward
    dW     += dlogits^T x_c     (V, C)         kept for backward (only when W is trained)

Backward then only scales the kept gradients by the incoming one. Compared with recomputing
each chunk's logits in backward (activation checkpointing), the vocabulary matmul runs twice
instead of three times for a frozen head, and nothing of the size of the logits survives the
forward pass. The gradient is computed only when autograd will want it; under ``no_grad``
(evaluation) the chunks only produce the loss.

``enable(model)`` switches it on: every ``gpt.LMLoss`` submodule (the plain reference, which
builds the full logits) is replaced by a ``FusedLMLoss``, which takes the same arguments
(final hidden states, head weight, targets) and gives the same loss and gradients (tested
in ``tests/fast/test_loss_cast.py``). The replacement holds no tensors, so the model's
state-dict keys do not change; ``disable(model)`` puts the reference back.

``grouped_lm_loss`` takes the loss of several groups of rows in the same single pass, each
group's mean over its own targets (``train_many``: one group per job): every position's
gradient is weighted by 1 / (its group's target count), so the sum of the groups' losses
backpropagates exactly as K separate calls would, with one set of kernels instead of K.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from minift.methods.common import host_to_device
from minift.models.gpt import LMLoss

# Positions per vocabulary projection. A chunk's logits take 6 bytes per position per vocabulary
# entry while it is processed (bf16 and fp32 logits, bf16 gradient): 1.2 GB at (4096, 50304).
# A frozen head takes small chunks (0.3 GB); a trained head adds each chunk's (V, C) gradient
# into an fp32 sum, a pass over V x C per chunk, so it takes fewer, larger ones.
CHUNK_FROZEN_HEAD = 1024
CHUNK_TRAINED_HEAD = 4096


def loss_chunk(head_trained: bool) -> int:
    """The default positions per vocabulary projection, for a trained or a frozen head."""
    return CHUNK_TRAINED_HEAD if head_trained else CHUNK_FROZEN_HEAD


def lm_loss(x, weight, targets, chunk: int | None = None):
    """Shifted next-token cross-entropy (mean over targets != -100).

    ``x`` (B, T, C) final hidden states, ``weight`` (V, C) the LM head, ``targets`` (B, T)
    aligned with the input ids (position t predicts ``targets[:, t + 1]``); ``chunk``
    positions per vocabulary projection (default: ``loss_chunk``).
    """
    chunk = _chunk(chunk, weight)
    x, t, valid = _positions(x, weight, targets)
    V = weight.shape[0]
    if x.shape[0] == 0:  # one position per sequence: nothing to predict (a static shape, no sync)
        return torch.zeros((), device=x.device, requires_grad=torch.is_grad_enabled() and (
            x.requires_grad or weight.requires_grad))  # a zero loss that backpropagates nothing
    grads = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if grads:
        total = LinearCrossEntropy.apply(x, weight, t, chunk, None)[0]
    else:
        w = _padded(weight, x.dtype)
        total = sum(_chunk_loss(F.linear(x[s:s + chunk], w), t[s:s + chunk], V)[0]
                    for s in range(0, x.shape[0], chunk))
    # mean over the targets; with none (all -100) the sum is 0 and so is the loss, without
    # reading the count back to the host (a sync would stall the CPU until the GPU catches up)
    return total / valid.sum().clamp_min(1)


def grouped_lm_loss(x, weight, targets, sizes: list[int], chunk: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``lm_loss`` of each group of rows, in one pass over the vocabulary: rows 0 .. sizes[0]-1
    are group 0, and so on (``train_many``: one group per job).

    Returns:
        (the sum of the groups' losses, differentiable: its gradients equal those of summing K
        ``lm_loss`` calls; each group's loss (K,) in fp32 (fp64 for fp64 inputs), without
        gradient). Needs gradients on ``x`` or ``weight`` (a training step).
    """
    chunk = _chunk(chunk, weight)
    if not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        raise ValueError("grouped_lm_loss is for a training step: x or weight must require grad")
    if sum(sizes) != x.shape[0]:
        raise ValueError(f"the groups' sizes {sizes} do not add up to the {x.shape[0]} rows")
    B, T1 = x.shape[0], x.shape[1] - 1  # positions that predict a next token, per row
    x, t, valid = _positions(x, weight, targets)  # (B*T1, C), (B*T1,), (B*T1,)
    group = host_to_device(torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)),
                           x.device)  # (B,) each row's group
    acc = torch.promote_types(x.dtype, torch.float32)
    counts = torch.zeros(len(sizes), dtype=acc, device=x.device).index_add_(
        0, group, valid.view(B, T1).sum(1).to(acc))
    inv = 1.0 / counts.clamp_min(1)  # a group with no target: loss 0, no gradient, no host read
    pw = (valid.view(B, T1) * inv[group][:, None]).reshape(-1)  # (B*T1,)
    total, ce = LinearCrossEntropy.apply(x, weight, t, chunk, pw)
    per_group = torch.zeros(len(sizes), dtype=acc, device=x.device).index_add_(0, group, ce.view(B, T1).sum(1))
    return total, per_group * inv


def _positions(x, weight, targets):
    """(x, t, valid): the hidden states of the positions that predict a next token, (B*(T-1), C) in
    the matmul dtype, their targets (B*(T-1),) (checked against the vocabulary) and which count."""
    if x.is_cuda and torch.is_autocast_enabled("cuda"):
        x = x.to(torch.get_autocast_dtype("cuda"))  # the matmul dtype
    x = x[:, :-1, :].reshape(-1, x.shape[-1])  # position t predicts targets[:, t + 1]
    t = targets[:, 1:].reshape(-1)
    valid = t != -100
    _check_targets(t, valid, weight.shape[0])
    return x, t, valid


def _chunk(chunk: int | None, weight) -> int:
    """The positions per vocabulary projection: ``chunk``, or ``loss_chunk``'s default when None."""
    if chunk is None:
        return loss_chunk(weight.requires_grad)
    if chunk < 1:
        raise ValueError(f"loss chunk must be >= 1 position, got {chunk}")
    return chunk


def _check_targets(t, valid, V):
    """Target ids must be -100 or in [0, V). On the CPU a clear ValueError; on a GPU (and under
    torch.compile, where reading a value back would split the graph) an asynchronous assert (what
    F.cross_entropy does on a GPU), because a check read back to the host every step would make the
    CPU wait for the GPU mid-step."""
    out = valid & ((t < 0) | (t >= V))
    if t.device.type == "cpu" and not torch.compiler.is_compiling():
        bad = int(out.sum())
        if bad:
            raise ValueError(f"{bad} target ids are outside the vocabulary: allowed are 0..{V - 1}, "
                             f"or -100 for positions to ignore")
    else:
        torch._assert_async(~out.any(), f"target ids outside the vocabulary: allowed are 0..{V - 1}, or -100")


def _padded(weight, dtype):
    """The head in the matmul dtype, its rows padded to a multiple of 64: a vocabulary of
    50257 rows makes cuBLAS pick a slow kernel. The extra logits are masked out."""
    V = weight.shape[0]
    w = weight.to(dtype)
    return F.pad(w, (0, 0, 0, -V % 64)) if V % 64 else w


def _chunk_loss(logits, t, V):
    """(summed loss, fp32 logits shifted by their logsumexp, the valid rows, each row's loss) of
    one chunk; padded columns (index >= V) are excluded; rows with target -100 contribute 0."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # (c, V'), at least fp32
    if logits.shape[1] > V:
        logits[:, V:] = float("-inf")
    lse = torch.logsumexp(logits, dim=1, keepdim=True)  # (c, 1)
    logp = logits.sub_(lse)  # log-softmax, in place
    valid = t != -100
    rows = -logp.gather(1, t.clamp_min(0)[:, None]).squeeze(1) * valid  # (c,)
    return rows.sum(), logp, valid, rows


class LinearCrossEntropy(torch.autograd.Function):
    """(sum over rows of CE(x W^T, t), with both gradients computed in forward (see module doc);
    per-row CE). With per-row weights ``pw`` (zero on ignored rows) the sum is weighted, sum_i
    pw_i CE_i, and the per-row CE (fp32, or fp64 for fp64 inputs; no gradient) is the second
    output; without, that output is empty. ``pw`` scales each row's gradient before it is cast to
    the matmul dtype: fine for bf16, whose range is fp32's (fp16 could lose tiny values)."""

    @staticmethod
    def forward(ctx, x, weight, t, chunk, pw):
        V = weight.shape[0]
        w = _padded(weight, x.dtype)  # (V', C)
        need_x, need_w = x.requires_grad, weight.requires_grad
        gx = torch.empty_like(x) if need_x else None
        acc = torch.promote_types(x.dtype, torch.float32)  # accumulate in fp32 (or fp64 for fp64 inputs)
        gw = torch.zeros(w.shape, dtype=acc, device=w.device) if need_w else None
        total = torch.zeros((), dtype=acc, device=x.device)
        ce = torch.empty(x.shape[0] if pw is not None else 0, dtype=acc, device=x.device)
        for s in range(0, x.shape[0], chunk):
            xs, ts = x[s:s + chunk], t[s:s + chunk]
            loss, logp, valid, rows = _chunk_loss(F.linear(xs, w), ts, V)
            if pw is None:
                total = total + loss
                scale = valid[:, None]  # ignored rows get no gradient
            else:
                ce[s:s + chunk] = rows
                total = total + (rows * pw[s:s + chunk]).sum()
                scale = pw[s:s + chunk, None]  # zero on ignored rows
            dlogits = logp.exp_()  # softmax; padded columns are exp(-inf) = 0
            dlogits.scatter_add_(1, ts.clamp_min(0)[:, None], -valid[:, None].to(dlogits.dtype))
            dlogits.mul_(scale)
            dlogits = dlogits.to(x.dtype)
            if need_x:
                gx[s:s + chunk] = dlogits @ w
            if need_w:
                gw += dlogits.t() @ xs  # the bf16 product added into fp32
            del loss, logp, rows, dlogits  # free this chunk's logits before the next chunk's are built
        ctx.save_for_backward(gx, None if gw is None else gw[:V])
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(ce)
        return total, ce

    @staticmethod
    def backward(ctx, grad, _):
        if torch.is_grad_enabled():  # create_graph=True: the kept gradients carry no graph
            raise RuntimeError("double backward (create_graph=True) through the fused LM loss is not supported")
        gx, gw = ctx.saved_tensors
        return (None if gx is None else gx * grad.to(gx.dtype),
                None if gw is None else (gw * grad).to(ctx.weight_dtype), None, None, None)


# ---------------------------------------------------------------------------- switching it on

class FusedLMLoss(nn.Module):
    """``gpt.LMLoss`` computed by ``lm_loss``: same arguments, same value and gradients.

    ``chunk``: positions per vocabulary projection (None: ``loss_chunk``'s default for a
    trained or a frozen head); it may be changed at any time (``model.lm_loss.chunk = 4096``).
    """

    def __init__(self, chunk: int | None = None):
        super().__init__()
        if chunk is not None and chunk < 1:
            raise ValueError(f"loss chunk must be >= 1 position, got {chunk}")
        self.chunk = chunk

    def forward(self, x, weight, targets):
        return lm_loss(x, weight, targets, self.chunk)

    def grouped(self, x, weight, targets, sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``grouped_lm_loss`` with this module's chunk."""
        return grouped_lm_loss(x, weight, targets, sizes, self.chunk)

    def extra_repr(self) -> str:
        return f"chunk={self.chunk}"


def enable(model: nn.Module, chunk: int | None = None) -> list[str]:
    """Replace every ``gpt.LMLoss`` in ``model`` by a ``FusedLMLoss(chunk)``.

    Args:
        model: any module; the ones without a GPT loss (BERT) are left as they are.
        chunk: positions per vocabulary projection (None: ``loss_chunk``'s default).
    Returns:
        The names of the replaced submodules (``["lm_loss"]`` for a GPT; ``[]`` when there
        is nothing to replace, e.g. when the fused loss is already on: then it is left as it
        is, and ``model.lm_loss.chunk`` changes its chunk).
    Raises:
        ValueError: ``chunk`` < 1.
    """
    FusedLMLoss(chunk)  # checks chunk, also for a model without a GPT loss
    return _swap(model, LMLoss, lambda: FusedLMLoss(chunk))


def disable(model: nn.Module) -> list[str]:
    """Put the plain ``gpt.LMLoss`` back wherever ``enable`` put a ``FusedLMLoss``; returns the names."""
    return _swap(model, FusedLMLoss, LMLoss)


def _swap(model: nn.Module, old: type, new) -> list[str]:
    names = [name for name, m in model.named_modules() if name and type(m) is old]
    for name in names:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, new())
    return names
