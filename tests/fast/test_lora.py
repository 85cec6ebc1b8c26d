"""minift.fast.lora against the reference LoRA layer: the merged and the addmm forwards give the
reference's outputs and gradients; enable/disable keep every Parameter, key and adapter file."""
import copy

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import TINY_GPT, Toy
from minift import adapters, fast
from minift.fast import kernels
from minift.fast import lora as fast_lora
from minift.methods import lora
from minift.methods.lora import LoRAConfig, LoRALinear
from minift.training.loop import model_forward

cuda = pytest.mark.skipif(not (torch.cuda.is_available() and kernels.triton is not None),
                          reason="the merged rebuild's Triton kernel needs CUDA and Triton (checked on the GPU machine)")




toy_case = st.fixed_dictionaries(dict(
    d_in=st.integers(2, 24), d_hid=st.integers(2, 24), d_out=st.integers(2, 24), bias=st.booleans(),
    r=st.integers(1, 8), alpha=st.floats(0.5, 32.0), rslora=st.booleans(), dora=st.booleans(),
    seed=st.integers(0, 2**16)))


def _toy(case):
    torch.manual_seed(case["seed"])
    model = Toy(case["d_in"], case["d_hid"], case["d_out"], case["bias"])
    r = min(case["r"], case["d_in"], case["d_hid"], case["d_out"])
    lora.apply(model, LoRAConfig(r=r, alpha=case["alpha"], targets=("up", "down"), rslora=case["rslora"],
                                 dora=case["dora"], modules_to_save=("head",)))
    return model


def _loss_and_grads(model, x):
    xi = x.clone().requires_grad_(True)
    loss = model(xi).pow(2).mean()
    params = [p for p in model.parameters() if p.requires_grad]
    return (loss, *torch.autograd.grad(loss, [xi, *params]))


