"""fast.mlp: down_proj's merged LoRA with the MLP's activation inside, recomputed in the backward
instead of kept, against the merged LoRA alone (``fast.lora``): the same loss and gradients, in fp32
and under bf16 autocast, on GPT-2's, BERT's and Llama's MLP; less kept for the backward; the
reference path wherever down_proj's merged forward does not apply."""
import copy

import pytest
import torch

from conftest import TINY_GPT, double_backward, kind_batch, loss_and_grads, merged_lora_model, relative_off
from minift.fast import cast
from minift.fast import lora as fast_lora
from minift.fast import mlp as fast_mlp
from minift.methods import lora
from minift.methods.lora import LoRAConfig
from minift.models.gpt import GPT, GPTConfig
from minift.training.forward import model_forward

TARGETS = ("q_proj", "v_proj", "up_proj", "down_proj")


def _model(kind: str, seed: int = 0):
    return merged_lora_model(kind, TARGETS + (("gate_proj",) if kind == "llama" else ()), seed=seed)


@pytest.mark.parametrize("kind", ["gpt", "bert", "llama"])
@pytest.mark.parametrize("autocast", [False, True])
def test_the_recomputed_activation_gives_the_merged_forwards_loss_and_gradients(kind, autocast):
    """The same ops on the same values in the same order, the activation's input kept instead of its
    output: equal to the merged forward bit for bit, also under autocast (with cast-once on, as
    minift.fast runs it)."""
    ref = _model(kind)
    quick = copy.deepcopy(ref)
    for m in (ref, quick):
        cast.enable(m)
    assert len(fast_mlp.enable(quick)) == 2
    batch = kind_batch(kind)
    want, got = loss_and_grads(ref, batch, autocast), loss_and_grads(quick, batch, autocast)
    assert len(got) == len(want) >= 1 + 2 * len(lora.lora_modules(quick))  # the loss, every A and B
    for g, w in zip(got, want):
        assert torch.equal(g, w), (g - w).abs().max()


