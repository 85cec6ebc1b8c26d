"""Optional Triton kernels for CUDA; every caller has a plain PyTorch path for when Triton or a GPU
is missing (``available`` says which path runs).

``lora_merged_weight``: W = W0 + s B A for LoRA's merged forward (``fast.lora.MergedLoRA``), rebuilt
twice per layer and step. cuBLAS runs ``torch.addmm(W0, B, A)`` as two kernels: a copy of W0 into
the output, then a rank-r GEMM that reads the output back and adds the product (its K = r is far
too small to keep the tensor cores busy). The kernel here is one pass: each (BLOCK_M x BLOCK_N)
tile of W0 is read once, the r outer products are added in fp32 registers, and the exact fp32 sum
W0 + s B A is rounded once to the output dtype (tests/fast/test_kernels.py checks it against that fp32
reference; cuBLAS's bf16 addmm is itself one ulp off it in a few entries in a thousand).
"""
from __future__ import annotations

import torch

try:  # Triton ships with CUDA builds of PyTorch; CPU builds have none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

MAX_RANK = 64  # the kernel unrolls its loop over the rank; larger ranks take addmm


def available(t: torch.Tensor) -> bool:
    return triton is not None and t.is_cuda


if triton is not None:
    @triton.jit
    def _merged_weight_kernel(w_ptr, a_ptr, b_ptr, out_ptr, M, N, scaling,
                              R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # out[m, n] = w[m, n] + scaling * sum_k b[m, k] a[k, n]; w, out (M, N), a (R, N), b (M, R),
        # all contiguous
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mm, mn = rm < M, rn < N
        offs = rm[:, None] * N + rn[None, :]
        mask = mm[:, None] & mn[None, :]
        acc = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # the big read, issued first
        upd = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in tl.static_range(R):
            b = tl.load(b_ptr + rm * R + k, mask=mm, other=0.0).to(tl.float32)
            a = tl.load(a_ptr + k * N + rn, mask=mn, other=0.0).to(tl.float32)
            upd += b[:, None] * a[None, :]
        tl.store(out_ptr + offs, (acc + scaling * upd).to(out_ptr.dtype.element_ty), mask=mask)


# tile (rows, columns) and warps per program, chosen by ``benchmarks/lora_gemm_shapes.py --sweep``
# over GPT-2 medium's three shapes (docs/benchmarks.md has the sweep)
TILE = (64, 64, 4)


def lora_merged_weight(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float,
                       tile: tuple[int, int, int] | None = None) -> torch.Tensor:
    """W0 + scaling * B @ A in A's dtype: the Triton kernel on CUDA for ranks up to ``MAX_RANK``
    (fp32 sum, rounded once), else ``torch.addmm`` (with W0 first cast to A's dtype)."""
    r = A.shape[0]
    if not available(weight) or r > MAX_RANK:
        return torch.addmm(weight.to(A.dtype), B, A, alpha=scaling)
    w, A, B = weight.contiguous(), A.contiguous(), B.to(A.dtype).contiguous()
    M, N = w.shape
    out = torch.empty((M, N), dtype=A.dtype, device=w.device)
    bm, bn, warps = tile or TILE
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
    _merged_weight_kernel[grid](w, A, B, out, M, N, float(scaling), R=r, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps)
    return out
