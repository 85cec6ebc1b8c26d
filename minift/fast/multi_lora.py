"""Mixed batches of many LoRA adapters in a fixed number of kernels: factors gathered per row, or
taken block by block when each adapter's rows come together.

The reference (``methods/multi_lora.py``) segments a mixed batch by adapter: for each of the K
adapters it selects its rows, runs s_k B_k A_k on them and adds the result back, about five
kernels per adapter and layer, so an eager step issues K times more LoRA kernels than one
adapter's. Here every row fetches its own adapter's factors and one batched GEMM serves all:

    A = stack_k A_k             (K, r, in)      ranks padded with zeros to the largest r
    B = stack_k s_k B_k         (K, out, r)     (the scaling folded in, one small multiply)
    u   = bmm(x, A[ids]^T)      (N, T, r)       ids: each row's adapter slot
    h  += bmm(u, B[ids]^T)      (N, T, out)

The zero padding is exact: a padded row of A makes a zero column of u, which meets a padded
(zero) column of B. The kernel count no longer grows with K; the FLOPs are those of the
reference (each row meets only its own adapter). Gathering copies each row's factors
(N r (in + out) numbers a layer: at 32 rows, r = 8 and GPT-2 medium's widest layer, 1.3M).

When the batch is K equal blocks of rows, one block per adapter in order (``mixed_batch`` sees
that layout on the host; ``train_many`` builds it: each job's rows together), no row needs its
own copy of the factors: x viewed as (K, n T, in) meets the stacked factors directly,

    h  += bmm(bmm(x_blocks, A^T), B^T)      (K, n T, out)

with no gather in the forward and no scatter-add of per-row factor gradients in the backward, as
one autograd node (``BlockLoRA``) that adds the adapters' terms to the base's output and input
gradient in place.

A layer takes one of these paths for a mixed batch in which every row has an adapter that
targets the layer and no adapter applies dropout (in training); otherwise the reference forward
runs.
``tests/fast/test_multi_lora.py`` ties it to the reference, outputs and gradients.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from minift.methods.multi_lora import MultiLoRALinear, multi_lora_modules


def blocks(names: list[str | None]) -> tuple[str, ...] | None:
    """The adapters in order when ``names`` (each row's adapter) is K runs of equal length, one run
    per adapter (the layout ``train_many`` builds: each job's rows together), else None."""
    runs = [(n, len(list(g))) for n, g in itertools.groupby(names)]
    order = tuple(n for n, _ in runs)
    if None in order or len(set(order)) != len(order) or len({k for _, k in runs}) != 1:
        return None
    return order


class BlockLoRA(torch.autograd.Function):
    """The block path as one autograd node that adds the adapters' terms in place:

        forward   h = x W^T + b;  u = bmm(x_blocks, A^T);  h_blocks += bmm(u, B^T)
        backward  g = bmm(dy_blocks, B);  dx = dy W;  dx_blocks += bmm(g, A)
                  dA = bmm(g^T, x_blocks);  dB = bmm(dy_blocks^T, u)

    (B with the scalings folded in.) Written as plain ops, ``h + bmm(...)`` holds a second
    output-sized tensor and the sum, and the input gradient is the sum of two input-sized ones;
    here each is one tensor, which lowers a ``train_many`` step's peak by a few input-sized tensors
    (the memory budget ``benchmarks/many_adapters.py`` measures: one job of all the rows, plus the
    adapters' own state). It saves what the plain ops would: x in the matmul dtype, u and the
    factors. Under autocast every matmul runs in autocast's dtype, as it would there."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B):
        kind = x.device.type
        # autocast's matmul dtype, except for fp64 inputs (autocast leaves those alone too)
        autocast = kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind) and x.dtype != torch.float64
        dt = torch.get_autocast_dtype(kind) if autocast else x.dtype
        xc = x.to(dt)
        h = F.linear(xc, weight.to(dt), None if bias is None else bias.to(dt))
        xk = xc.reshape(A.shape[0], -1, xc.shape[-1])                            # (K, n T, in)
        u = torch.bmm(xk, A.to(dt).transpose(1, 2))                             # (K, n T, r)
        h.view(A.shape[0], -1, h.shape[-1]).baddbmm_(u, B.to(dt).transpose(1, 2))
        ctx.save_for_backward(xc, weight, u, A, B)
        ctx.has_bias = bias is not None
        return h

    @staticmethod
    @once_differentiable  # (u was formed without a graph: no second-order gradient through it)
    def backward(ctx, dy):
        xc, weight, u, A, B = ctx.saved_tensors
        K, dt = A.shape[0], xc.dtype
        dy = dy.to(dt)
        dyk = dy.reshape(K, -1, dy.shape[-1])                                   # (K, n T, out)
        need = ctx.needs_input_grad
        g = torch.bmm(dyk, B.to(dt)) if need[0] or need[3] else None            # (K, n T, r)
        dx = dw = db = dA = dB = None
        if need[0]:
            dx = dy @ weight.to(dt)
            dx.view(K, -1, dx.shape[-1]).baddbmm_(g, A.to(dt))
        if need[1]:
            dw = dy.reshape(-1, dy.shape[-1]).t() @ xc.reshape(-1, xc.shape[-1])
        if ctx.has_bias and need[2]:
            db = dy.reshape(-1, dy.shape[-1]).sum(0)
        if need[3]:
            dA = torch.bmm(g.transpose(1, 2), xc.reshape(K, -1, xc.shape[-1]))  # (K, r, in)
        if need[4]:
            dB = torch.bmm(dyk.transpose(1, 2), u)                               # (K, out, r)
        return dx, dw, db, dA, dB


class GatheredMultiLoRALinear(MultiLoRALinear):
    """``MultiLoRALinear`` whose mixed-batch forward takes the factors block by block when the rows
    come in equal blocks, one per adapter, and gathers each row's otherwise (see above)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixed = self.rows is not None and self.merged is None
        blocks = self._blocks(x.shape[0]) if mixed else None
        if blocks is not None:  # row block k is adapter k's: two batched GEMMs over the blocks, no gather
            A, B = self._stacked(blocks)
            return BlockLoRA.apply(x, self.weight, self.bias, A, B * self._scales(blocks, B))
        slots = self._slots(x.shape[0]) if mixed else None
        if slots is None:
            return super().forward(x)
        names, ids = slots
        h = F.linear(x, self.weight, self.bias)  # the shared base, once for every row
        A, B = self._stacked(names)
        B = B * self._scales(names, B)
        x3 = x.reshape(x.shape[0], -1, self.in_features)                          # (N, T, in)
        u = torch.bmm(x3, A[ids].transpose(1, 2))                                 # (N, T, r)
        return h + torch.bmm(u, B[ids].transpose(1, 2)).view(h.shape)             # (N, T, out)

    def _blocks(self, n_rows: int) -> tuple[str, ...] | None:
        """The mixed batch's adapters in order when its ``n_rows`` rows are equal blocks, one per
        adapter (``blocks``) and every one targeting this layer, and no adapter applies dropout (in
        training); else None."""
        names = self.row_names
        if names is None or len(names) != n_rows:  # a batch of another size: the other paths say so
            return None
        cached = getattr(self, "_block_cache", None)  # (the names list itself, its blocks): one per mixed batch
        if cached is None or cached[0] is not names:
            self._block_cache = cached = (names, blocks(names))
        blocks_ = cached[1]
        if blocks_ is None or any(n not in self.lora_A for n in blocks_):
            return None
        if self.training and any(not isinstance(self.dropout[n], nn.Identity) for n in blocks_):
            return None
        return blocks_

    def _stacked(self, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapters' A (K, r, in) and B (K, out, r), ranks zero-padded to the largest (no padding,
        one stack each, when every rank is the same)."""
        ranks = [self.lora_A[n].shape[0] for n in names]
        if len(set(ranks)) == 1:
            return torch.stack([self.lora_A[n] for n in names]), torch.stack([self.lora_B[n] for n in names])
        r = max(ranks)
        return (torch.stack([F.pad(self.lora_A[n], (0, 0, 0, r - k)) for n, k in zip(names, ranks)]),
                torch.stack([F.pad(self.lora_B[n], (0, r - k)) for n, k in zip(names, ranks)]))

    def _slots(self, n_rows: int):
        """(adapter names in slot order, each row's slot as a device tensor), or None when the
        reference forward must run (a row without an adapter here, or dropout while training)."""
        key = (tuple(self.lora_A.keys()), self.training, n_rows)
        cached = getattr(self, "_slot_cache", None)  # (the rows dict itself, key, slots): one per mixed batch
        if cached is not None and cached[0] is self.rows and cached[1] == key:
            return cached[2]
        names = [n for n in self.rows if n in self.lora_A]
        covered = sum(self.rows[n].numel() for n in names)
        dropout = self.training and any(not isinstance(self.dropout[n], nn.Identity) for n in names)
        slots = None
        if names and covered == n_rows and not dropout:
            ids = torch.empty(n_rows, dtype=torch.long, device=self.weight.device)
            for k, n in enumerate(names):
                ids[self.rows[n]] = k
            slots = (names, ids)
        self._slot_cache = (self.rows, key, slots)
        return slots

    def _scales(self, names: list[str], like: torch.Tensor) -> torch.Tensor:
        """The adapters' scalings as a (K, 1, 1) tensor on the device, built once per set of values."""
        values = tuple(self.scaling[n] for n in names)
        cached = getattr(self, "_scale_cache", None)
        if cached is None or cached[0] != values or cached[1].device != like.device or cached[1].dtype != like.dtype:
            self._scale_cache = (values, torch.tensor(values, dtype=like.dtype, device=like.device).view(-1, 1, 1))
        return self._scale_cache[1]


def enable(model: nn.Module) -> list[str]:
    """Put every ``MultiLoRALinear`` of ``model`` on the gathered mixed-batch forward; returns the
    names of the layers switched."""
    names = []
    for name, m in multi_lora_modules(model):
        if type(m) is MultiLoRALinear:
            m.__class__ = GatheredMultiLoRALinear
            names.append(name)
    return names


def disable(model: nn.Module) -> list[str]:
    """Put the layers ``enable`` switched back on the reference forward; returns their names."""
    names = []
    for name, m in multi_lora_modules(model):
        if type(m) is GatheredMultiLoRALinear:
            m.__class__ = MultiLoRALinear
            for attr in ("_slot_cache", "_scale_cache", "_block_cache"):
                m.__dict__.pop(attr, None)
            names.append(name)
    return names
