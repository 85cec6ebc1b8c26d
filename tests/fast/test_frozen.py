"""minift.fast.frozen against the fp32 frozen base: under autocast a stack of linear layers reads the
bf16 weights autocast would have made, so its step is exactly the reference's (the Triton rebuild
of LoRA's merged weight within one bf16 rounding); a whole model, whose embeddings and norms are
rounded too, is within bf16's rounding of it, every registry method; which parameters it casts
and which it leaves; and evaluation of a model so cast."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import TINY_BERT, TINY_GPT
from minift import fast
from minift.fast import frozen, kernels
from minift.methods import lora
from minift.methods.registry import build_method
from minift.models.bert import BertClassifier, BertConfig
from minift.models.gpt import GPT, GPTConfig
from minift.models.llama import Llama, LlamaConfig
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


def randomize_adapters(model):
    with torch.no_grad():  # B = 0 (LoRA) and E = 0 (AdaLoRA) at init would hide their part of the forward
        for n, p in model.named_parameters():
            if "lora_B" in n or "lora_E" in n:
                p.normal_(0, 0.1)


class Stack(nn.Module):
    """Three frozen linear layers, two adapted by LoRA (on the merged forward when ``merged``), no
    embedding or norm: every frozen parameter is read through a matmul only."""

    def __init__(self, merged: bool):
        super().__init__()
        torch.manual_seed(0)
        self.q_proj, self.mid, self.v_proj = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 8)
        lora.apply(self, lora.LoRAConfig(r=4, alpha=8, targets=("q_proj", "v_proj")))
        randomize_adapters(self)
        if merged:
            fast.lora.enable(self, merged=True)

    def forward(self, x):
        return self.v_proj(F.gelu(self.mid(F.gelu(self.q_proj(x)))))


@pytest.mark.parametrize("merged", [False, True])
def test_a_stack_of_linear_layers_under_autocast_is_exactly_the_reference(merged):
    """Off CUDA the merged weight is rebuilt by addmm, which rounds W0 to bf16 first in the reference
    too: merged or not, the step is the reference's bit for bit."""
    ref = Stack(merged)
    bf = copy.deepcopy(ref)
    assert len(frozen.enable(bf)) == 6  # the three weights and biases (two of them W0 and b0)
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(1))
    out = {}
    for name, m in (("ref", ref), ("bf", bf)):
        m.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(x).float().square().mean()
        loss.backward()
        out[name] = (loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad})
    assert torch.equal(out["ref"][0], out["bf"][0])
    assert out["ref"][1].keys() == out["bf"][1].keys() and out["ref"][1]
    for n, g in out["ref"][1].items():
        assert torch.equal(g, out["bf"][1][n]), n


METHODS = [("lora", {}), ("lora", {"dropout": 0.0, "rslora": True}), ("dora", {}), ("adalora", {}),
           ("prefix", {"num_virtual_tokens": 3}), ("prompt", {"num_virtual_tokens": 3}), ("freeze", {}),
           ("bitfit", {})]


