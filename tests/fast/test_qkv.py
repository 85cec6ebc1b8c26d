"""fast.qkv: an attention module's merged q/k/v LoRA layers as one node, their A's stacked, against the
merged LoRA layers one by one (``fast.lora``): the same loss and gradients, in fp32 and under bf16
autocast, on GPT-2's, BERT's and Llama's attention; any two of the three stacked; different ranks,
scalings and trained biases; the layers' own forward wherever the merged forward does not apply."""
import copy

import pytest
import torch

from conftest import (TINY_GPT, double_backward, kind_batch, loss_and_grads, merged_lora_model, relative_off,
                      saved_bytes)
from minift import fast
from minift.fast import cast
from minift.fast import lora as fast_lora
from minift.fast import qkv as fast_qkv
from minift.methods import lora

ALL = ("q_proj", "k_proj", "v_proj", "o_proj")


def _model(kind: str, targets=ALL, dropout: float = 0.0):
    return merged_lora_model(kind, targets, dropout=dropout)


def _attentions(model):
    return [m for m in model.modules() if hasattr(m, "q_proj")]


@pytest.mark.parametrize("kind", ["gpt", "bert", "llama"])
@pytest.mark.parametrize("autocast", [False, True])
def test_stacked_gives_the_merged_forwards_loss_and_gradients(kind, autocast):
    """The stacked A x and dA are the same dot products as the three thin GEMMs, in one GEMM each: equal
    to the layer-by-layer merged forward up to the GEMMs' summation order, and under bf16 autocast up to
    where that order rounds a product differently (with cast-once on, as minift.fast runs it)."""
    ref = _model(kind)
    quick = copy.deepcopy(ref)
    for m in (ref, quick):
        cast.enable(m)
    assert len(fast_qkv.enable(quick)) == 2
    assert all(fast_qkv.stacked(a) == ["q_proj", "k_proj", "v_proj"] for a in _attentions(quick))
    batch = kind_batch(kind)
    want, got = loss_and_grads(ref, batch, autocast), loss_and_grads(quick, batch, autocast)
    assert len(got) == len(want) == 1 + 2 * len(lora.lora_modules(quick))  # the loss, every A and B
    for g, w in zip(got, want):
        if autocast:  # one bf16 rounding apart here and there: each tensor within 1% of its norm
            assert (g - w).norm() <= 1e-2 * w.norm(), (g - w).norm() / w.norm()
        else:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("setup, stacked", [
    ("q,v", ["q_proj", "v_proj"]), ("k,v", ["k_proj", "v_proj"]), ("q only", []), ("dropout", []),
    ("merged", []), ("addmm", []), ("factor kernel", []), ("eval, dropout", ["q_proj", "k_proj", "v_proj"])])
