"""minift.fast.kernels: the Triton rebuild of W0 + sBA against addmm (on CUDA; run on the GPU machine
with ``python -m pytest tests/fast/test_kernels.py``), and the fallback everywhere else."""
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

