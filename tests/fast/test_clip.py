"""minift.fast's gradient clipping equals torch.nn.utils.clip_grad_norm_ (its reference) bit for
bit, where it applies (the training loop's step with clipping: tests/fast/test_adamw.py)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minift.fast import clip as fast_clip


def _params(shapes, scale, seed, device="cpu", dtype=torch.float32, none_at=()):
    g = torch.Generator().manual_seed(seed)
    ps = []
    for i, s in enumerate(shapes):
        p = torch.nn.Parameter(torch.randn(s, generator=g).to(device, dtype))
        if i not in none_at:
            p.grad = (torch.randn(s, generator=g) * scale).to(device, dtype)
        ps.append(p)
    return ps


def _twin(ps):
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    for p, q in zip(ps, qs):
        q.grad = None if p.grad is None else p.grad.clone()
    return qs


def _check(ps, max_norm):
    qs = _twin(ps)
    ours = fast_clip.clip_grad_norm_(ps, max_norm)
    ref = torch.nn.utils.clip_grad_norm_(qs, max_norm)
    assert torch.equal(ours, ref)
    for p, q in zip(ps, qs):
        assert (p.grad is None) == (q.grad is None)
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad)
    return ours


@settings(max_examples=30, deadline=None)
@given(shapes=st.lists(st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple), min_size=1, max_size=8),
       scale=st.sampled_from([1e-3, 0.1, 1.0, 30.0]), max_norm=st.sampled_from([0.5, 1.0, 5.0]),
       seed=st.integers(0, 2 ** 16), none_first=st.booleans())
def test_equals_the_reference_bitwise(shapes, scale, max_norm, seed, none_first):
    ps = _params(shapes, scale, seed, none_at=(0,) if none_first and len(shapes) > 1 else ())
    total = _check(ps, max_norm)
    clipped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ps if p.grad is not None]))
    assert clipped <= max_norm * (1 + 1e-5) or total <= max_norm  # scaled down to max_norm, never up


def test_no_gradient_is_none_and_changes_nothing():
    ps = _params([(2, 3)], 1.0, 0, none_at=(0,))
    assert fast_clip.clip_grad_norm_(ps, 1.0) is None and ps[0].grad is None


def test_applies_only_to_plain_tensors_of_one_device_and_dtype():
    assert fast_clip.applies(_params([(2, 3), (4,)], 1.0, 0))
    assert not fast_clip.applies([])
    assert not fast_clip.applies(_params([(2, 3)], 1.0, 0) + _params([(4,)], 1.0, 1, dtype=torch.float64))

    class Sub(torch.Tensor):
        pass
    assert not fast_clip.applies([torch.zeros(3).as_subclass(Sub)])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_equals_the_reference_bitwise_on_cuda():
    _check(_params([(64, 32), (32,), (7, 5, 3)] * 20, 10.0, 0, device="cuda"), 1.0)
    _check(_params([(64, 32), (32,)], 10.0, 1, device="cuda", dtype=torch.bfloat16), 1.0)