@settings(max_examples=20, deadline=None)
@given(case=toy_case, trained_bias=st.booleans(), merged=st.booleans(), factor_kernel=st.booleans())
def test_fast_forwards_give_the_reference_loss_and_gradients(case, trained_bias, merged, factor_kernel):
    """Merged (one GEMM through W0 + sBA, hand-written backward; with or without the factor
    kernel's path, on the CPU its two matmuls) and addmm forwards against the reference in fp64:
    same loss, same gradients for x, A, B (and a trainable bias); DoRA layers keep the reference
    forward and are not switched."""
    model = _toy(case).double()
    with torch.no_grad():
        for _, m in lora.lora_modules(model):
            m.lora_B.normal_()  # a non-zero update
            if m.bias is not None:
                m.bias.requires_grad_(trained_bias)
    quick = copy.deepcopy(model)
    names = fast_lora.enable(quick, merged=merged, factor_kernel=merged and factor_kernel)
    assert names == ([] if case["dora"] else ["up", "down"])
    x = torch.randn(5, 3, case["d_in"], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for a, b in zip(_loss_and_grads(model, x), _loss_and_grads(quick, x)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    assert fast_lora.disable(quick) == names
    assert all(type(m) is type(r) for (_, m), (_, r) in zip(lora.lora_modules(quick), lora.lora_modules(model)))


def test_fast_forwards_in_fp32_match_the_reference():
    """The same comparison in fp32, on a GPT, at the tolerance of the merge test."""
    torch.manual_seed(0)
    from minift.models.gpt import GPT, GPTConfig
    ref = GPT(GPTConfig(**TINY_GPT)).train()
    lora.apply(ref, LoRAConfig(r=3, targets=("q_proj", "v_proj", "up_proj", "down_proj")))
    with torch.no_grad():
        for _, m in lora.lora_modules(ref):
            m.lora_B.normal_(0, 0.1)
    ids = torch.randint(0, TINY_GPT["vocab_size"], (2, 9))
    batch = {"input_ids": ids, "labels": ids}
    want = _gpt_loss_and_grads(ref, batch)
    for merged in (True, False):
        quick = copy.deepcopy(ref)
        assert len(fast_lora.enable(quick, merged=merged)) == 8
        for got, w in zip(_gpt_loss_and_grads(quick, batch), want):
            torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-6)


def _gpt_loss_and_grads(model, batch):
    loss = model_forward(model, batch).loss
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return [loss.detach(), *grads]


def test_enable_keeps_parameters_keys_and_adapter_files(tiny_gpt, tmp_path):
    """enable changes the layers' class only: the same Parameter objects, the same state-dict keys,
    still LoRALinear (merge, unmerge and adapter files work); disable restores the reference class."""
    lora.apply(tiny_gpt, LoRAConfig(r=2, targets=("q_proj", "v_proj")))
    params = dict(tiny_gpt.named_parameters())
    keys = list(tiny_gpt.state_dict())
    assert fast_lora.enable(tiny_gpt) == [n for n, _ in lora.lora_modules(tiny_gpt)]
    assert fast_lora.enable(tiny_gpt) == []  # already on
    assert all(p is params[n] for n, p in tiny_gpt.named_parameters()) and list(tiny_gpt.state_dict()) == keys
    assert all(isinstance(m, fast_lora.MergedLoRALinear) for _, m in lora.lora_modules(tiny_gpt))
    ids = torch.randint(0, TINY_GPT["vocab_size"], (2, 7))
    y = tiny_gpt(ids).logits
    lora.merge(tiny_gpt)
    torch.testing.assert_close(tiny_gpt(ids).logits, y, rtol=1e-5, atol=1e-5)
    lora.unmerge(tiny_gpt)
    adapters.save_adapter(tiny_gpt, tmp_path, layout="minift")
    assert len(fast_lora.disable(tiny_gpt)) == 4 and fast_lora.disable(tiny_gpt) == []
    assert all(type(m) is LoRALinear for _, m in lora.lora_modules(tiny_gpt))
    assert fast_lora.enable(nn.Linear(3, 3)) == []  # nothing to switch: not an error


def test_the_factor_kernel_is_a_setting_of_merged_layers_only_and_disable_clears_it(tiny_gpt):
    lora.apply(tiny_gpt, LoRAConfig(r=2, targets=("q_proj", "v_proj")))
    layers = [m for _, m in lora.lora_modules(tiny_gpt)]
    assert len(fast_lora.enable(tiny_gpt, factor_kernel=True)) == len(layers)
    assert all(m.factor_kernel and "factor_kernel" in vars(m) for m in layers)
    assert fast_lora.enable(tiny_gpt, factor_kernel=True) == []  # already on
    assert len(fast_lora.enable(tiny_gpt)) == len(layers)  # the same forward, the plain backward
    assert not any(m.factor_kernel or "factor_kernel" in vars(m) for m in layers)
    fast_lora.enable(tiny_gpt, merged=False, factor_kernel=True)  # addmm layers have no such backward
    assert not any("factor_kernel" in vars(m) for m in layers)
    assert fast_lora.enable(tiny_gpt, merged=False) == []  # twice: nothing to switch
    assert fast_lora.enable(tiny_gpt, merged=False, factor_kernel=True) == []
    fast_lora.enable(tiny_gpt, factor_kernel=True)
    fast_lora.disable(tiny_gpt)
    assert all(type(m) is LoRALinear and "factor_kernel" not in vars(m) for m in layers)


def test_merged_forward_refuses_double_backward():
    """The hand-written backward builds no graph: create_graph=True must fail, not return
    second derivatives that silently miss the terms through the saved tensors."""
    model = LoRALinear(nn.Linear(6, 4).double().requires_grad_(False), r=2, alpha=4)
    assert fast_lora.enable(model) == [""]  # the layer itself
    assert model.merges()
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(model(x).pow(2).sum(), x)  # first order works
    assert g.shape == x.shape
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(model(x).pow(2).sum(), x, create_graph=True)


def test_merged_forward_skips_dropout_in_training_and_a_trained_base(tiny_gpt):
    """Dropout acts on the adapter's input only, which a merged weight cannot do: in training such
    a layer takes the addmm forward (the same values as the reference, same dropout mask), in
    evaluation the merged one. A trained W0 keeps the addmm forward too."""
    lora.apply(tiny_gpt, LoRAConfig(r=2, dropout=0.5))
    fast_lora.enable(tiny_gpt.train())
    layer = tiny_gpt.layers[0].attn.q_proj
    assert not layer.merges()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 5, 32)
    torch.manual_seed(0)
    got = layer(x)
    torch.manual_seed(0)
    torch.testing.assert_close(got, LoRALinear.forward(layer, x), rtol=1e-6, atol=1e-6)
    assert all(m.merges() for _, m in lora.lora_modules(tiny_gpt.eval()))
    layer.weight.requires_grad_(True)
    assert not layer.merges()


def test_compiled_merged_forward_keeps_no_copy_of_the_merged_weights(tiny_gpt):
    """Under torch.compile the backward's rebuild of W0 + sBA must stay in the backward graph:
    otherwise the partitioner computes it in forward and keeps a copy of every adapted weight
    alive until backward (0.56 GiB for GPT-2 medium). Checked on what autograd holds."""
    lora.apply(tiny_gpt, LoRAConfig(r=2, targets=("q_proj", "v_proj", "up_proj", "down_proj")))
    fast_lora.enable(tiny_gpt.train())
    for p in tiny_gpt.parameters():
        if not p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    params = {p.untyped_storage().data_ptr() for p in tiny_gpt.parameters()}
    weight_shapes = {tuple(m.weight.shape) for _, m in lora.lora_modules(tiny_gpt)}
    held = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            held.append(tuple(t.shape))
        return t

    ids = torch.randint(0, TINY_GPT["vocab_size"], (2, 7))
    tiny_gpt.compile()
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model_forward(tiny_gpt, {"input_ids": ids, "labels": ids}).loss
    loss.backward()
    assert held and not weight_shapes & set(held), held
    assert all(m.lora_A.grad is not None and m.lora_B.grad is not None for _, m in lora.lora_modules(tiny_gpt))


