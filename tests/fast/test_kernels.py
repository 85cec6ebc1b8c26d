"""minift.fast.kernels: the Triton rebuild of W0 + sBA against addmm and the factor kernel against
two matmuls (on CUDA; run on the GPU machine with ``python -m pytest tests/fast/test_kernels.py``;
the factor kernel also in Triton's interpreter on the CPU where Triton is installed), and the
fallbacks everywhere else."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from minift.fast import kernels

cuda = pytest.mark.skipif(not (torch.cuda.is_available() and kernels.triton is not None),
                          reason="the Triton kernel needs CUDA and Triton (checked on the GPU machine)")


def _operands(out, inp, r, device, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    W = torch.randn(out, inp, generator=g).to(device, dtype)
    A = (torch.randn(r, inp, generator=g) / inp ** 0.5).to(device, dtype)
    B = torch.randn(out, r, generator=g).to(device, dtype)
    return W, A, B


def test_fallback_is_addmm_exactly():
    W, A, B = _operands(24, 40, 4, "cpu")
    assert not kernels.available(W)
    torch.testing.assert_close(kernels.lora_merged_weight(W, A, B, 2.0), torch.addmm(W, B, A, alpha=2.0),
                               rtol=0, atol=0)


@cuda
@pytest.mark.parametrize("shape", [(1024, 1024, 8), (4096, 1024, 8), (1024, 4096, 16), (1000, 333, 3),
                                   (77, 4100, 64)])
def test_triton_rebuild_matches_fp32_reference(shape):
    """Edges that do not fill a tile, ranks 3..64: the fp32 sum rounded once to bf16 equals the fp32
    reference rounded to bf16, up to one bf16 ulp where fp32 summation order tips a tie. (cuBLAS's
    bf16 addmm is not the reference here: on an H200 it was one ulp off in 0.3-0.5% of the entries,
    some where the exact value is not zero and addmm gave 0.)"""
    out, inp, r = shape
    W, A, B = _operands(out, inp, r, "cuda")
    got = kernels.lora_merged_weight(W, A, B, 0.5)
    ref = W.float() + 0.5 * (B.float() @ A.float())
    assert got.dtype == torch.bfloat16 and got.shape == (out, inp)
    torch.testing.assert_close(got.float(), ref.to(torch.bfloat16).float(), rtol=2 ** -7, atol=1e-6)


@cuda
def test_triton_rebuild_fp32_and_large_rank_fallback():
    W, A, B = _operands(64, 96, 5, "cuda", dtype=torch.float32)
    torch.testing.assert_close(kernels.lora_merged_weight(W, A, B, 1.5), W + 1.5 * B @ A, rtol=1e-5, atol=1e-5)
    W, A, B = _operands(128, 128, kernels.MAX_RANK + 1, "cuda")
    torch.testing.assert_close(kernels.lora_merged_weight(W, A, B, 1.0), torch.addmm(W, B, A), rtol=0, atol=0)



@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_factor_fallback_is_the_two_matmuls_exactly(dtype):
    g = torch.randn(40, 24, dtype=dtype)
    B, ax = torch.randn(24, 4, dtype=dtype), torch.randn(40, 4, dtype=dtype)
    gB, gax = kernels.lora_factor_grads(g, B, ax)
    acc = torch.promote_types(dtype, torch.float32)
    assert torch.equal(gB, g @ B) and gax.dtype == acc and torch.equal(gax, (g.t() @ ax).to(acc))


def test_factor_kernel_in_tritons_interpreter_matches_the_matmuls():
    """The kernel's indexing (edges that fill no tile, column ranges per program, a strided g, the
    fixed-order sums) on the CPU, in fp32: Triton's interpreter runs bf16 dots wrongly."""
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import torch
        from minift.fast import kernels
        empty = torch.empty
        torch.empty = lambda *a, **k: empty(*a, **k).fill_(float("nan"))  # an entry left unwritten shows
        torch.manual_seed(0)
        for N, O, r, programs in [(300, 200, 8, 1), (300, 200, 8, 7), (257, 130, 16, 64), (64, 1000, 1, 9),
                                  (5, 3, 64, 1), (129, 63, 33, 1000)]:
            g = torch.randn(N, O + 5)[:, 2:O + 2]  # rows strided: a view of a wider tensor
            B, ax = torch.randn(O, r), torch.randn(N, r)
            gB, gax = kernels._factor_grads(g, B, ax, programs)
            torch.testing.assert_close(gB, g @ B, rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(gax, g.t() @ ax, rtol=1e-5, atol=1e-4)
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "TRITON_INTERPRET": "1"})
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


@cuda
@pytest.mark.parametrize("shape", [(8192, 1024, 8), (8192, 4096, 8), (1000, 333, 3), (77, 4100, 16), (130, 96, 16)])
def test_factor_kernel_matches_fp32_products(shape):
    """bf16 g, B and A x as the merged LoRA backward gives them: g B (rounded once to bf16) and
    g^T (A x) (fp32) against the fp32 products, to bf16's and fp32 accumulation's rounding."""
    N, O, r = shape
    gen = torch.Generator(device="cpu").manual_seed(0)
    g = torch.randn(N, O, generator=gen).cuda().bfloat16()
    B = torch.randn(O, r, generator=gen).cuda().bfloat16()
    ax = torch.randn(N, r, generator=gen).cuda().bfloat16()
    gB, gax = kernels.lora_factor_grads(g, B, ax)
    assert gB.dtype == torch.bfloat16 and gB.shape == (N, r) and gax.dtype == torch.float32 and gax.shape == (O, r)
    ref_gB, ref_gax = g.float() @ B.float(), g.float().t() @ ax.float()
    # The kernel and cuBLAS sum in fp32 in different orders, so before g B is rounded to bf16 they may
    # differ by fp32's accumulation error, which scales with the sum of |terms| (|g| |B|), not with the
    # result: where the terms cancel it is many bf16 ulps of a small value. Allowed: one bf16 ulp of the
    # result (2^-7 relative) plus 4 fp32 ulps (2^-23 each) of the sum of |terms|.
    bound = ref_gB.abs() * 2 ** -7 + (g.float().abs() @ B.float().abs()) * 2 ** -21
    assert ((gB.float() - ref_gB).abs() <= bound).all()
    torch.testing.assert_close(gax, ref_gax, rtol=1e-3, atol=1e-3 * ref_gax.abs().max().item())
    again = kernels.lora_factor_grads(g, B, ax)
    assert torch.equal(again[0], gB) and torch.equal(again[1], gax)  # no atomics: the same every run


@cuda
def test_factor_kernel_leaves_fp32_high_ranks_and_empty_gradients_to_the_matmuls(monkeypatch):
    """fp32 g (the kernel's dots would run in TF32), ranks above MAX_FACTOR_RANK and an empty g
    take the two matmuls: the kernel is never launched."""
    monkeypatch.setattr(kernels, "_factor_grads", lambda *a, **k: pytest.fail("the kernel ran"))
    for N, O, r, dtype in [(256, 128, 8, torch.float32), (256, 128, kernels.MAX_FACTOR_RANK + 1, torch.bfloat16),
                           (0, 128, 8, torch.bfloat16)]:
        g, B, ax = (torch.randn(n, m, device="cuda", dtype=dtype) for n, m in ((N, O), (O, r), (N, r)))
        gB, gax = kernels.lora_factor_grads(g, B, ax)
        assert torch.equal(gB, g @ B) and torch.equal(gax, (g.t() @ ax).float())
