"""minift.fast's gradient clipping equals torch.nn.utils.clip_grad_norm_ (its reference) bit for
bit, where it applies; the training loop takes it only there and trains to the same weights."""
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


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_the_loop_takes_it_on_cuda_with_fast_and_trains_to_the_same_weights(device, monkeypatch):
    from minift.models.gpt import GPT, GPTConfig
    from minift.training.config import TrainConfig
    from minift.training.loop import train

    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": (x := torch.randint(0, 97, (2, 12), generator=g)), "labels": x} for _ in range(3)]
    calls, lean = [], fast_clip.clip_grad_norm_
    monkeypatch.setattr(fast_clip, "clip_grad_norm_", lambda *a: calls.append(1) or lean(*a))
    out = {}
    for fast in (True, False):
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32, dropout=0.0))
        cfg = TrainConfig(lr=3e-2, steps=5, max_grad_norm=0.05, progress=False, plot=False, fast=fast, seed=3,
                          device=device, bf16=False)
        res = train(model, data, cfg)
        out[fast] = (res.losses, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
    assert len(calls) == (5 if device == "cuda" else 0)  # on the CPU the loop keeps torch's clipping
    assert out[True][0] == out[False][0]
    assert all(torch.equal(out[True][1][k], out[False][1][k]) for k in out[True][1])