def _held(model, batch, autocast: str | None = None) -> list[int]:
    """The sizes of the tensors autograd keeps for one step's backward, parameters left out (under bf16
    autocast on the device ``autocast`` names, if any)."""
    sizes = []
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            sizes.append(t.numel())
        return t
    with torch.autocast(autocast or "cpu", dtype=torch.bfloat16, enabled=autocast is not None), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model_forward(model, batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sizes


@pytest.mark.parametrize("kind", ["gpt", "bert", "llama"])
def test_the_activations_output_is_not_kept(kind):
    """What autograd keeps for the backward (eager): the activation's output (N x inner) is gone, one
    such tensor per MLP less; with SwiGLU two (silu(g), which the product kept, goes too: g and u are
    all the recomputation needs, and autograd kept both already)."""
    def held(model):
        return _held(model, kind_batch(kind))
    ref = _model(kind)
    quick = copy.deepcopy(ref)
    fast_mlp.enable(quick)
    mlp = quick.layers[0].mlp
    wide = 2 * 9 * mlp.down_proj.in_features  # one (N, inner) activation
    per_layer = {"gpt": 1, "bert": 1, "llama": 2}[kind]
    assert held(ref).count(wide) - held(quick).count(wide) == 2 * per_layer
    assert sum(held(ref)) - sum(held(quick)) == 2 * per_layer * wide


def test_the_reference_path_where_the_merged_forward_does_not_apply():
    """down_proj without LoRA, with dropout acting (training), merged into W0, or on the addmm forward:
    the MLP runs its reference forward (the same loss and gradients as without fast.mlp); without a
    merged LoRA down_proj, enable leaves the MLP as it is."""
    for setup in ("no lora", "dropout", "merged", "addmm"):
        torch.manual_seed(0)
        model = GPT(GPTConfig(**TINY_GPT, dropout=0.0))
        dropout = 0.5 if setup == "dropout" else 0.0
        lora.apply(model, LoRAConfig(r=2, dropout=dropout,
                                     targets=("q_proj",) if setup == "no lora" else TARGETS))
        fast_lora.enable(model.train(), merged=setup != "addmm")
        if setup == "merged":
            lora.merge(model)
        quick = copy.deepcopy(model)
        assert len(fast_mlp.enable(quick)) == (0 if setup in ("no lora", "addmm") else 2)
        batch = kind_batch("gpt")
        torch.manual_seed(2)
        want = loss_and_grads(model, batch, False)
        torch.manual_seed(2)
        got = loss_and_grads(quick, batch, False)
        for g, w in zip(got, want):
            assert torch.equal(g, w), setup


def test_enable_and_disable_swap_the_class_only(tmp_path):
    """The same Parameters and state-dict keys; save_pretrained still takes the model once its
    adapters are unloaded (the swapped MLP is a GPT MLP that computes differently)."""
    model = _model("gpt")
    before = {k: v.data_ptr() for k, v in model.state_dict().items()}
    names = fast_mlp.enable(model)
    assert names == ["layers.0.mlp", "layers.1.mlp"] and fast_mlp.enable(model) == []
    assert all(type(m) is fast_mlp.GPTMLP for m in (model.layers[0].mlp, model.layers[1].mlp))
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == before
    fast_lora.disable(model)
    lora.unload(model)
    model.save_pretrained(tmp_path / "m")
    loaded = GPT.from_pretrained(tmp_path / "m")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert fast_mlp.disable(model) == names and type(model.layers[0].mlp).__name__ == "MLP"


def test_a_2d_input_in_fp64_eval_mode_with_dropout_and_a_trained_bias():
    """The Function alone against the reference MLP's ops: a 2-D input in fp64 (no autocast: the
    matmul dtype is the input's), down_proj's bias trained, LoRA dropout set but the layer in eval
    mode (the merged forward applies): outputs and every gradient equal up to fp64 rounding."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY_GPT, dropout=0.0)).double()
    lora.apply(model, LoRAConfig(r=2, dropout=0.3, targets=("up_proj", "down_proj")))
    mlp = model.layers[0].mlp
    mlp.down_proj.bias.requires_grad_(True)
    with torch.no_grad():
        mlp.down_proj.lora_B.normal_(0, 0.1)
    fast_lora.enable(model.eval())
    quick = copy.deepcopy(mlp)
    fast_mlp.enable(quick)
    x = torch.randn(5, TINY_GPT["n_embd"], dtype=torch.float64)
    results = []
    for m in (mlp, quick):
        xi = x.clone().requires_grad_()
        m(xi).square().sum().backward()
        results.append([xi.grad] + [p.grad.clone() for p in m.parameters() if p.requires_grad])
        m.zero_grad(set_to_none=True)
    assert len(results[0]) == len(results[1]) == 1 + 4 + 1  # x, up's A and B, down's A and B, down's bias
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_fast_enable_takes_it_with_the_merged_forward_only():
    model = _model("gpt")
    fast_lora.disable(model)
    from minift import fast
    for kw in ({"merged_lora": False}, {"lora_factor_kernel": True}):
        with pytest.raises(ValueError, match="lora_recompute_act runs down_proj's merged forward"):
            fast.enable(model, lora_recompute_act=True, **kw)
    assert "MLP activation recomputed: 2 MLPs" in fast.enable(model, lora_recompute_act=True)
    assert type(model.layers[0].mlp) is fast_mlp.GPTMLP


def test_double_backward_is_refused():
    model = _model("gpt")
    fast_mlp.enable(model)
    with pytest.raises(RuntimeError, match="double backward"):
        double_backward(model, kind_batch("gpt"))


def test_compiled_matches_eager_and_keeps_the_activations_input_only():
    """torch.compile traces the Function (the activation by name, a constant) with no graph break in
    the MLP: the loss and every gradient match the eager path in fp32. And the compiled step keeps
    one (N, inner) tensor per MLP, the activation's input: the backward's recomputation is an opaque
    operator, which the compiler cannot merge with the forward's activation and keep its output."""
    model = _model("gpt")
    fast_mlp.enable(model)
    batch = kind_batch("gpt")
    eager = loss_and_grads(model, batch, False)
    compiled_mlp = torch.compile(model.layers[0].mlp, fullgraph=True)  # fails on a graph break
    x = torch.randn(2, 9, TINY_GPT["n_embd"], requires_grad=True)
    out = compiled_mlp(x)
    out.sum().backward()
    want = x.detach().clone().requires_grad_()
    model.layers[0].mlp(want).sum().backward()
    torch.testing.assert_close(x.grad, want.grad, rtol=1e-5, atol=1e-6)
    model.zero_grad(set_to_none=True)
    model.compile()
    compiled = loss_and_grads(model, batch, False)
    for got, w in zip(compiled, eager):
        torch.testing.assert_close(got, w, rtol=1e-4, atol=1e-6)
    wide = 2 * 9 * model.layers[0].mlp.down_proj.in_features
    assert _held(model, batch).count(wide) == len(model.layers)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_on_cuda_eager_and_compiled_match_the_merged_forward(kind):
    """On CUDA (the merged weight rebuilt by the Triton kernel where Triton is installed), bf16
    autocast with the frozen base in bf16, as ``minift train`` runs it: the same loss and gradients
    as the merged forward alone, eager bit for bit. Compiled, inductor fuses and rounds each graph in
    its own places, and a tiny model's small gradients move by several percent in bf16: so the
    compiled step's furthest tensor from the eager merged forward may be at most twice as far as the
    compiled merged forward's furthest (the two need not be the same tensor), which is itself held
    to rounding's size."""
    from minift.fast import frozen
    ref = _model(kind).cuda()
    frozen.enable(ref)
    quick, compiled_ref = copy.deepcopy(ref), copy.deepcopy(ref)
    for m in (ref, quick, compiled_ref):
        cast.enable(m)
    fast_mlp.enable(quick)
    batch = kind_batch(kind, "cuda")

    def run(model):
        return loss_and_grads(model, batch, True, "cuda")
    want = run(ref)
    for got, w in zip(run(quick), want):
        assert torch.equal(got, w)
    quick.compile()
    compiled_ref.compile()
    ours, theirs = relative_off(run(quick), want), relative_off(run(compiled_ref), want)
    wide = 2 * 9 * quick.layers[0].mlp.down_proj.in_features
    held = _held(quick, batch, "cuda").count(wide)
    assert theirs.max() < 0.25, theirs  # rounding, not a broken compile of the merged forward
    assert ours.max() <= 2 * theirs.max() + 1e-3, (ours, theirs)
    assert held == len(quick.layers) * (2 if kind == "llama" else 1)  # h; g, u
