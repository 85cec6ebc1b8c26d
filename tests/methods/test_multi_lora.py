"""Named LoRA adapters on one base: switching, mixed batches, merging (methods/multi_lora.py)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import TINY_GPT
from minift.methods import lora
from minift.methods.lora import LoRAConfig
from minift.methods.multi_lora import (MultiLoRALinear, add_adapter, adapter_names, delete_adapter, merge_adapter,
                                       mixed_batch, set_active, unmerge_adapter)
from minift.models.gpt import GPT, GPTConfig

ADAPTERS = {"a": LoRAConfig(r=2, alpha=4, targets=("q_proj", "v_proj")),
            "b": LoRAConfig(r=4, alpha=3, targets=("v_proj", "up_proj", "down_proj"), rslora=True),
            "c": LoRAConfig(r=1, alpha=8, targets=("o_proj",))}


def model_with_adapters(seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**TINY_GPT, dropout=0.0)).eval()
    for name, cfg in ADAPTERS.items():
        add_adapter(model, name, cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # every adapter moved off its zero start, so each one changes the output
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_adapters_have_their_own_ranks_and_targets():
    model = model_with_adapters()
    assert adapter_names(model) == ["a", "b", "c"]
    v = model.layers[0].attn.v_proj
    assert isinstance(v, MultiLoRALinear) and set(v.lora_A) == {"a", "b"}
    assert v.lora_A["a"].shape == (2, 32) and v.lora_B["b"].shape == (32, 4)
    assert set(model.layers[1].attn.o_proj.lora_A) == {"c"}
    keys = set(model.state_dict())
    assert "layers.0.attn.v_proj.lora_A.b" in keys and "layers.0.attn.v_proj.weight" in keys


def test_one_active_adapter_equals_plain_lora_with_the_same_factors():
    model = model_with_adapters()
    plain = GPT(GPTConfig(**TINY_GPT, dropout=0.0)).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" not in k})
    lora.apply(plain, ADAPTERS["b"])
    with torch.no_grad():
        for n, m in lora.lora_modules(plain):
            multi = model.get_submodule(n)
            m.lora_A.copy_(multi.lora_A["b"])
            m.lora_B.copy_(multi.lora_B["b"])
    set_active(model, "b")
    ids = torch.randint(0, 97, (2, 7))
    torch.testing.assert_close(logits(model, ids), logits(plain, ids), rtol=1e-6, atol=1e-6)


def test_switching_away_and_back_is_bit_exact_and_no_adapter_is_the_base():
    model = model_with_adapters()
    ids = torch.randint(0, 97, (2, 7))
    set_active(model, None)
    base = logits(model, ids)
    set_active(model, "a")
    first = logits(model, ids)
    assert (first - base).abs().max() > 1e-3
    for other in ("b", "c", None, "b"):
        set_active(model, other)
        logits(model, ids)
    set_active(model, "a")
    assert torch.equal(logits(model, ids), first)
    w = model.layers[0].attn.q_proj.weight
    assert w.data_ptr() == model.layers[0].attn.q_proj.weight.data_ptr()  # no copy of the base


@settings(max_examples=15, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", "c", None]), min_size=1, max_size=6), st.integers(0, 3))
def test_a_mixed_batch_equals_each_example_alone_with_its_adapter(names, seed):
    model = model_with_adapters(seed % 2)
    ids = torch.randint(0, 97, (len(names), 6), generator=torch.Generator().manual_seed(seed))
    with mixed_batch(model, names):
        mixed = logits(model, ids)
    for i, name in enumerate(names):
        set_active(model, name)
        torch.testing.assert_close(mixed[i], logits(model, ids[i:i + 1])[0], rtol=1e-5, atol=1e-5)


def test_mixed_generation_with_a_kv_cache_equals_each_row_alone():
    model = model_with_adapters()
    names = ["b", None, "a"]
    prompt = torch.randint(0, 97, (3, 4), generator=torch.Generator().manual_seed(5))
    with mixed_batch(model, names):
        mixed = model.generate(prompt, max_new_tokens=6, temperature=0)
    for i, name in enumerate(names):
        set_active(model, name)
        assert torch.equal(model.generate(prompt[i:i + 1], max_new_tokens=6, temperature=0)[0], mixed[i])


def test_gradients_of_a_mixed_batch_reach_each_adapter_only_from_its_rows():
    model = model_with_adapters()
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    ids = torch.randint(0, 97, (3, 6), generator=torch.Generator().manual_seed(2))
    with mixed_batch(model, ["a", "a", "b"]):
        model(ids, ids).loss.backward()
    assert model.layers[0].attn.q_proj.lora_B["a"].grad.abs().sum() > 0
    assert model.layers[0].attn.v_proj.lora_B["b"].grad.abs().sum() > 0
    assert model.layers[0].attn.o_proj.lora_B["c"].grad is None  # no row used c


def test_merge_and_unmerge_by_name():
    model = model_with_adapters()
    ids = torch.randint(0, 97, (2, 7))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    set_active(model, "b")
    want_b = logits(model, ids)
    set_active(model, "a")
    want_a = logits(model, ids)
    merge_adapter(model, "a")
    torch.testing.assert_close(logits(model, ids), want_a, rtol=1e-5, atol=1e-5)
    set_active(model, "b")  # a is merged: b's rows take it back out
    torch.testing.assert_close(logits(model, ids), want_b, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="'a' is merged into the base weight; unmerge it"):
        with mixed_batch(model, ["a", "b"]):
            model(ids)
    unmerge_adapter(model)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=1e-6)


def test_delete_and_bad_names():
    model = model_with_adapters()
    delete_adapter(model, "b")
    assert adapter_names(model) == ["a", "c"]
    assert not any(".b" in k for k in model.state_dict() if "lora_" in k)
    with pytest.raises(ValueError, match="no adapter named 'b'; the model has a, c"):
        set_active(model, "b")
    with pytest.raises(ValueError, match="no adapter named 'zz'"):
        with mixed_batch(model, ["a", "zz"]):
            pass
    with pytest.raises(ValueError, match="already has an adapter named 'a'"):
        add_adapter(model, "a", ADAPTERS["a"])
    with pytest.raises(ValueError, match="plain identifier"):
        add_adapter(model, "x.y", ADAPTERS["a"])
    with pytest.raises(ValueError, match="named adapters are plain LoRA"):
        add_adapter(model, "d", LoRAConfig(r=2, dora=True))


# ---------------------------------------------------------------------------- files, both ways with PEFT

def test_named_adapters_round_trip_and_load_in_peft(tmp_path):
    from conftest import hf_gpt2
    from minift.adapters.multi import load_adapters, save_adapters
    peft = pytest.importorskip("peft")
    hf, d = hf_gpt2(tmp_path / "base")
    model = GPT.from_pretrained(d).eval()
    for name, cfg in ADAPTERS.items():
        add_adapter(model, name, cfg)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    ids = torch.randint(0, 97, (2, 7))
    dirs = save_adapters(model, tmp_path / "ads")
    assert [p.name for p in dirs] == ["a", "b", "c"]
    again = GPT.from_pretrained(d).eval()
    assert load_adapters(again, tmp_path / "ads") == ["a", "b", "c"]
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "ads" / "a"), adapter_name="a").eval()
    for name in ("b", "c"):
        pm.load_adapter(str(tmp_path / "ads" / name), adapter_name=name)
    for name in ADAPTERS:
        set_active(model, name)
        set_active(again, name)
        pm.set_adapter(name)
        want = logits(model, ids)
        # minift -> files -> minift (GPT-2's q, k, v travel through the fused c_attn: rounding only)
        torch.testing.assert_close(logits(again, ids), want, rtol=1e-6, atol=1e-6)
        with torch.no_grad():
            torch.testing.assert_close(pm(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)


def test_a_peft_multi_adapter_directory_loads_as_named_adapters(tmp_path):
    from conftest import hf_gpt2
    from minift.adapters.multi import load_adapters
    peft = pytest.importorskip("peft")
    hf, d = hf_gpt2(tmp_path / "base")
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True,
                                                 task_type="CAUSAL_LM"))
    pm.add_adapter("other", peft.LoraConfig(r=3, lora_alpha=5, target_modules=["c_fc"], fan_in_fan_out=True,
                                            task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.add_(torch.randn_like(p) * 0.3)
    pm.eval().save_pretrained(tmp_path / "theirs")  # "default" at the top, "other" in a subdirectory
    model = GPT.from_pretrained(d).eval()
    assert load_adapters(model, tmp_path / "theirs") == ["default", "other"]
    ids = torch.randint(0, 97, (2, 7))
    for name in ("default", "other"):
        pm.set_adapter(name)
        set_active(model, name)
        with torch.no_grad():
            torch.testing.assert_close(logits(model, ids), pm(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        load_adapters(model, tmp_path / "theirs", names=["default"])


def classifier_with_heads(seed=0):
    """A tiny BertClassifier (3 labels) with adapters "a" (its own 5-label head), "b" (a copy of
    the model's head) and "c" (no head: its rows use the original)."""
    from conftest import TINY_BERT
    from minift.methods.common import freeze_all
    from minift.models.bert import BertClassifier, BertConfig
    torch.manual_seed(seed)
    model = BertClassifier(BertConfig(**TINY_BERT, dropout=0.0), 3).eval()
    freeze_all(model)
    head = dict(modules_to_save=("classifier",))
    add_adapter(model, "a", LoRAConfig(r=2, targets=("q_proj",), **head), {"classifier": torch.nn.Linear(32, 5)})
    add_adapter(model, "b", LoRAConfig(r=1, targets=("v_proj", "up_proj"), **head))
    add_adapter(model, "c", LoRAConfig(r=2, targets=("q_proj",)))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "copies" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


@settings(max_examples=10, deadline=None)
@given(names=st.lists(st.sampled_from(["a", "b", "c", None]), min_size=1, max_size=5), seed=st.integers(0, 99))
def test_a_mixed_batch_with_heads_of_their_own_equals_each_example_alone(names, seed):
    model = classifier_with_heads(seed)
    ids = torch.randint(0, 99, (len(names), 7), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad(), mixed_batch(model, names):
        mixed = model(ids).logits
    assert mixed.shape == (len(names), 5 if "a" in names else 3)
    for i, n in enumerate(names):
        set_active(model, n)
        alone = logits(model, ids[i:i + 1])[0]
        torch.testing.assert_close(mixed[i, :alone.shape[0]], alone, rtol=0, atol=1e-5)
        assert torch.isneginf(mixed[i, alone.shape[0]:]).all()  # a narrower head's padding


def test_each_head_copy_learns_only_from_its_rows_and_files_show_it_alone(tmp_path):
    from safetensors.torch import load_file

    from minift.adapters.multi import as_single, save_adapters
    from minift.methods.multi_lora import ModulesToSave
    model = classifier_with_heads()
    ids, labels = torch.randint(0, 99, (3, 7)), torch.tensor([4, 1, 2])
    with mixed_batch(model, ["a", "a", "c"]):
        torch.nn.functional.cross_entropy(model(ids).logits, labels).backward()
    heads = model.classifier
    assert isinstance(heads, ModulesToSave) and heads.copies["a"].weight.grad.abs().sum() > 0
    assert heads.copies["b"].weight.grad is None and not heads.original.weight.requires_grad
    with as_single(model, "b"):  # the adapter's copy under the module's own name: train's keys
        assert model.classifier is heads.copies["b"]
        assert {n for n, p in model.named_parameters() if p.requires_grad} >= {"classifier.weight", "classifier.bias"}
    with as_single(model, "c"):
        assert model.classifier is heads.original
    assert model.classifier is heads
    saved = save_adapters(model, tmp_path)  # each adapter's own head under the module's name
    for d in saved:
        keys = set(load_file(d / "adapter_model.safetensors"))
        head = {"base_model.model.classifier.weight", "base_model.model.classifier.bias"}
        assert (head <= keys) == (d.name != "c"), d.name
    assert load_file(tmp_path / "a" / "adapter_model.safetensors")["base_model.model.classifier.bias"].shape == (5,)
    assert not hasattr(model, "lora_config")
    assert {"classifier.weight", "classifier.bias", "classifier.copies.a.weight"} <= set(model.state_dict())
    twin = classifier_with_heads()
    twin.load_state_dict(model.state_dict())  # and they load back into the wrapped module
    assert torch.equal(twin.classifier.original.weight, heads.original.weight)
    delete_adapter(model, "a")
    assert list(heads.copies) == ["b"] and logits(model, ids).shape == (3, 3)
    with pytest.raises(ValueError, match="modules_to_save 'pooler_x' matches no module"):
        add_adapter(model, "d", LoRAConfig(r=1, targets=("q_proj",), modules_to_save=("pooler_x",)))
    with pytest.raises(ValueError, match="not in modules_to_save"):
        add_adapter(model, "d", LoRAConfig(r=1, targets=("q_proj",)), {"classifier": torch.nn.Linear(32, 2)})
    assert set(adapter_names(model)) == {"b", "c"}
    with pytest.raises(ValueError, match="target 'classifier' (is|lies in) 'classifier'"):
        add_adapter(model, "e", LoRAConfig(r=1, targets=("classifier",), modules_to_save=("classifier",)))
    fresh = classifier_with_heads()
    for n in ("a", "b", "c"):
        delete_adapter(fresh, n)
    with pytest.raises(ValueError, match="target 'classifier' lies in 'classifier'"):  # nothing wrapped yet
        add_adapter(fresh, "e", LoRAConfig(r=1, targets=("q_proj", "classifier"), modules_to_save=("classifier",)))
    assert not adapter_names(fresh) and isinstance(fresh.classifier, torch.nn.Linear)
    delete_adapter(model, "b")  # the last copy gone: the plain head again, under its own keys
    assert model.classifier is heads.original and "classifier.weight" in model.state_dict()


@pytest.mark.parametrize("layout", ["peft", "minift"])
def test_adapters_with_heads_load_back_into_copies_of_their_own(layout, tmp_path):
    """save_adapters then load_adapters onto a fresh base: each adapter's head comes back as a copy
    of its own (a 5-label head beside the base's 3-label one too), every output as it was, alone
    and in a mixed batch, and the base's own head untouched; a file that fails leaves nothing."""
    from minift.adapters.multi import load_adapters, save_adapters
    from minift.methods.multi_lora import ModulesToSave
    model = classifier_with_heads()
    save_adapters(model, tmp_path, layout=layout)
    fresh = classifier_with_heads(1)  # another base head, other factors: everything must come from the files
    for n in ("a", "b", "c"):
        delete_adapter(fresh, n)
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" not in k and "copies." not in k})
    base_head = fresh.classifier.weight.clone()
    assert load_adapters(fresh, tmp_path) == ["a", "b", "c"]
    heads = fresh.classifier
    assert isinstance(heads, ModulesToSave) and sorted(heads.copies) == ["a", "b"]
    assert heads.copies["a"].weight.shape == (5, 32) and torch.equal(heads.original.weight, base_head)
    ids = torch.randint(0, 99, (4, 7), generator=torch.Generator().manual_seed(3))
    for n in ("a", "b", "c", None):
        set_active(model, n)
        set_active(fresh, n)
        torch.testing.assert_close(logits(fresh, ids), logits(model, ids), rtol=0, atol=1e-6)
    names = ["a", "c", "b", None]
    with torch.no_grad(), mixed_batch(model, names), mixed_batch(fresh, names):
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=1e-6)
    from safetensors.torch import load_file, save_file
    other = classifier_with_heads(1)  # a file that fails while loading (a factor missing) leaves nothing
    for n in ("a", "b", "c"):
        delete_adapter(other, n)
    f = tmp_path / "a" / ("adapter.safetensors" if layout == "minift" else "adapter_model.safetensors")
    tensors = load_file(f)
    del tensors[next(k for k in tensors if "lora_B" in k)]
    save_file(tensors, f)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="lora_B|missing|no tensor"):
        load_adapters(other, tmp_path, names=["a"])
    after = other.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(v, after[k]) for k, v in before.items())
    assert isinstance(other.classifier, torch.nn.Linear) and not adapter_names(other)


