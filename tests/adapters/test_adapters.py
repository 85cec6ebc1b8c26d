"""Adapter files: minift layout round trip, PEFT interop both ways (peft is the oracle), bad input."""
import json

import pytest
import torch

from conftest import hf_bert, hf_gpt2
from minift import adapters
from minift.methods import lora
from minift.models.bert import BertClassifier
from conftest import TINY_GPT
from minift.models.gpt import GPT, GPTConfig

IDS = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))


def _randomize(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if "magnitude" in n else 0.0))


def _peft_logits(hf_model, adapter_dir, **kw):
    peft = pytest.importorskip("peft")
    pm = peft.PeftModel.from_pretrained(hf_model, str(adapter_dir)).eval()
    with torch.no_grad():
        return pm(**kw).logits


@pytest.mark.parametrize("targets,dora,rslora", [(("q_proj", "v_proj"), False, False),
                                                 (("q_proj", "k_proj", "v_proj"), False, True),
                                                 (("q_proj", "v_proj", "o_proj", "down_proj"), True, False)])
def test_gpt2_minift_adapter_loads_in_peft(tmp_path, targets, dora, rslora):
    hf, d = hf_gpt2(tmp_path / "base")
    model = GPT.from_pretrained(d).eval()
    lora.apply(model, lora.LoRAConfig(r=2, alpha=5, targets=targets, dora=dora, rslora=rslora))
    _randomize(model)
    adapters.save_adapter(model, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["fan_in_fan_out"] is True
    want = _peft_logits(hf, tmp_path / "ad", input_ids=IDS)
    with torch.no_grad():
        got = model(IDS).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        assert (GPT.from_pretrained(d)(IDS).logits - want).abs().max() > 1e-2  # the adapter is not a no-op
    # and back: the PEFT-layout file loads into a fresh minift model with the same logits
    fresh = adapters.load_adapter(GPT.from_pretrained(d).eval(), tmp_path / "ad")
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDS).logits, got, atol=1e-5, rtol=1e-5)
    # and into a model that already has the same LoRA layers (block-structured c_attn split back)
    again = GPT.from_pretrained(d).eval()
    lora.apply(again, lora.LoRAConfig(r=2, alpha=5, targets=targets, dora=dora, rslora=rslora))
    adapters.load_adapter(again, tmp_path / "ad")
    for (n, a), (_, b) in zip(again.named_parameters(), model.named_parameters()):
        assert torch.equal(a, b), n


def test_bert_classifier_minift_adapter_loads_in_peft(tmp_path):
    hf, d = hf_bert(tmp_path / "base", classifier=True)
    model = BertClassifier.from_pretrained(d, num_labels=3).eval()
    lora.apply(model, lora.LoRAConfig(r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"),
                                      modules_to_save=("classifier",)))
    _randomize(model)
    adapters.save_adapter(model, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert "bert.encoder.layer.0.output.dense" in cfg["target_modules"]  # "dense" alone would over-match
    ids = IDS.clamp(max=98)
    want = _peft_logits(hf, tmp_path / "ad", input_ids=ids)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dora", [False, True])
def test_peft_written_adapter_loads_into_minift(tmp_path, dora):
    peft = pytest.importorskip("peft")
    hf, d = hf_gpt2(tmp_path / "base")
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=3, lora_alpha=7, target_modules=["c_attn", "c_fc"],
                                                 fan_in_fan_out=True, use_dora=dora, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn_like(p) * 0.3)  # non-zero B, and a moved magnitude
    pm.eval().save_pretrained(tmp_path / "ad")
    with torch.no_grad():
        want = pm(input_ids=IDS).logits
        assert (GPT.from_pretrained(d)(IDS).logits - want).abs().max() > 1e-2  # the adapter is not a no-op
    model = adapters.load_adapter(GPT.from_pretrained(d).eval(), tmp_path / "ad")
    assert isinstance(model.layers[0].attn.k_proj, lora.LoRALinear) and model.layers[0].attn.k_proj.r == 3
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, want, atol=1e-4, rtol=1e-4)


def test_peft_written_bert_classifier_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    hf, d = hf_bert(tmp_path / "base", classifier=True)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"],
                                                 task_type="SEQ_CLS", use_rslora=True))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    pm.eval().save_pretrained(tmp_path / "ad")
    ids = IDS.clamp(max=98)
    with torch.no_grad():
        want = pm(input_ids=ids).logits
    model = adapters.load_adapter(BertClassifier.from_pretrained(d, num_labels=3).eval(), tmp_path / "ad")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, atol=1e-4, rtol=1e-4)


