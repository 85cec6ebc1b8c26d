"""LoRA: algebraic properties (hypothesis), variants, errors, and a short training run."""
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import TINY_GPT, Toy
from minift import adapters
from minift.methods import lora
from minift.methods.lora import DoRALinear, LoRAConfig, LoRALinear
from minift.models.gpt import GPT, GPTConfig
from minift.training.loop import model_forward

SETTINGS = settings(max_examples=20, deadline=None)




toy_case = st.fixed_dictionaries(dict(
    d_in=st.integers(2, 24), d_hid=st.integers(2, 24), d_out=st.integers(2, 24), bias=st.booleans(),
    r=st.integers(1, 8), alpha=st.floats(0.5, 32.0), rslora=st.booleans(), dora=st.booleans(),
    init=st.sampled_from(["default", "gaussian"]), seed=st.integers(0, 2**16)))


def _toy(case):
    torch.manual_seed(case["seed"])
    model = Toy(case["d_in"], case["d_hid"], case["d_out"], case["bias"])
    r = min(case["r"], case["d_in"], case["d_hid"], case["d_out"])
    cfg = LoRAConfig(r=r, alpha=case["alpha"], targets=("up", "down"), rslora=case["rslora"],
                     dora=case["dora"], init=case["init"], modules_to_save=("head",))
    x = torch.randn(5, case["d_in"])
    return model, cfg, x