def test_heads_travel_both_ways_with_peft(tmp_path):
    """A named adapter with its own head: PEFT loads minift's directory (ModulesToSaveWrapper) with
    the same logits, and PEFT's directory loads back as a named adapter with its head."""
    from conftest import hf_bert
    from minift.adapters.multi import load_adapters, save_adapters
    from minift.methods.common import freeze_all
    from minift.models.bert import BertClassifier
    peft = pytest.importorskip("peft")
    hf, d = hf_bert(tmp_path / "base", classifier=True)
    model = BertClassifier.from_pretrained(d, num_labels=3).eval()
    freeze_all(model)
    add_adapter(model, "t", LoRAConfig(r=2, alpha=4, targets=("q_proj", "v_proj"), modules_to_save=("classifier",)))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "copies" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    save_adapters(model, tmp_path / "ours")
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "ours" / "t"), adapter_name="t").eval()
    ids = torch.randint(0, 99, (3, 7), generator=torch.Generator().manual_seed(6))
    set_active(model, "t")
    want = logits(model, ids)
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)
    pm.save_pretrained(tmp_path / "theirs", selected_adapters=["t"])  # PEFT writes a lone adapter "t" under t/
    again = BertClassifier.from_pretrained(d, num_labels=3).eval()
    freeze_all(again)
    theirs = next(p.parent for p in (tmp_path / "theirs").rglob("adapter_config.json"))
    assert load_adapters(again, theirs) == ["default"]
    set_active(again, "default")
    torch.testing.assert_close(logits(again, ids), want, rtol=1e-4, atol=1e-4)
    assert isinstance(again.classifier.original, torch.nn.Linear) and "default" in again.classifier.copies