def test_adapter_for_another_model_shape_is_an_error_naming_the_key(tmp_path):
    torch.manual_seed(0)
    small = GPT(GPTConfig(**TINY_GPT))
    lora.apply(small, lora.LoRAConfig(r=2, targets=("q_proj", "o_proj")))
    wide = dict(TINY_GPT, n_embd=48)
    for layout in ("peft", "minift"):
        adapters.save_adapter(small, tmp_path / layout, layout=layout)
        target = GPT(GPTConfig(**wide))
        before = {k: v.clone() for k, v in target.state_dict().items()}
        with pytest.raises(ValueError, match=r"(layers\.0\.attn\.|transformer\.h\.0\.attn\.).*another shape"):
            adapters.load_adapter(target, tmp_path / layout)
        assert not lora.lora_modules(target)  # a failed load leaves the model as it was
        assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
    deeper = GPT(GPTConfig(**dict(TINY_GPT, n_layer=1)))  # the file has a layer this model lacks
    with pytest.raises(ValueError, match=r"transformer\.h\.1\.attn\.c_attn"):
        adapters.load_adapter(deeper, tmp_path / "peft")
    with pytest.raises(ValueError, match=r"layers\.1\.attn"):
        adapters.load_adapter(GPT(GPTConfig(**dict(TINY_GPT, n_layer=1))), tmp_path / "minift")


