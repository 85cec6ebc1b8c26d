"""Optional Triton kernels for CUDA; every caller has a plain PyTorch path for when Triton or a GPU
is missing (``available`` says which path runs).

``lora_merged_weight``: W = W0 + s B A for LoRA's merged forward (``fast.lora.MergedLoRA``), rebuilt
twice per layer and step. cuBLAS runs ``torch.addmm(W0, B, A)`` as two kernels: a copy of W0 into
the output, then a rank-r GEMM that reads the output back and adds the product (its K = r is far
too small to keep the tensor cores busy). The kernel here is one pass: each (BLOCK_M x BLOCK_N)
tile of W0 is read once, the r outer products are added in fp32 registers, and the exact fp32 sum
W0 + s B A is rounded once to the output dtype (tests/fast/test_kernels.py checks it against that fp32
reference; cuBLAS's bf16 addmm is itself one ulp off it in a few entries in a thousand).

``lora_factor_grads``: in LoRA's backward, both products that read the output gradient g (N x out):
g B (N x r, for A's gradient) and g^T (A x) (out x r, B's gradient). cuBLAS runs them as two thin
GEMMs, each reading all of g; the kernel reads each tile of g once and feeds both. Each program
takes BLOCK_N rows and a range of g's columns: its part of g B is summed over the column ranges,
and its part of g^T (A x) over the row blocks, afterwards in a fixed order (no atomics: the result
is the same on every run). For bf16 and fp16 and ranks up to ``MAX_FACTOR_RANK``; off by default
(docs/benchmarks.md: no faster than the two GEMMs in a compiled step): ``fast.lora.enable(model,
factor_kernel=True)`` (bench's ``--lora-factor-kernel``) turns it on.
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


    @triton.jit
    def _factor_grads_kernel(g_ptr, b_ptr, ax_ptr, gb_ptr, db_ptr, N, O, stride_g, O_PER: tl.constexpr,
                             R: tl.constexpr, RP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr):
        # program (i, j): rows i*BLOCK_N.., columns j*O_PER..(j+1)*O_PER of g (N, O; row stride
        # stride_g); b (O, R), ax (N, R) contiguous; writes gb[j, rows] = g[rows, cols] @ b[cols]
        # (gb: (S, N, R) fp32) and db[i, cols] = g[rows, cols]^T @ ax[rows] (db: (N blocks, O, R) fp32)
        i, j = tl.program_id(0), tl.program_id(1)
        rows = i * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, RP)  # the rank, padded to tl.dot's smallest size
        mr, mk = rows < N, ks < R
        ax = tl.load(ax_ptr + rows[:, None] * R + ks[None, :], mask=mr[:, None] & mk[None, :], other=0.0)
        gb = tl.zeros((BLOCK_N, RP), dtype=tl.float32)
        for t in range(0, O_PER, BLOCK_O):  # O_PER is a multiple of BLOCK_O: no column twice
            cols = j * O_PER + t + tl.arange(0, BLOCK_O)
            mc = cols < O
            g = tl.load(g_ptr + rows[:, None] * stride_g + cols[None, :], mask=mr[:, None] & mc[None, :], other=0.0)
            b = tl.load(b_ptr + cols[:, None] * R + ks[None, :], mask=mc[:, None] & mk[None, :], other=0.0)
            gb += tl.dot(g, b)  # (BLOCK_N, RP)
            db = tl.dot(tl.trans(g), ax)  # (BLOCK_O, RP)
            tl.store(db_ptr + (i * O + cols[:, None]) * R + ks[None, :], db, mask=mc[:, None] & mk[None, :])
        tl.store(gb_ptr + (j * N + rows[:, None]) * R + ks[None, :], gb, mask=mr[:, None] & mk[None, :])


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


# rows and columns of g per step of a program, warps per program (not yet swept on a GPU)
FACTOR_TILE = (128, 64, 4)
# The partial sums of g^T ax take (N / 128) x out x r fp32 values, written and read back: about
# 4r/128 of one read of g. Above this rank they may cost more than the read saved (not measured).
MAX_FACTOR_RANK = 16


def lora_factor_grads(g: torch.Tensor, B: torch.Tensor, ax: torch.Tensor, programs: int | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(g B in g's dtype, g^T ax in fp32, or fp64 for fp64 g) for g (N, out), B (out, r), ax (N, r)
    of one dtype: the Triton kernel on CUDA for bf16 and fp16 (one read of g; fp32 sums) with ranks
    up to ``MAX_FACTOR_RANK`` and offsets that fit in int32, else two matmuls (fp32 g among them:
    the kernel's dots would run in TF32).

    ``programs``: how many programs to aim for (default: twice the GPU's multiprocessors); the
    kernel splits g's columns into as many ranges as that takes."""
    N, O = g.shape
    r = B.shape[1]
    supported = g.dtype in (torch.bfloat16, torch.float16) and N * O > 0 and 0 < r <= MAX_FACTOR_RANK
    row_blocks = -(-N // FACTOR_TILE[0])
    fits = N * max(g.stride(0), O) < 2 ** 31 and row_blocks * O * r < 2 ** 31  # the kernel's offsets are int32
    if not (available(g) and supported and fits):
        return g @ B, (g.t() @ ax).to(torch.promote_types(g.dtype, torch.float32))
    return _factor_grads(g, B, ax, programs)


def _factor_grads(g, B, ax, programs=None):
    """The kernel's launch (any device Triton runs on: the tests run it in Triton's interpreter).
    ``O_PER`` is a compile-time constant (the interpreter needs the loop's bound so): each distinct
    value compiles once, a handful per layer shape as N varies."""
    N, O = g.shape
    r = B.shape[1]
    g = g if g.stride(1) == 1 else g.contiguous()
    B, ax = B.to(g.dtype).contiguous(), ax.to(g.dtype).contiguous()
    bn, bo, warps = FACTOR_TILE
    if programs is None:
        programs = 2 * torch.cuda.get_device_properties(g.device).multi_processor_count
    row_blocks = triton.cdiv(N, bn)
    splits = max(1, min(triton.cdiv(O, bo), triton.cdiv(programs, row_blocks)))
    o_per = triton.cdiv(triton.cdiv(O, splits), bo) * bo  # columns per program, whole BLOCK_Os
    splits = triton.cdiv(O, o_per)
    gb = torch.empty((splits, N, r), dtype=torch.float32, device=g.device)
    db = torch.empty((row_blocks, O, r), dtype=torch.float32, device=g.device)
    _factor_grads_kernel[(row_blocks, splits)](g, B, ax, gb, db, N, O, g.stride(0), O_PER=o_per, R=r,
                                               RP=max(16, triton.next_power_of_2(r)), BLOCK_N=bn, BLOCK_O=bo,
                                               num_warps=warps)
    return gb.sum(0).to(g.dtype), db.sum(0)