def _train_b(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "lora_magnitude" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


@SETTINGS
@given(toy_case)
def test_init_is_exactly_the_base_model(case):
    model, cfg, x = _toy(case)
    before = model(x)
    assert lora.apply(model, cfg) == ["up", "down"]
    assert torch.equal(model(x), before)


@SETTINGS
@given(toy_case)
def test_merge_equals_unmerged_and_unmerge_restores(case):
    model, cfg, x = _toy(case)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    lora.apply(model, cfg)
    _train_b(model)
    y = model(x).detach()
    lora.merge(model, safe=True)
    assert all(m.merged for _, m in lora.lora_modules(model))
    y_merged = model(x).detach()
    assert (y_merged - y).abs().max() <= 1e-5 * y.abs().max().clamp(min=1.0)
    # float32 cancellation: (W0 + dW) - dW loses ~eps * |W0 + dW|, so the bound is relative to it;
    # DoRA's unmerge also divides by the magnitude factor first (a few more roundings)
    k = 4.0 if case["dora"] else 1.0
    scale = {n: k * max(1.0, model.get_parameter(n).abs().max().item()) for n in ("up.weight", "down.weight")}
    lora.unmerge(model)
    for n in ("up.weight", "down.weight"):
        torch.testing.assert_close(model.get_parameter(n), w0[n], atol=1e-6 * scale[n], rtol=1e-6)
    # the restored weights carry that cancellation error into the output: bound it as the merge's
    assert (model(x).detach() - y).abs().max() <= 1e-5 * y.abs().max().clamp(min=1.0)


@SETTINGS
@given(toy_case)
def test_only_adapters_and_modules_to_save_get_gradients(case):
    model, cfg, x = _toy(case)
    lora.apply(model, cfg)
    _train_b(model)
    model(x).square().sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    expected = {f"{m}.lora_{p}" for m in ("up", "down") for p in (["A", "B", "magnitude"] if cfg.dora else ["A", "B"])}
    expected |= {"head.weight", "head.bias"}
    assert with_grad == expected
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected


@SETTINGS
@given(toy_case, st.sampled_from(["default", "gaussian", "pissa"]))
def test_save_load_is_bit_exact(tmp_path_factory, case, init):
    model, cfg, x = _toy(case)
    cfg = LoRAConfig(**{**cfg.__dict__, "init": init})
    lora.apply(model, cfg)
    _train_b(model)
    d = tmp_path_factory.mktemp("ad")
    adapters.save_adapter(model, d, layout="minift")
    fresh, _, _ = _toy(case)  # same seed: same base weights, no LoRA yet
    adapters.load_adapter(fresh, d)
    assert fresh.state_dict().keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    assert torch.equal(fresh(x), model(x))


gpt_case = st.fixed_dictionaries(dict(
    targets=st.sets(st.sampled_from(["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]),
                    min_size=1), r=st.integers(1, 4), alpha=st.floats(1.0, 16.0), rslora=st.booleans(),
    dora=st.booleans(), layout=st.sampled_from(["peft", "minift"])))


@settings(max_examples=12, deadline=None)
@given(gpt_case)
def test_gpt_save_load_into_adapted_model_is_bit_exact(tmp_path_factory, case):
    def make():
        torch.manual_seed(0)
        m = GPT(GPTConfig(**TINY_GPT)).eval()
        lora.apply(m, LoRAConfig(r=case["r"], alpha=case["alpha"], targets=tuple(sorted(case["targets"])),
                                 rslora=case["rslora"], dora=case["dora"]))
        return m
    model = make()
    _train_b(model)
    d = tmp_path_factory.mktemp("ad")
    adapters.save_adapter(model, d, layout=case["layout"])
    other = make()
    adapters.load_adapter(other, d)
    for (n, a), (_, b) in zip(other.named_parameters(), model.named_parameters()):
        assert torch.equal(a, b), n


def test_pissa_moves_the_principal_part_into_the_adapter():
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    w0 = base.weight.detach().clone()
    m = LoRALinear(base, r=3, alpha=6.0, init="pissa")
    U, S, Vh = torch.linalg.svd(w0, full_matrices=False)
    torch.testing.assert_close(m.delta_weight(), U[:, :3] @ torch.diag(S[:3]) @ Vh[:3], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.weight + m.delta_weight(), w0, atol=1e-5, rtol=1e-5)  # residual + principal
    x = torch.randn(4, 16)
    torch.testing.assert_close(m(x), x @ w0.T + base.bias, atol=1e-5, rtol=1e-5)


def test_scaling_rslora_dropout_and_init_shapes():
    lin = nn.Linear(10, 6)
    m = LoRALinear(lin, r=4, alpha=8.0)
    assert m.weight is lin.weight and m.bias is lin.bias  # same Parameter objects
    assert m.lora_A.shape == (4, 10) and m.lora_B.shape == (6, 4) and not m.lora_B.any()
    assert m.scaling == 2.0 and LoRALinear(lin, r=4, alpha=8.0, rslora=True).scaling == 4.0
    assert DoRALinear(lin, r=4, alpha=8.0).lora_magnitude.shape == (6,)
    d = LoRALinear(nn.Linear(10, 6), r=2, alpha=2.0, dropout=0.5).train()
    nn.init.normal_(d.lora_B)
    x = torch.randn(3, 10)
    torch.manual_seed(0)
    y = d(x)
    torch.manual_seed(0)
    xd = nn.functional.dropout(x, 0.5, training=True)  # the same mask: dropout only on the LoRA path
    want = nn.functional.linear(x, d.weight, d.bias) + d.scaling * xd @ d.lora_A.T @ d.lora_B.T
    torch.testing.assert_close(y, want)
    assert not torch.allclose(y, d.eval()(x))


def test_unload_gives_plain_linears_with_merged_weights(tiny_gpt):
    x = torch.randint(0, 97, (2, 7))
    lora.apply(tiny_gpt, LoRAConfig(r=4, targets=("q_proj", "v_proj", "up_proj"), dora=True))
    _train_b(tiny_gpt)
    want = tiny_gpt(x).logits.detach()
    out = lora.unload(tiny_gpt)
    assert out is tiny_gpt and not lora.lora_modules(out)
    assert type(out.layers[0].attn.q_proj) is nn.Linear
    assert set(out.state_dict()) == set(GPT(GPTConfig(**TINY_GPT)).state_dict())
    torch.testing.assert_close(out(x).logits, want, atol=1e-5, rtol=1e-5)


def test_count_trainable_and_summary(tiny_gpt):
    total = sum(p.numel() for p in tiny_gpt.parameters())
    lora.apply(tiny_gpt, LoRAConfig(r=4, targets=("q_proj", "v_proj")))
    assert lora.count_trainable(tiny_gpt) == (2 * 2 * (4 * 32 + 32 * 4), total + 1024)
    assert lora.summary(tiny_gpt) == (f"trainable params: 1,024 || all params: {total + 1024:,} || "
                                      f"trainable%: {100 * 1024 / (total + 1024):.4f}")


def test_loraplus_param_groups(tiny_gpt):
    lora.apply(tiny_gpt, LoRAConfig(r=2, targets=("q_proj",), dora=True, modules_to_save=("ln_f",)))
    groups = lora.param_groups(tiny_gpt, lr=1e-3, ratio=16.0, weight_decay=0.1)
    by_id = {id(p): g for g in groups for p in g["params"]}
    for n, p in tiny_gpt.named_parameters():
        assert (id(p) in by_id) == p.requires_grad, n
        if p.requires_grad:
            g = by_id[id(p)]
            assert g["lr"] == pytest.approx(16e-3 if n.endswith("lora_B") else 1e-3), n
            assert g["weight_decay"] == (0.1 if p.ndim == 2 else 0.0), n
    torch.optim.AdamW(groups)  # accepted as is


def test_short_training_run_lowers_the_loss():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY_GPT))
    lora.apply(model, LoRAConfig(r=4, alpha=8, targets=("q_proj", "v_proj", "up_proj")))
    ids = torch.randint(0, 97, (2, 12))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    opt = torch.optim.AdamW(lora.param_groups(model, lr=3e-3, ratio=4.0))
    losses = []
    for _ in range(12):
        loss = model_forward(model, batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_config_validation():
    for bad, word in [(dict(r=0), "r"), (dict(alpha=-1), "alpha"), (dict(dropout=1.0), "dropout"),
                      (dict(init="xavier"), "init"), (dict(targets=()), "targets")]:
        with pytest.raises(ValueError, match=word):
            LoRAConfig(**bad)


def test_unknown_target_lists_available_names(tiny_gpt):
    with pytest.raises(ValueError, match=r"'c_attn'.*available names: down_proj, k_proj, o_proj"):
        lora.apply(tiny_gpt, LoRAConfig(targets=("c_attn",)))


def test_rank_too_large_names_the_module(tiny_gpt):
    with pytest.raises(ValueError, match=r"r=33 is too large for layers\.0\.attn\.q_proj"):
        lora.apply(tiny_gpt, LoRAConfig(r=33))
    assert not lora.lora_modules(tiny_gpt)  # nothing was changed


def test_merge_safe_refuses_non_finite(tiny_gpt):
    lora.apply(tiny_gpt, LoRAConfig(r=2))
    before = {n: p.detach().clone() for n, p in tiny_gpt.named_parameters()}
    with torch.no_grad():
        tiny_gpt.layers[1].attn.v_proj.lora_B.fill_(float("inf"))
    with pytest.raises(ValueError, match=r"layers\.1\.attn\.v_proj"):
        lora.merge(tiny_gpt, safe=True)
    for n, p in tiny_gpt.named_parameters():  # not even layer 0 was merged
        assert "lora_B" in n or torch.equal(p, before[n]), n
    assert not any(m.merged for _, m in lora.lora_modules(tiny_gpt))


def test_dora_keeps_no_weight_sized_tensor_for_backward():
    """DoRA's row norm ||W0 + sBA|| is a constant (no graph): nothing of the weight's size stays
    alive for backward, and the magnitude still gets its gradient."""
    import weakref
    layer = DoRALinear(nn.Linear(12, 10).requires_grad_(False), r=2, alpha=4)
    with torch.no_grad():
        layer.lora_B.normal_()
    refs = []

    class Box:
        def __init__(self, t):
            self.t = t

    def pack(t):
        refs.append(weakref.ref(box := Box(t)))
        return box

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda b: b.t):
        y = layer(torch.randn(5, 12))
    alive = [tuple(r().t.shape) for r in refs if r() is not None]
    assert alive and (10, 12) not in alive, alive
    y.sum().backward()
    assert layer.lora_magnitude.grad is not None and layer.lora_A.grad is not None


def test_dora_under_autocast_stays_in_the_activation_dtype():
    """Under bf16 autocast DoRA's output is bf16 (an fp32 factor would promote it to fp32), equals
    the base layer's output exactly at init, and still follows a small change of the magnitude
    (f - 1 is formed in fp32 before it is rounded)."""
    torch.manual_seed(0)
    base = nn.Linear(32, 24).requires_grad_(False)
    layer = DoRALinear(base, r=4, alpha=8)
    x = torch.randn(6, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y0, want0 = layer(x), base(x)
    assert y0.dtype == torch.bfloat16 and torch.equal(y0, want0)
    with torch.no_grad():
        layer.lora_magnitude.mul_(1 + 3e-3)  # f = 1.003: 1 + 3e-3 rounds to 1.0 in bf16, 3e-3 does not
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y1 = layer(x)
    want1 = layer(x)  # fp32 reference
    assert not torch.equal(y1, y0)
    torch.testing.assert_close(y1.float(), want1, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close((y1.float() - y0.float()).abs().mean(), (want1 - base(x)).abs().mean(), rtol=0.2, atol=0)


@pytest.mark.parametrize("dora", [False, True])
def test_lora_keeps_the_mode_of_the_layer_it_wraps(dora):
    """apply on a model in eval mode: the new layers are in eval mode too, so their dropout draws
    nothing and the same input gives the same output; model.train() then turns it on."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(**TINY_GPT, dropout=0.0)).eval()
    lora.apply(m, LoRAConfig(r=2, targets=("q_proj", "v_proj"), dropout=0.5, dora=dora))
    assert not any(x.training for x in m.modules())
    with torch.no_grad():
        for x in lora.lora_modules(m):
            x[1].lora_B.add_(0.3)
        ids = torch.randint(0, 97, (2, 7))
        assert torch.equal(m(ids).logits, m(ids).logits)
        m.train()
        assert not torch.equal(m(ids).logits, m(ids).logits)