def test_adapters_load_by_name_from_a_mapping(tmp_path):
    from minift.adapters.multi import load_adapters, save_adapters
    from minift.files import InputError
    model = classifier_with_heads()
    save_adapters(model, tmp_path)
    fresh = classifier_with_heads(1)
    for n in ("a", "b", "c"):
        delete_adapter(fresh, n)
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" not in k and "copies." not in k})
    assert load_adapters(fresh, {"sst": tmp_path / "b", "other": tmp_path / "c"}) == ["sst", "other"]
    ids = torch.randint(0, 99, (2, 7), generator=torch.Generator().manual_seed(1))
    for mine, theirs in (("sst", "b"), ("other", "c")):
        set_active(fresh, mine)
        set_active(model, theirs)
        torch.testing.assert_close(logits(fresh, ids), logits(model, ids), rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError, match="not an adapter directory"):
        load_adapters(fresh, {"x": tmp_path})
    with pytest.raises(ValueError, match="must be a plain identifier"):
        load_adapters(fresh, {"a-b": tmp_path / "a"})
    with pytest.raises(ValueError, match="names no adapter"):
        load_adapters(fresh, {})
    with pytest.raises(ValueError, match="already has an adapter named 'sst'"):
        load_adapters(fresh, {"sst": tmp_path / "a"})