def step_fp32(model, batch):
    """Loss and every trainable gradient of one step in fp32, no autocast: the exact values."""
    model.zero_grad(set_to_none=True)
    model_forward(model, batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def rel_error(grads, exact):
    """The trainable gradients' distance from ``exact``, relative to its norm, all tensors together."""
    return (sum((grads[n] - exact[n]).norm() ** 2 for n in exact) / sum(g.norm() ** 2 for g in exact.values())).sqrt()


@pytest.mark.parametrize("method, options", METHODS)
def test_under_autocast_a_bf16_base_adds_no_more_error_than_autocast(method, options):
    """Embeddings, LayerNorms and the linear weights (those exactly as autocast casts them) in bf16:
    against the exact fp32 step, the gradients of a step with the bf16 base are within twice the
    error of autocast with the fp32 base, every registry method that takes it."""
    ref = gpt(method, **options)
    randomize_adapters(ref)
    bf = copy.deepcopy(ref)
    cast = frozen.enable(bf)
    # BitFit's LayerNorms train their biases: both their parameters stay fp32 (frozen_parameters)
    assert "wte.weight" in cast and any(".ln_" in n for n in cast) != (method == "bitfit"), cast
    assert_no_more_error_than_autocast(ref, bf, lm_batch())


def assert_no_more_error_than_autocast(ref, bf, batch):
    exact = step_fp32(ref, batch)
    _, grads = step(ref, batch)
    _, grads_bf = step(bf, batch)
    assert grads_bf.keys() == exact.keys() and exact
    assert rel_error(grads_bf, exact) <= 2 * rel_error(grads, exact) + 1e-3


def test_llama_and_a_bert_classifier_too():
    """Llama (RMSNorm, rotary cos and sin in the residual stream's dtype, an untied head) and a BERT
    classifier (post-norm, a trained head) with LoRA: the same bound as the GPT's."""
    torch.manual_seed(0)
    llama = Llama(LlamaConfig(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, n_inner=64,
                              max_position_embeddings=64))
    build_method(llama, "lora", {"r": 4, "targets": ALL_GPT + ["gate_proj"]})
    bert = BertClassifier(BertConfig(**TINY_BERT, dropout=0.0), num_labels=3)
    build_method(bert, "lora", {"r": 4, "targets": ["q_proj", "v_proj"]})
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    batches = {llama: {"input_ids": ids, "attention_mask": None, "labels": ids},
               bert: {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 2])}}
    for model, batch in batches.items():
        randomize_adapters(model)
        bf = copy.deepcopy(model)
        cast = frozen.enable(bf)
        assert any("emb" in n for n in cast) and any("norm" in n or ".ln" in n for n in cast), cast
        assert_no_more_error_than_autocast(model, bf, batch)


def test_adam_steps_from_a_bf16_base_follow_the_fp32_base():
    """A few AdamW steps of LoRA on the tiny GPT: the loss curve with the frozen base in bf16 stays
    within 0.2% of the fp32 base's."""
    curves = []
    for cast in (False, True):
        model = gpt("lora")
        if cast:
            frozen.enable(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        curve = []
        for i in range(8):
            loss, _ = step(model, lm_batch(seed=i % 2))
            opt.step()
            curve.append(loss.item())
        curves.append(curve)
    assert curves[0][-1] < curves[0][0] - 0.05  # it trains
    for a, b in zip(*curves):
        assert abs(a - b) <= 2e-3 * a, curves


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


@pytest.mark.parametrize("method", ["lora", "dora", "prefix", "full"])
def test_every_frozen_parameter_is_cast_and_every_trainable_one_stays_fp32(method):
    model = gpt(method)
    names = frozen.enable(model)
    want = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert sorted(names) == sorted(want) and (bool(want) != (method == "full"))
    assert "wte.weight" in want or method == "full"  # the embedding, and the head tied to it, once
    for n, p in model.named_parameters():
        assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), n
    assert frozen.enable(model) == []  # nothing left to cast


def test_a_classifier_keeps_its_trainable_head_and_adapters_in_fp32():
    torch.manual_seed(0)
    model = BertClassifier(BertConfig(**TINY_BERT, dropout=0.0), num_labels=3)
    build_method(model, "lora", {"r": 2, "targets": ["q_proj", "v_proj"]})
    cast = frozen.enable(model)
    assert any("embeddings" in n for n in cast) and any(".ln." in n for n in cast)
    for n, p in model.named_parameters():
        assert p.dtype == (torch.bfloat16 if n in cast else torch.float32), n
        assert (n in cast) != p.requires_grad, n
    assert any("classifier" in n for n, p in model.named_parameters() if p.requires_grad)


def test_a_parameter_shared_by_two_modules_is_cast_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Embedding(11, 4), nn.Linear(4, 11, bias=False)
            self.head.weight = self.emb.weight
    model = Tied().requires_grad_(False)
    assert frozen.enable(model) == ["emb.weight"]
    assert model.head.weight is model.emb.weight and model.head.weight.dtype == torch.bfloat16


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
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the caller's autocast
        want_bf, want_ref = evaluate(bf, batches, "causal-lm"), evaluate(ref, batches, "causal-lm")
    assert evaluate(bf, batches, "causal-lm") == want_bf  # no autocast given: evaluate enters bf16 autocast
    got_ref = evaluate(ref, batches, "causal-lm")  # an fp32 model, no autocast: fp32 matmuls
    assert got_ref != want_ref and abs(got_ref["loss"] - want_bf["loss"]) < 1e-3
