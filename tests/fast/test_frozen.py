"""minift.fast.frozen against the fp32 frozen base: under autocast every layer reads the bf16
weight autocast would have made, so a step's loss and every trainable gradient are exactly the
reference's (the Triton rebuild of LoRA's merged weight within one bf16 rounding); which weights
it casts and which it leaves; and evaluation of a model so cast."""
import copy

import pytest
import torch
import torch.nn as nn

from conftest import TINY_BERT, TINY_GPT
from minift import fast
from minift.fast import frozen, kernels
from minift.methods.registry import build_method
from minift.models.bert import BertClassifier, BertConfig
from minift.models.gpt import GPT, GPTConfig
from minift.training.evaluate import evaluate
from minift.training.forward import model_forward

ALL_GPT = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def gpt(method="lora", **options):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY_GPT))
    opts = {"r": 4, "targets": ALL_GPT} if method in ("lora", "dora") else \
        {"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 1, "targets": ALL_GPT} if method == "adalora" else {}
    build_method(model, method, {**opts, **options}, total_steps=10)
    return model


def lm_batch(seed=1):
    ids = torch.randint(0, TINY_GPT["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": None, "labels": ids}


def step(model, batch):
    """Loss and every trainable gradient of one step under CPU bf16 autocast."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model_forward(model, batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method, options", [("lora", {}), ("lora", {"dropout": 0.0, "rslora": True}),
                                             ("adalora", {}), ("prefix", {"num_virtual_tokens": 3}),
                                             ("prompt", {"num_virtual_tokens": 3})])
def test_under_autocast_a_step_is_exactly_the_reference(method, options):
    ref = gpt(method, **options)
    with torch.no_grad():  # B = 0 at init would hide B's part of the forward
        for n, p in ref.named_parameters():
            if "lora_B" in n or "lora_E" in n:
                p.normal_(0, 0.1)
    bf = copy.deepcopy(ref)
    assert frozen.enable(bf)
    loss, grads = step(ref, lm_batch())
    loss_bf, grads_bf = step(bf, lm_batch())
    assert torch.equal(loss, loss_bf)
    assert grads.keys() == grads_bf.keys() and grads
    for n in grads:
        assert torch.equal(grads[n], grads_bf[n]), n


def test_the_merged_forward_rebuilt_by_addmm_is_exactly_the_reference():
    """Off CUDA the merged weight is rebuilt by addmm, which rounds W0 to bf16 first in the
    reference too: a step with a bf16 base is the reference's, bit for bit."""
    ref = gpt("lora")
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    fast.lora.enable(ref, merged=True)
    bf = copy.deepcopy(ref)
    assert frozen.enable(bf)
    loss, grads = step(ref, lm_batch())
    loss_bf, grads_bf = step(bf, lm_batch())
    assert torch.equal(loss, loss_bf)
    for n in grads:
        assert torch.equal(grads[n], grads_bf[n]), n


@pytest.mark.skipif(not (torch.cuda.is_available() and kernels.triton is not None),
                    reason="the Triton rebuild of W0 + sBA needs CUDA and Triton (checked on the GPU machine)")
def test_the_triton_rebuild_from_a_bf16_w0_is_within_one_rounding_of_the_fp32_one():
    g = torch.Generator(device="cuda").manual_seed(0)
    w0 = torch.randn(256, 192, device="cuda", generator=g)
    A = torch.randn(8, 192, device="cuda", generator=g).bfloat16()
    B = torch.randn(256, 8, device="cuda", generator=g).bfloat16()
    ref = kernels.lora_merged_weight(w0, A, B, 0.5)          # W0 + sBA rounded once
    got = kernels.lora_merged_weight(w0.bfloat16(), A, B, 0.5)  # W0 rounded, then W0 + sBA rounded
    assert got.dtype == ref.dtype == torch.bfloat16
    exact = w0 + 0.5 * B.float() @ A.float()
    half_ulp = 2.0 ** -8  # bf16 keeps 8 significant bits: one rounding moves x by at most |x| 2^-8
    slack = 1e-5 * exact.abs().max()  # the kernel's fp32 sum against this one
    assert ((ref.float() - exact).abs() <= exact.abs() * half_ulp + slack).all()  # rounded once
    # rounded twice: W0 (by at most |W0| 2^-8), then the sum
    assert ((got.float() - exact).abs() <= (w0.abs() + exact.abs()) * half_ulp * (1 + half_ulp) + slack).all()
    assert not torch.equal(got, ref)  # the rebuild rounds once more: not the same tensor


@pytest.mark.parametrize("targets", [ALL_GPT, ["q_proj", "v_proj"]])  # adapted and plain nn.Linear layers
def test_what_is_cast_and_what_stays_fp32(targets):
    model = gpt("lora", targets=targets)
    names = frozen.enable(model)
    want = {f"layers.{i}.{part}.{proj}.{attr}" for i in range(TINY_GPT["n_layer"]) for attr in ("weight", "bias")
            for part, projs in (("attn", ALL_GPT[:4]), ("mlp", ALL_GPT[4:])) for proj in projs}
    assert sorted(names) == sorted(want)
    for n, p in model.named_parameters():  # the trainable factors, embeddings and LayerNorms stay fp32
        assert p.dtype == (torch.bfloat16 if n in want else torch.float32), n
    assert frozen.enable(model) == []  # nothing left to cast


def test_a_classifier_keeps_its_trainable_head_and_embeddings_in_fp32():
    torch.manual_seed(0)
    model = BertClassifier(BertConfig(**TINY_BERT, dropout=0.0), num_labels=3)
    build_method(model, "lora", {"r": 2, "targets": ["q_proj", "v_proj"]})
    cast = frozen.enable(model)
    assert cast and all(model.get_parameter(n).dtype == torch.bfloat16 for n in cast)
    for n, p in model.named_parameters():
        if n not in cast:
            assert p.dtype == torch.float32, n
    assert not any("embeddings" in n or "classifier" in n or "lora_" in n or "norm" in n.lower() for n in cast)


def test_a_model_with_dora_layers_is_left_as_it_is():
    model = gpt("dora")
    assert frozen.applies(model) == "DoRA layers read W0 outside a matmul"
    assert frozen.enable(model) == []
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_a_head_tied_to_an_embedding_stays_fp32_and_a_shared_weight_counts_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head, self.proj = nn.Embedding(11, 4), nn.Linear(4, 11, bias=False), nn.Linear(4, 4)
            self.head.weight = self.emb.weight
            self.again = nn.Linear(4, 4)
            self.again.weight = self.proj.weight  # one parameter in two modules
    model = Tied().requires_grad_(False)
    assert sorted(frozen.enable(model)) == ["again.bias", "proj.bias", "proj.weight"]
    assert model.emb.weight.dtype == model.head.weight.dtype == torch.float32
    assert model.again.weight.dtype == torch.bfloat16


def test_disable_puts_fp32_back_with_the_rounded_values():
    model = gpt("lora")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cast = frozen.enable(model)
    assert sorted(frozen.disable(model)) == sorted(cast)
    for n, p in model.named_parameters():
        assert p.dtype == torch.float32
        want = before[n].to(torch.bfloat16).float() if n in cast else before[n]
        assert torch.equal(p.detach(), want), n


def test_evaluate_runs_a_cast_model_under_autocast_and_leaves_other_models_alone():
    ref = gpt("lora")
    bf = copy.deepcopy(ref)
    frozen.enable(bf)
    batches = [lm_batch(s) for s in range(3)]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the caller's autocast: evaluate keeps it
        want = evaluate(ref, batches, "causal-lm")
    got = evaluate(bf, batches, "causal-lm")  # no autocast given: evaluate enters bf16 autocast itself
    assert got == want
    assert evaluate(ref, batches, "causal-lm") != want  # fp32 model, no autocast: fp32 matmuls