@pytest.mark.parametrize("layout", ["peft", "minift"])
def test_loaded_adapters_serve_in_eval_mode_and_save_as_they_were(layout, tmp_path):
    """An adapter with dropout loads in the model's mode (eval: the same output twice); saving the
    loaded adapters writes each one's own settings (load_adapter's config does not stay on the
    model); every file not plain LoRA is refused before anything attaches."""
    from minift.adapters import save_adapter
    from minift.adapters.multi import load_adapters, save_adapters
    from minift.methods import adalora, prefix, prompt
    cfgs = {"a": LoRAConfig(r=2, alpha=4, targets=("q_proj",), dropout=0.3),
            "b": LoRAConfig(r=4, alpha=32, targets=("v_proj",), rslora=True, dropout=0.2)}
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY_GPT, dropout=0.0))
    for n, c in cfgs.items():
        add_adapter(model, n, c)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(torch.randn(p.shape) * 0.3)
    save_adapters(model, tmp_path / "one", layout=layout)
    base = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
    fresh = GPT(GPTConfig(**TINY_GPT, dropout=0.0)).eval()
    fresh.load_state_dict(base)
    load_adapters(fresh, tmp_path / "one")
    assert not hasattr(fresh, "lora_config")
    ids = torch.randint(0, 97, (2, 7))
    set_active(fresh, "b")
    assert torch.equal(logits(fresh, ids), logits(fresh, ids))  # eval: no dropout drawn
    save_adapters(fresh, tmp_path / "two", layout=layout)
    again = GPT(GPTConfig(**TINY_GPT, dropout=0.0)).eval()
    again.load_state_dict(base)
    load_adapters(again, tmp_path / "two")
    model.eval()
    for n in cfgs:
        set_active(model, n)
        set_active(again, n)
        torch.testing.assert_close(logits(again, ids), logits(model, ids), rtol=1e-6, atol=1e-6)
        layer = next(m for m in again.modules() if isinstance(m, MultiLoRALinear) and n in m.lora_A)
        assert layer.dropout[n].p == cfgs[n].dropout and layer.settings[n][1] == cfgs[n].rslora
    others = {"prompt": (prompt.apply, prompt.PromptConfig(num_virtual_tokens=2)),
              "prefix": (prefix.apply, prefix.PrefixConfig(num_virtual_tokens=2)),
              "adalora": (adalora.apply, adalora.AdaLoRAConfig(init_r=2, target_r=1, targets=("q_proj",), total_step=10, tinit=1,
                                                      tfinal=1)),
              "dora": (lora.apply, LoRAConfig(r=2, targets=("q_proj",), dora=True))}
    for kind, (apply, c) in others.items():
        m = GPT(GPTConfig(**TINY_GPT, dropout=0.0)).eval()
        apply(m, c)
        save_adapter(m, tmp_path / "others" / kind, layout=layout)
    target = GPT(GPTConfig(**TINY_GPT, dropout=0.0)).eval()
    target.load_state_dict(base)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    for kind in others:
        with pytest.raises(ValueError, match="must be plain LoRA"):
            load_adapters(target, tmp_path / "others", names=[kind])
    after = target.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(v, after[k]) for k, v in before.items())
    assert not any(hasattr(target, h) for h in ("soft_prompt", "prefix_encoder", "lora_config"))
    assert not adapter_names(target)