@pytest.mark.parametrize("factor_kernel", [False, True])
def test_compiled_merged_forward_matches_eager(tiny_gpt, factor_kernel):
    """Compiled, the forward rebuilds W0 + sBA in the traced graph and the backward inside
    ``minift::lora_input_grad`` (and A's and B's gradients inside ``minift::lora_factor_grads``
    with the factor kernel; on the CPU all through matmuls); in fp32 the loss and every gradient
    match the eager path."""
    lora.apply(tiny_gpt, LoRAConfig(r=3, targets=("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")))
    fast_lora.enable(tiny_gpt.train(), factor_kernel=factor_kernel)
    with torch.no_grad():  # B != 0, so the rebuilt W0 + sBA differs from W0
        for _, m in lora.lora_modules(tiny_gpt):
            m.lora_B.normal_(0, 0.1)
    ids = torch.randint(0, TINY_GPT["vocab_size"], (2, 7))
    batch = {"input_ids": ids, "labels": ids}
    eager = _gpt_loss_and_grads(tiny_gpt, batch)
    tiny_gpt.compile()
    compiled = _gpt_loss_and_grads(tiny_gpt, batch)
    assert len(compiled) == len(eager) == 1 + 2 * 12
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-6)
    for got, want in zip(compiled[1:], eager[1:]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_fast_enable_switches_lora_on_and_reports_it(tiny_gpt):
    """fast.enable puts the LoRA layers on the merged (or addmm) forward and lists what it switched
    on; DoRA layers stay on the reference forward."""
    lora.apply(tiny_gpt, LoRAConfig(r=2))
    on = fast.enable(tiny_gpt)
    assert any("LoRA merged forward" in s for s in on), on
    assert all(type(m) is fast_lora.MergedLoRALinear for _, m in lora.lora_modules(tiny_gpt))
    fast.enable(tiny_gpt, merged_lora=False)
    assert all(type(m) is fast_lora.AddmmLoRALinear for _, m in lora.lora_modules(tiny_gpt))
    dora = copy.deepcopy(tiny_gpt)
    lora.unload(dora)
    lora.apply(dora, LoRAConfig(r=2, dora=True))
    assert not any("LoRA" in s for s in fast.enable(dora))
    assert all(type(m) is lora.DoRALinear for _, m in lora.lora_modules(dora))


@cuda
@pytest.mark.parametrize("factor_kernel", [False, True])
def test_merged_lora_on_cuda_matches_the_unmerged_layer(factor_kernel, monkeypatch):
    """The merged forward (which rebuilds through the kernel; A's and B's gradients through the
    factor kernel or two matmuls) against the plain LoRA layer, bf16 autocast on CUDA: outputs and
    the gradients of x, A and B."""
    ran = _count_factor_kernel(monkeypatch)
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(256, 384).cuda().requires_grad_(False), r=8, alpha=16)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.02)
    x = torch.randn(4, 33, 256, device="cuda", requires_grad=True)
    results = []
    for on in (False, True):
        if on:
            fast_lora.enable(layer, factor_kernel=factor_kernel)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(x)
        y.float().square().mean().backward()
        results.append((y.float(), x.grad.clone(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone()))
        x.grad = layer.lora_A.grad = layer.lora_B.grad = None
    for a, b in zip(*results):  # bf16 outputs and products: relative error of the whole tensor
        assert ((a - b).norm() / b.norm()).item() < 1e-2
    assert ran[0] == (1 if factor_kernel else 0)


@cuda
@pytest.mark.parametrize("factor_kernel", [False, True])
def test_compiled_merged_lora_on_cuda_matches_eager(factor_kernel, monkeypatch):
    """Under torch.compile dynamo traces the kernel's launch into the forward graph (the backward's
    rebuild runs inside ``minift::lora_input_grad``, the factor kernel inside
    ``minift::lora_factor_grads``): compiled and eager agree, bf16 autocast."""
    ran = _count_factor_kernel(monkeypatch)
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(256, 384).cuda().requires_grad_(False), r=8, alpha=16)
    fast_lora.enable(layer, factor_kernel=factor_kernel)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.02)
    x = torch.randn(4, 33, 256, device="cuda", requires_grad=True)
    results = []
    for fn in (layer, torch.compile(layer, fullgraph=True)):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = fn(x)
        y.float().square().mean().backward()
        results.append((y.float(), x.grad.clone(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone()))
        x.grad = layer.lora_A.grad = layer.lora_B.grad = None
    for a, b in zip(*results):
        assert ((a - b).norm() / b.norm()).item() < 1e-2
    assert ran[0] == (2 if factor_kernel else 0)  # eager, then the compiled step's custom op


def _count_factor_kernel(monkeypatch) -> list[int]:
    """Count the factor kernel's launches (``kernels._factor_grads``) from here on."""
    ran, launch = [0], kernels._factor_grads

    def counted(*a, **k):
        ran[0] += 1
        return launch(*a, **k)
    monkeypatch.setattr(kernels, "_factor_grads", counted)
    return ran