def test_which_projections_stack(setup, stacked):
    """Any two or three that take the merged forward stack; one alone, LoRA dropout acting (training),
    adapters merged into W0, the addmm forward or the factor kernel: each layer runs its own forward.
    The loss and gradients are those without fast.qkv."""
    targets = {"q,v": ("q_proj", "v_proj"), "k,v": ("k_proj", "v_proj"), "q only": ("q_proj",)}.get(setup, ALL)
    model = _model("gpt", targets, dropout=0.5 if "dropout" in setup else 0.0)
    fast_lora.enable(model, merged=setup != "addmm", factor_kernel=setup == "factor kernel")
    if setup == "merged":
        lora.merge(model)
    if setup.startswith("eval"):
        model.eval()
    quick = copy.deepcopy(model)
    fast_qkv.enable(quick)
    assert [fast_qkv.stacked(a) for a in _attentions(quick)] == [stacked] * 2
    batch = kind_batch("gpt")
    torch.manual_seed(2)
    want = loss_and_grads(model, batch)
    torch.manual_seed(2)
    got = loss_and_grads(quick, batch)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def test_different_ranks_scalings_and_trained_biases_in_fp64():
    """The Function alone against the reference ops: three projections of different ranks, scalings and
    output widths (GQA's narrower k and v), a 2-D fp64 input, two biases trained and one absent: the
    outputs and every gradient equal up to fp64 rounding."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape, grad=True):
        return torch.randn(*shape, dtype=torch.float64, generator=g).requires_grad_(grad)
    shapes = [(3, 24, 0.5), (1, 8, 2.0), (5, 8, 1.25)]  # (rank, out, scaling)
    x = rand(7, 16)
    params = []
    for i, (r, out, _) in enumerate(shapes):
        params += [rand(out, 16, grad=False), None if i == 1 else rand(out), rand(r, 16), rand(out, r)]
    scalings = tuple(s for _, _, s in shapes)
    got = fast_qkv.StackedMergedLoRA.apply(x, scalings, *params)
    want = [x @ (W + s * B @ A).t() + (0 if b is None else b)
            for (W, b, A, B), s in zip(zip(*[iter(params)] * 4), scalings)]
    leaves = [x] + [p for p in params if p is not None and p.requires_grad]
    weights = [rand(*y.shape, grad=False) for y in want]
    grads = [torch.autograd.grad(sum((y * w).sum() for y, w in zip(ys, weights)), leaves) for ys in (got, want)]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["gpt", "bert", "llama"])
def test_keeps_what_the_layers_one_by_one_keep(kind):
    """For the backward, under bf16 autocast with cast-once on (as minift.fast runs it), the stacked node
    keeps the same bytes as the three merged layers: x once, A x as one (N, 3r) tensor instead of three
    (N, r) ones, the factors in bf16 as one (3r, C) tensor instead of three."""
    ref = _model(kind)
    cast.enable(ref)
    quick = copy.deepcopy(ref)
    fast_qkv.enable(quick)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, _ = saved_bytes(ref, kind_batch(kind))
        got, _ = saved_bytes(quick, kind_batch(kind))
    assert got == want > 0


def test_frozen_factors_and_a_forward_without_autograd():
    """A factor that does not train gets no gradient and the others theirs (no A training: the dA GEMM
    is skipped); under no_grad the outputs are those with autograd."""
    g = torch.Generator().manual_seed(3)

    def rand(*shape, grad=True):
        return torch.randn(*shape, dtype=torch.float64, generator=g).requires_grad_(grad)
    x = rand(5, 8)
    for frozen_As in ((0,), (0, 1)):
        params = []
        for i in range(2):
            params += [rand(4, 8, grad=False), None, rand(2, 8, grad=i not in frozen_As), rand(4, 2, grad=i != 1)]
        ys = fast_qkv.StackedMergedLoRA.apply(x, (1.0, 0.5), *params)
        want = [x @ (W + s * B @ A).t() for (W, _, A, B), s in zip(zip(*[iter(params)] * 4), (1.0, 0.5))]
        leaves = [t for t in params if t is not None and t.requires_grad]
        got_grads = torch.autograd.grad(sum(y.sum() for y in ys), leaves)
        want_grads = torch.autograd.grad(sum(y.sum() for y in want), leaves)
        for a, b in zip(got_grads, want_grads):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        with torch.no_grad():
            for a, b in zip(fast_qkv.StackedMergedLoRA.apply(x, (1.0, 0.5), *params), want):
                torch.testing.assert_close(a, b.detach(), rtol=1e-12, atol=1e-12)


def test_enable_and_disable_swap_the_class_only():
    model = _model("llama")
    before = {k: v.data_ptr() for k, v in model.state_dict().items()}
    names = fast_qkv.enable(model)
    assert names == ["layers.0.self_attn", "layers.1.self_attn"] and fast_qkv.enable(model) == []
    assert all(type(a) is fast_qkv.StackedLlamaAttention for a in _attentions(model))
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == before
    assert fast_qkv.disable(model) == names and type(model.layers[0].self_attn).__name__ == "Attention"
    assert fast_qkv.enable(_model("gpt", ("q_proj",))) == []  # one LoRA projection: nothing to stack


def test_fast_enable_takes_it_with_the_merged_forward_only():
    model = _model("gpt")
    fast_lora.disable(model)
    assert "q, k, v LoRA stacked: 2 attention modules" in fast.enable(model)
    fast.disable(model)
    assert not any("stacked" in line for line in fast.enable(model, merged_lora=False))
    assert all(type(a).__name__ == "SelfAttention" and type(a).__module__ == "minift.models.layers"
               for a in _attentions(model))


def test_double_backward_is_refused():
    model = _model("gpt")
    fast_qkv.enable(model)
    with pytest.raises(RuntimeError, match="double backward"):
        double_backward(model, kind_batch("gpt"))


def test_compiled_without_a_graph_break():
    """torch.compile traces the Function with no graph break in the attention module (fullgraph), and
    the input's gradient through it matches the eager one in fp32."""
    model = _model("gpt")
    fast_qkv.enable(model)
    attn = model.layers[0].attn
    x = torch.randn(2, 9, TINY_GPT["n_embd"], requires_grad=True)
    out, _ = torch.compile(attn, fullgraph=True)(x)  # fails on a graph break
    out.sum().backward()
    want = x.detach().clone().requires_grad_()
    attn(want)[0].sum().backward()
    torch.testing.assert_close(x.grad, want.grad, rtol=1e-5, atol=1e-6)


def _eager_and_compiled_match_the_merged_forward(kind: str, device: str) -> None:
    """In fp32 the stacked node gives the layer-by-layer merged forward's loss and gradients, eager and
    compiled, up to the GEMMs' summation order. Under bf16 autocast with the frozen base in bf16, as
    ``minift train`` runs it on CUDA, within 2% of each tensor's norm: eager against the eager merged
    forward, compiled against the compiled one (compiling moves a tiny model's small gradients by up to
    tens of percent from eager, stacked or not)."""
    from minift.fast import frozen
    batch = kind_batch(kind, device)

    def run(model, bf16):
        return loss_and_grads(model, batch, bf16, device)
    for bf16 in (False, True):
        ref = _model(kind).to(device)
        if bf16:
            frozen.enable(ref)
        quick, compiled_ref = copy.deepcopy(ref), copy.deepcopy(ref)
        for m in (ref, quick, compiled_ref):
            cast.enable(m)
        assert len(fast_qkv.enable(quick)) == 2
        want, eager = run(ref, bf16), run(quick, bf16)
        quick.compile()
        compiled_ref.compile()
        compiled, theirs = run(quick, bf16), run(compiled_ref, bf16)
        if not bf16:
            for got in (eager, compiled):
                for g, w in zip(got, want):
                    torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
            continue
        assert relative_off(eager, want).max() < 0.02, relative_off(eager, want)
        assert relative_off(compiled, theirs).max() < 0.02, relative_off(compiled, theirs)


def test_eager_and_compiled_match_the_merged_forward_in_fp32_and_bf16():
    _eager_and_compiled_match_the_merged_forward("gpt", "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_on_cuda_eager_and_compiled_match_the_merged_forward(kind):
    """As on the CPU, on CUDA (W0 + sBA rebuilt by the Triton kernel where Triton is installed)."""
    _eager_and_compiled_match_the_merged_forward(kind, "cuda")