def test_missing_adapter_and_model_without_adapter(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no adapter"):
        adapters.load_adapter(GPT(GPTConfig(**TINY_GPT)), tmp_path)
    with pytest.raises(ValueError, match="carries no adapter"):
        adapters.save_adapter(GPT(GPTConfig(**TINY_GPT)), tmp_path)
    with pytest.raises(ValueError, match="layout"):
        adapters.save_adapter(GPT(GPTConfig(**TINY_GPT)), tmp_path, layout="hf")


# ---------------------------------------------------------------------------- a failed load changes nothing

def _classifier(num_labels, seed=0):
    from conftest import TINY_BERT
    from minift.models.bert import BertConfig
    torch.manual_seed(seed)
    return BertClassifier(BertConfig(**TINY_BERT, dropout=0.0), num_labels=num_labels).eval()


def _adapt(model, method, init="default"):
    from minift.methods import adalora
    if method == "lora":
        lora.apply(model, lora.LoRAConfig(r=2, alpha=4, targets=("q_proj", "v_proj", "down_proj"), init=init,
                                          modules_to_save=("classifier",)))
    else:
        adalora.apply(model, adalora.AdaLoRAConfig(init_r=3, target_r=1, alpha=8, targets=("q_proj", "v_proj"),
                                                   tinit=1, tfinal=1, delta_t=1, total_step=4,
                                                   modules_to_save=("classifier",)))
    return model


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


@pytest.mark.parametrize("method,layout,init", [("lora", "peft", "default"), ("lora", "minift", "default"),
                                                ("lora", "minift", "pissa"), ("adalora", "peft", "default"),
                                                ("adalora", "minift", "default")])
def test_failed_load_into_plain_model_leaves_base_bit_identical(tmp_path, method, layout, init):
    from minift.methods import adalora
    src = _adapt(_classifier(2), method, init)
    _randomize(src)  # non-zero trained B (and Λ), a trained 2-label classifier
    assert all(m.lora_B.abs().sum() > 0 for _, m in lora.lora_modules(src) + adalora.svd_modules(src))
    adapters.save_adapter(src, tmp_path, layout=layout)
    target = _classifier(3, seed=1)
    before, modules = _state(target), dict(target.named_modules())
    flags = {n: p.requires_grad for n, p in target.named_parameters()}
    with pytest.raises(ValueError, match=r"classifier.*another shape"):
        adapters.load_adapter(target, tmp_path)
    _assert_same(target, before)  # every base parameter bit-identical: nothing merged, nothing written
    assert not lora.lora_modules(target) and not adalora.svd_modules(target)
    assert not hasattr(target, "lora_config") and not hasattr(target, "adalora_config")
    assert all(m is modules[n] for n, m in target.named_modules())  # the original nn.Linear objects are back
    assert {n: p.requires_grad for n, p in target.named_parameters()} == flags


@pytest.mark.parametrize("method", ["lora", "adalora"])
@pytest.mark.parametrize("layout", ["peft", "minift"])
def test_failed_load_into_adapted_model_leaves_its_adapter_bit_identical(tmp_path, method, layout):
    src = _adapt(_classifier(2), method)
    _randomize(src)
    adapters.save_adapter(src, tmp_path, layout=layout)
    target = _adapt(_classifier(3, seed=1), method)
    _randomize(target, seed=7)  # its own trained adapter and classifier
    before = _state(target)
    with pytest.raises(ValueError, match=r"classifier.*another shape"):
        adapters.load_adapter(target, tmp_path)
    _assert_same(target, before)  # no adapter tensor partly overwritten


# ---------------------------------------------------------------------------- minift layout: per-module settings

def _gpt_lora(**kw):
    torch.manual_seed(0)
    m = GPT(GPTConfig(**TINY_GPT)).eval()
    lora.apply(m, lora.LoRAConfig(**{"r": 2, "alpha": 8, "targets": ("q_proj", "v_proj"), **kw}))
    return m


@pytest.mark.parametrize("saved,model_kw,match", [
    ({}, {"alpha": 32}, r"layers\.0\.attn\.q_proj: .*alpha=8\b.*alpha=32"),
    ({}, {"dora": True}, r"layers\.0\.attn\.q_proj: .*dora=False.*dora=True"),
    ({"dora": True}, {}, r"dora=True.*dora=False"),
    ({}, {"rslora": True}, r"rslora=False.*rslora=True"),
    ({}, {"r": 3}, r"r=2.*r=3"),
    ({}, {"targets": ("q_proj", "k_proj", "v_proj")}, r"layers\.0\.attn\.k_proj.*has none"),
])
def test_minift_lora_file_must_match_the_models_lora_layers(tmp_path, saved, model_kw, match):
    src = _gpt_lora(**saved)
    _randomize(src)
    adapters.save_adapter(src, tmp_path, layout="minift")
    target = _gpt_lora(**model_kw)
    _randomize(target, seed=5)
    before = _state(target)
    with pytest.raises(ValueError, match=match):
        adapters.load_adapter(target, tmp_path)
    _assert_same(target, before)
    same = _gpt_lora(**saved)  # the same settings load, and give the saved model's logits
    adapters.load_adapter(same, tmp_path)
    with torch.no_grad():
        assert torch.equal(same(IDS).logits, src(IDS).logits)


def test_minift_lora_file_missing_a_tensor_of_the_model_is_an_error(tmp_path):
    from safetensors.torch import load_file, save_file
    src = _gpt_lora(dora=True)
    _randomize(src)
    adapters.save_adapter(src, tmp_path, layout="minift")
    t = load_file(str(tmp_path / "adapter.safetensors"))
    del t["layers.1.attn.v_proj.lora_magnitude"]
    save_file(t, str(tmp_path / "adapter.safetensors"))
    target = _gpt_lora(dora=True)
    before = _state(target)
    with pytest.raises(ValueError, match=r"layers\.1\.attn\.v_proj\.lora_magnitude"):
        adapters.load_adapter(target, tmp_path)
    _assert_same(target, before)


def test_minift_adalora_file_must_match_the_models_scaling(tmp_path):
    from minift.methods import adalora

    def make(alpha):
        torch.manual_seed(0)
        m = GPT(GPTConfig(**TINY_GPT)).eval()
        adalora.apply(m, adalora.AdaLoRAConfig(init_r=3, target_r=1, alpha=alpha, targets=("q_proj", "v_proj"),
                                               tinit=1, tfinal=1, delta_t=1, total_step=4))
        return m
    src = make(8)
    _randomize(src)
    adapters.save_adapter(src, tmp_path, layout="minift")
    target = make(32)
    before = _state(target)
    with pytest.raises(ValueError, match=r"layers\.0\.attn\.q_proj: .*alpha=8\b.*alpha=32"):
        adapters.load_adapter(target, tmp_path)
    _assert_same(target, before)
    same = make(8)
    adapters.load_adapter(same, tmp_path)
    with torch.no_grad():
        assert torch.equal(same(IDS).logits, src(IDS).logits)
