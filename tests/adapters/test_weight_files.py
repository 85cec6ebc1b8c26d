"""Every weights / config / adapter / checkpoint file minift reads fails cleanly: a one-line
InputError that names the file, never a SafetensorError, JSONDecodeError, KeyError or
TypeError, and never a silently wrong model (a cast integer weight, a half-loaded adapter,
a rank the config contradicts)."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from conftest import (TINY_BERT, TINY_GPT, empty, garbage, hf_bert, hf_gpt2, json_list, not_json, not_utf8,
                      text_file, truncate)
from minift import adapters
from minift.training.checkpoint import load_checkpoint, load_trainable_state, save_weights
from minift.files import InputError
from minift.methods import adalora, lora, prefix
from minift.models.bert import Bert, BertClassifier, BertConfig
from minift.models.gpt import GPT, GPTConfig
from minift.training.loop import make_optimizer, train
from minift.training.config import TrainConfig


# ---------------------------------------------------------------------------- helpers

def refused(call, path, *fragments) -> str:
    """``call()`` raises an InputError: one line, naming ``path`` and each fragment."""
    with pytest.raises(InputError) as e:
        call()
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert str(path) in msg, f"{path} not in: {msg}"
    for f in fragments:
        assert f in msg, f"{f!r} not in: {msg}"
    return msg




WEIGHT_DAMAGE = [garbage, truncate, empty, text_file]
JSON_DAMAGE = [not_json, truncate, empty, json_list, not_utf8]


def edit_json(p: Path, **changes) -> None:
    """Rewrite a JSON object: a value of ``...`` deletes the key."""
    doc = json.loads(p.read_text())
    for k, v in changes.items():
        if v is ...:
            doc.pop(k, None)
        else:
            doc[k] = v
    p.write_text(json.dumps(doc))


def edit_tensors(p: Path, edit) -> None:
    sd = load_file(str(p))
    edit(sd)
    save_file(sd, str(p))


def first(sd: dict, fragment: str) -> str:
    return next(k for k in sorted(sd) if fragment in k)


def state_of(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same(model, before: dict) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


# ---------------------------------------------------------------------------- a model directory

@pytest.fixture(params=["gpt", "bert"])
def model_dir(request, tmp_path):
    """(loader, directory of a tiny HF checkpoint)."""
    if request.param == "gpt":
        return GPT.from_pretrained, hf_gpt2(tmp_path)[1]
    return Bert.from_pretrained, hf_bert(tmp_path)[1]


@pytest.mark.parametrize("damage", WEIGHT_DAMAGE)
def test_damaged_model_weights_are_refused(model_dir, damage):
    load, d = model_dir
    damage(d / "model.safetensors")
    refused(lambda: load(d), d / "model.safetensors")


@pytest.mark.parametrize("damage", JSON_DAMAGE)
def test_damaged_model_config_is_refused(model_dir, damage):
    load, d = model_dir
    damage(d / "config.json")
    refused(lambda: load(d), d / "config.json")


@pytest.mark.parametrize("kind,name,value,fragment", [
    ("gpt", "n_embd", ..., "'n_embd'"), ("gpt", "n_layer", "two", "'n_layer'"), ("gpt", "n_head", 0, "'n_head'"),
    ("gpt", "vocab_size", 97.0, "'vocab_size'"), ("gpt", "n_head", 5, "divisible"),
    ("gpt", "n_positions", True, "'n_positions'"), ("gpt", "resid_pdrop", "0.1", "'resid_pdrop'"),
    ("gpt", "n_inner", [64], "'n_inner'"),
    ("bert", "hidden_size", ..., "'hidden_size'"), ("bert", "num_hidden_layers", None, "'num_hidden_layers'"),
    ("bert", "intermediate_size", "big", "'intermediate_size'"), ("bert", "pad_token_id", 500, "'pad_token_id'"),
    ("bert", "hidden_dropout_prob", 1.5, "'hidden_dropout_prob'"), ("bert", "id2label", ["a", "b"], "'id2label'"),
])
def test_config_field_missing_or_of_the_wrong_type_names_file_and_field(tmp_path, kind, name, value, fragment):
    d = (hf_gpt2 if kind == "gpt" else hf_bert)(tmp_path)[1]
    edit_json(d / "config.json", **{name: value})
    load = GPT.from_pretrained if kind == "gpt" else BertClassifier.from_pretrained
    refused(lambda: load(d), d / "config.json", fragment)


def test_config_readers_name_the_file_they_read(tmp_path):
    from minift.models import bert, hf
    _, d = hf_bert(tmp_path)
    edit_json(d / "config.json", hidden_size=...)
    raw = hf.read_config(d)
    refused(lambda: bert.config_from_hf(raw), d / "config.json", "'hidden_size'")
    refused(lambda: bert.config_from_hf(dict(raw), "elsewhere.json"), "elsewhere.json", "'hidden_size'")


def test_missing_model_files_are_input_errors_and_file_not_found(tmp_path):
    for call, path in ((lambda: GPT.from_pretrained(tmp_path / "nope"), tmp_path / "nope"),
                       (lambda: GPT.from_pretrained(tmp_path), tmp_path / "config.json")):
        with pytest.raises(FileNotFoundError):
            call()
        refused(call, path)
    _, d = hf_gpt2(tmp_path / "m")
    (d / "model.safetensors").unlink()
    refused(lambda: GPT.from_pretrained(d), d / "model.safetensors")


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_or_boolean_weights_are_refused_not_cast(model_dir, dtype):
    load, d = model_dir
    f = d / "model.safetensors"
    edit_tensors(f, lambda sd: sd.__setitem__(first(sd, "ln_f.weight" if "ln_f.weight" in str(sorted(sd)) else
                                                    "LayerNorm.weight"), torch.ones(32, dtype=dtype)))
    refused(lambda: load(d), f, str(dtype).removeprefix("torch."), "floating point")


def test_ignored_integer_buffers_still_load(tmp_path):
    """BERT checkpoints of older transformers carry int64 ``embeddings.position_ids``: dropped, not refused."""
    _, d = hf_bert(tmp_path)
    edit_tensors(d / "model.safetensors", lambda sd: sd.__setitem__("embeddings.position_ids",
                                                                    torch.arange(64).unsqueeze(0)))
    Bert.from_pretrained(d)


def test_classifier_head_half_missing_is_refused(tmp_path):
    _, d = hf_bert(tmp_path, classifier=True)
    f = d / "model.safetensors"
    edit_tensors(f, lambda sd: sd.pop("classifier.bias"))
    with pytest.raises(KeyError):  # a MissingKey, also an InputError
        BertClassifier.from_pretrained(d)
    refused(lambda: BertClassifier.from_pretrained(d), f, "classifier.bias")


@pytest.fixture(scope="module")
def gpt_dir(tmp_path_factory):
    return hf_gpt2(tmp_path_factory.mktemp("gpt"))[1]


@settings(max_examples=25, deadline=None)
@given(cut=st.floats(0.0, 1.0), flips=st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(0, 255)), max_size=4))
def test_any_damage_to_model_weights_loads_or_is_refused_cleanly(gpt_dir, tmp_path_factory, cut, flips):
    """Cut anywhere and bytes overwritten anywhere (mostly in the header): the load succeeds (a
    flip in the tensor data is just other values) or is an InputError naming the file; nothing else."""
    d = tmp_path_factory.mktemp("m")
    shutil.copy(gpt_dir / "config.json", d / "config.json")
    data = bytearray((gpt_dir / "model.safetensors").read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    for where, byte in flips:
        data[int(where * (header + 64)) % len(data)] = byte
    (d / "model.safetensors").write_bytes(bytes(data[:max(1, round(cut * len(data)))]) if cut < 1 else bytes(data))
    try:
        GPT.from_pretrained(d)
    except InputError as e:
        assert str(d / "model.safetensors") in str(e) and "\n" not in str(e), str(e)


# ---------------------------------------------------------------------------- an adapter directory

def lora_classifier(seed=0, **kw):
    torch.manual_seed(seed)
    m = BertClassifier(BertConfig(**TINY_BERT, dropout=0.0), num_labels=3).eval()
    lora.apply(m, lora.LoRAConfig(**{"r": 2, "alpha": 4, "targets": ("q_proj", "v_proj"),
                                     "modules_to_save": ("classifier",), **kw}))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m


def plain_classifier(seed=0):
    torch.manual_seed(seed)
    return BertClassifier(BertConfig(**TINY_BERT, dropout=0.0), num_labels=3).eval()


FILES = {"peft": ("adapter_config.json", "adapter_model.safetensors"),
         "minift": ("minift_adapter.json", "adapter.safetensors")}


@pytest.fixture(params=["peft", "minift"])
def adapter_dir(request, tmp_path):
    """(layout, directory) of a saved LoRA adapter of a tiny BERT classifier."""
    adapters.save_adapter(lora_classifier(), tmp_path / "ad", layout=request.param)
    return request.param, tmp_path / "ad"


def refused_load(d: Path, path, *fragments) -> str:
    """Loading ``d`` into a plain classifier is refused, and the model is left as it was."""
    model = plain_classifier()
    before = state_of(model)
    msg = refused(lambda: adapters.load_adapter(model, d), path, *fragments)
    assert not lora.lora_modules(model)
    assert_same(model, before)
    return msg


@pytest.mark.parametrize("damage", WEIGHT_DAMAGE)
def test_damaged_adapter_weights_are_refused(adapter_dir, damage):
    layout, d = adapter_dir
    damage(d / FILES[layout][1])
    refused_load(d, d / FILES[layout][1])


@pytest.mark.parametrize("damage", JSON_DAMAGE)
def test_damaged_adapter_config_is_refused(adapter_dir, damage):
    layout, d = adapter_dir
    damage(d / FILES[layout][0])
    refused_load(d, d / FILES[layout][0])


@pytest.mark.parametrize("layout,changes,fragment", [
    ("peft", {"r": ...}, "'r'"), ("peft", {"r": "2"}, "'r'"), ("peft", {"r": 0}, "'r'"),
    ("peft", {"lora_alpha": ...}, "'lora_alpha'"), ("peft", {"lora_alpha": [4]}, "'lora_alpha'"),
    ("peft", {"use_dora": "yes"}, "'use_dora'"), ("peft", {"rank_pattern": [1, 2]}, "'rank_pattern'"),
    ("peft", {"alpha_pattern": {"query": "4"}}, "alpha_pattern"), ("peft", {"peft_type": ...}, "'peft_type'"),
    ("peft", {"target_modules": 3}, "'target_modules'"), ("peft", {"target_modules": "(query"}, "'target_modules'"),
    ("peft", {"layers_to_transform": "0"}, "'layers_to_transform'"), ("peft", {"lora_dropout": None}, None),
    ("peft", {"peft_type": "IA3"}, "IA3"),
    ("minift", {"modules": ...}, "'modules'"), ("minift", {"modules": ["q_proj"]}, "'modules'"),
    ("minift", {"config": "lora"}, "'config'"), ("minift", {"config": {"r": 2, "rank": 3}}, "rank"),
    ("minift", {"peft_type": 7}, "'peft_type'"),
])
def test_adapter_config_field_missing_or_of_the_wrong_type(tmp_path, layout, changes, fragment):
    d = tmp_path / "ad"
    adapters.save_adapter(lora_classifier(), d, layout=layout)
    edit_json(d / FILES[layout][0], **changes)
    if fragment is None:  # null stands for PEFT's default: still loads
        adapters.load_adapter(plain_classifier(), d)
        return
    refused_load(d, d / FILES[layout][0], fragment)


def test_minift_module_settings_of_the_wrong_type(tmp_path):
    adapters.save_adapter(lora_classifier(), tmp_path, layout="minift")
    f = tmp_path / "minift_adapter.json"
    doc = json.loads(f.read_text())
    name = next(iter(doc["modules"]))
    doc["modules"][name]["r"] = "2"
    f.write_text(json.dumps(doc))
    refused_load(tmp_path, f, name, "'r'")


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_integer_or_boolean_adapter_tensors_are_refused(adapter_dir, dtype):
    layout, d = adapter_dir
    f = d / FILES[layout][1]
    edit_tensors(f, lambda sd: sd.__setitem__(first(sd, "lora_A"), sd[first(sd, "lora_A")].to(dtype)))
    refused_load(d, f, "lora_A", str(dtype).removeprefix("torch."))


def test_adapter_tensor_of_another_dtype_kind_is_refused_when_copying():
    """copy_all's check: an integer source for a float parameter, a float mask for a bool buffer."""
    from minift.adapters.io import copy_all
    dst, mask = torch.zeros(3), torch.zeros(3, dtype=torch.bool)
    for d, s in ((dst, torch.ones(3, dtype=torch.int64)), (mask, torch.ones(3))):
        with pytest.raises(ValueError, match="dtype"):
            copy_all([(d, s, "k", "layer")])
    assert not dst.any() and not mask.any()


@pytest.mark.parametrize("layout", ["peft", "minift"])
def test_adapter_lacking_one_lora_B_is_refused(tmp_path, layout):
    adapters.save_adapter(lora_classifier(), tmp_path, layout=layout)
    f = tmp_path / FILES[layout][1]
    key = first(load_file(str(f)), "layer.1.attention.self.value.lora_B" if layout == "peft" else
                "layers.1.attn.v_proj.lora_B")
    edit_tensors(f, lambda sd: sd.pop(key))
    refused_load(tmp_path, f, "lora_B", "layer.1.attention.self.value" if layout == "peft" else "layers.1.attn.v_proj")
    target = lora_classifier(seed=5)  # a model that has the LoRA layers already: unchanged too
    before = state_of(target)
    refused(lambda: adapters.load_adapter(target, tmp_path), f, "lora_B")
    assert_same(target, before)


def test_peft_adapter_lacking_a_whole_targeted_layer_is_refused(tmp_path):
    """Both factors of one layer gone: without the target_modules check this loads as a
    smaller adapter (that layer silently unadapted)."""
    adapters.save_adapter(lora_classifier(), tmp_path, layout="peft")
    f = tmp_path / "adapter_model.safetensors"
    edit_tensors(f, lambda sd: [sd.pop(k) for k in list(sd) if "layer.1.attention.self.value" in k])
    refused_load(tmp_path, f, "bert.encoder.layer.1.attention.self.value", "target_modules")


@pytest.mark.parametrize("layout", ["peft", "minift"])
def test_adapter_lacking_a_module_to_save_is_refused(tmp_path, layout):
    adapters.save_adapter(lora_classifier(), tmp_path, layout=layout)
    f = tmp_path / FILES[layout][1]
    edit_tensors(f, lambda sd: sd.pop(first(sd, "classifier.weight")))
    refused_load(tmp_path, f, "classifier.weight", "modules_to_save")


def test_peft_r_disagreeing_with_the_tensor_shapes_is_refused(tmp_path):
    adapters.save_adapter(lora_classifier(), tmp_path, layout="peft")
    f = tmp_path / "adapter_config.json"
    edit_json(f, r=4)
    refused_load(tmp_path, f, "bert.encoder.layer.0.attention.self.query", "r=4", "rank 2")
    edit_json(f, r=2, rank_pattern={"layer.1.attention.self.value": 3})
    refused_load(tmp_path, f, "bert.encoder.layer.1.attention.self.value", "rank_pattern", "r=3", "rank 2")
    edit_json(f, r=4, rank_pattern={"query": 2, "value": 2})  # the pattern wins over r, as in PEFT
    model = adapters.load_adapter(plain_classifier(), tmp_path)
    assert {m.r for _, m in lora.lora_modules(model)} == {2}


def test_adalora_peft_init_r_disagreeing_with_the_tensor_shapes_is_refused(tmp_path):
    torch.manual_seed(0)
    m = BertClassifier(BertConfig(**TINY_BERT, dropout=0.0), num_labels=3).eval()
    adalora.apply(m, adalora.AdaLoRAConfig(init_r=3, target_r=1, alpha=8, targets=("q_proj",), tinit=1, tfinal=1,
                                           delta_t=1, total_step=4))
    adapters.save_adapter(m, tmp_path, layout="peft")
    f = tmp_path / "adapter_config.json"
    edit_json(f, rank_pattern=None, init_r=5)
    refused_load(tmp_path, f, "bert.encoder.layer.0.attention.self.query", "init_r=5", "3")
    edit_json(f, init_r="3")
    refused_load(tmp_path, f, "'init_r'")
    edit_json(f, init_r=3, rank_pattern={"bert.encoder.layer.0.attention.self.query.lora_E": [True, 1, True]})
    refused_load(tmp_path, f, "rank_pattern")


def test_adalora_minift_mask_must_be_boolean(tmp_path):
    torch.manual_seed(0)
    m = GPT(GPTConfig(**TINY_GPT)).eval()
    adalora.apply(m, adalora.AdaLoRAConfig(init_r=3, target_r=1, alpha=8, targets=("q_proj",), tinit=1, tfinal=1,
                                           delta_t=1, total_step=4))
    adapters.save_adapter(m, tmp_path, layout="minift")
    f = tmp_path / "adapter.safetensors"
    adapters.load_adapter(GPT(GPTConfig(**TINY_GPT)), tmp_path)  # a bool lora_mask is fine
    edit_tensors(f, lambda sd: sd.__setitem__(first(sd, "lora_mask"), sd[first(sd, "lora_mask")].float()))
    torch.manual_seed(0)
    target = GPT(GPTConfig(**TINY_GPT)).eval()
    refused(lambda: adapters.load_adapter(target, tmp_path), f, "lora_mask", "float32")
    assert not adalora.svd_modules(target)


def test_prefix_adapter_lacking_its_table_is_refused(tmp_path):
    torch.manual_seed(0)
    m = GPT(GPTConfig(**TINY_GPT)).eval()
    prefix.apply(m, prefix.PrefixConfig(num_virtual_tokens=3))
    for layout in ("minift", "peft"):
        adapters.save_adapter(m, tmp_path / layout, layout=layout)
        f = tmp_path / layout / FILES[layout][1]
        sd = load_file(str(f))
        assert len(sd) == 1  # the table: prefix_encoder.embedding / prompt_embeddings
        save_file({"base_model.wte.weight" if layout == "peft" else "wte.weight": torch.zeros(97, 32)}, str(f))
        target = GPT(GPTConfig(**TINY_GPT)).eval()
        refused(lambda: adapters.load_adapter(target, tmp_path / layout), f)
        assert getattr(target, "prefix_encoder", None) is None
    for bad in ("3", 0):
        edit_json(tmp_path / "peft" / "adapter_config.json", num_virtual_tokens=bad)
        refused(lambda: adapters.load_adapter(GPT(GPTConfig(**TINY_GPT)), tmp_path / "peft"),
                tmp_path / "peft" / "adapter_config.json", "'num_virtual_tokens'")


def test_missing_adapter_files(tmp_path):
    refused(lambda: adapters.load_adapter(plain_classifier(), tmp_path / "nope"), tmp_path / "nope")
    adapters.save_adapter(lora_classifier(), tmp_path, layout="peft")
    (tmp_path / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError):
        adapters.load_adapter(plain_classifier(), tmp_path)
    refused(lambda: adapters.load_adapter(plain_classifier(), tmp_path), tmp_path / "adapter_model.safetensors")


# ---------------------------------------------------------------------------- a checkpoint's last/

TINY_TRAIN = dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32)


def lora_gpt(seed=0):
    torch.manual_seed(seed)
    m = GPT(GPTConfig(**TINY_TRAIN, dropout=0.0))
    lora.apply(m, lora.LoRAConfig(r=2, alpha=4, targets=("q_proj", "v_proj")))
    return m


def batches(n=2):
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": (x := torch.randint(0, 97, (2, 12), generator=g)), "attention_mask": torch.ones_like(x),
             "labels": x} for _ in range(n)]


def train_cfg(out, **kw):
    return TrainConfig(**{**dict(lr=3e-3, steps=2, warmup=0, progress=False, plot=False, out_dir=str(out), seed=3),
                          **kw})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The output directory of a 2-step LoRA run (never modified: tests damage a copy of last/)."""
    out = tmp_path_factory.mktemp("run")
    train(lora_gpt(), batches(), train_cfg(out))
    return out


@pytest.fixture
def last(trained, tmp_path):
    shutil.copytree(trained / "last", tmp_path / "last")
    return tmp_path / "last"


def resume(last: Path):
    """load_checkpoint into a fresh model and optimizer; returns (model, optimizer, state)."""
    model = lora_gpt(seed=1)
    opt = make_optimizer(model, train_cfg(last.parent))
    return model, opt, load_checkpoint(last, model, opt)


def refused_resume(last: Path, path, *fragments) -> str:
    """load_checkpoint is refused and restores nothing: the model, optimizer and RNG are as they were."""
    model = lora_gpt(seed=1)
    opt = make_optimizer(model, train_cfg(last.parent))
    before, opt_before, rng = state_of(model), opt.state_dict(), torch.get_rng_state()
    msg = refused(lambda: load_checkpoint(last, model, opt), path, *fragments)
    assert_same(model, before)
    assert opt.state_dict()["state"] == opt_before["state"] == {}
    assert torch.equal(torch.get_rng_state(), rng)
    return msg


def test_a_good_checkpoint_resumes(last):
    model, opt, state = resume(last)
    assert state["step"] == 2 and len(opt.state_dict()["state"]) > 0


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "rng.safetensors"])
@pytest.mark.parametrize("damage", WEIGHT_DAMAGE)
def test_damaged_checkpoint_tensors_are_refused(last, name, damage):
    damage(last / name)
    refused_resume(last, last / name)


@pytest.mark.parametrize("name", ["state.json", "optimizer.json"])
@pytest.mark.parametrize("damage", JSON_DAMAGE)
def test_damaged_checkpoint_json_is_refused(last, name, damage):
    damage(last / name)
    refused_resume(last, last / name)


@pytest.mark.parametrize("name,changes,fragment", [
    ("state.json", {"step": ...}, "'step'"), ("state.json", {"step": "2"}, "'step'"),
    ("state.json", {"step": 1.5}, "'step'"), ("state.json", {"step": -1}, "'step'"),
    ("state.json", {"losses": 0.5}, "'losses'"), ("state.json", {"losses": ["x"]}, "'losses'"),
    ("state.json", {"losses": [1.0, None]}, "'losses'"),
    ("state.json", {"evals": {}}, "'evals'"), ("state.json", {"evals": [1]}, "'evals'"),
    ("state.json", {"best": 3}, "'best'"), ("state.json", {"bad_evals": ...}, "'bad_evals'"),
    ("state.json", {"stopped_early": "no"}, "'stopped_early'"), ("state.json", {"rng": ...}, "'rng'"),
    ("state.json", {"rng": {"python": [3, [1, 2], None], "numpy": []}}, "'rng'"),
    ("state.json", {"rng": {"python": "x", "numpy": []}}, "'python'"),
    ("optimizer.json", {"param_groups": ...}, "'param_groups'"), ("optimizer.json", {"param_groups": {}}, "'param_groups'"),
    ("optimizer.json", {"param_groups": []}, "parameter groups"), ("optimizer.json", {"state": []}, "'state'"),
    ("optimizer.json", {"state": {"999": {}}}, "999"),
])
def test_checkpoint_json_field_missing_or_of_the_wrong_type(last, name, changes, fragment):
    edit_json(last / name, **changes)
    refused_resume(last, last / name, fragment)


@pytest.mark.parametrize("edit,fragment", [
    (lambda g: g[0].__setitem__("lr", "fast"), "lr"), (lambda g: g[0].__setitem__("betas", [0.9]), "betas"),
    (lambda g: g[0].__setitem__("params", g[0]["params"][:-1]), "parameters"),
    (lambda g: g[0].__setitem__("params", ["a"] * len(g[0]["params"])), "param_groups[0]"),
    (lambda g: g.__setitem__(0, 5), "param_groups[0]"),
])
def test_optimizer_param_groups_must_fit_the_optimizer(last, edit, fragment):
    f = last / "optimizer.json"
    doc = json.loads(f.read_text())
    edit(doc["param_groups"])
    f.write_text(json.dumps(doc))
    refused_resume(last, f, fragment)


def test_optimizer_moment_of_another_shape_is_refused(last):
    f = last / "optimizer.safetensors"
    good = load_file(str(f))
    save_file({**good, first(good, "exp_avg"): torch.zeros(3, 3)}, str(f))
    refused_resume(last, f, "exp_avg", "(3, 3)")
    save_file({**good, "x.exp_avg": torch.zeros(3)}, str(f))
    refused_resume(last, f, "x.exp_avg")
    save_file({**good, first(good, "exp_avg"): good[first(good, "exp_avg")].to(torch.int32)}, str(f))
    refused_resume(last, f, "exp_avg", "int32")


def test_rng_state_that_would_not_load_is_refused(last):
    f = last / "rng.safetensors"
    edit_tensors(f, lambda sd: sd.__setitem__("torch", sd["torch"][:10]))
    refused_resume(last, f, "'torch'")
    edit_tensors(f, lambda sd: sd.__setitem__("torch", torch.zeros(5000)))
    refused_resume(last, f, "'torch'", "uint8")
    edit_tensors(f, lambda sd: sd.pop("torch"))
    refused_resume(last, f, "'torch'")


def test_nan_in_the_loss_history_still_resumes(last):
    """json.dumps writes a diverged run's NaN loss as NaN: the checkpoint minift wrote loads."""
    doc = json.loads((last / "state.json").read_text())
    doc["losses"][0] = float("nan")
    (last / "state.json").write_text(json.dumps(doc))
    _, _, state = resume(last)
    assert state["losses"][0] != state["losses"][0]


def test_checkpoint_lacking_one_lora_B_is_refused(last):
    """The regression: the file lacked a layer's lora_B and the model kept its fresh B (zeros),
    a half-initialized adapter that ``minift eval`` scored without a word."""
    f = last / "model.safetensors"
    key = first(load_file(str(f)), "layers.1.attn.v_proj.lora_B")
    edit_tensors(f, lambda sd: sd.pop(key))
    refused_resume(last, f, key, "lacks 1 of the model's")
    model = lora_gpt(seed=1)
    before = state_of(model)
    refused(lambda: load_trainable_state(model, f), f, key)
    with pytest.raises(KeyError):  # a MissingKey: callers catching KeyError still do
        load_trainable_state(model, f)
    assert_same(model, before)


def test_weights_with_an_unknown_tensor_or_another_shape_or_dtype_change_nothing(tmp_path):
    src = lora_gpt()
    save_weights(src, tmp_path / "w")
    f = tmp_path / "w" / "model.safetensors"
    good = load_file(str(f))
    cases = [({**good, "layers.0.attn.k_proj.lora_A": torch.zeros(2, 32)}, "does not exist in the model"),
             ({**good, first(good, "lora_A"): torch.zeros(3, 32)}, "shape"),
             ({**good, first(good, "lora_B"): good[first(good, "lora_B")].to(torch.int64)}, "int64")]
    for sd, fragment in cases:
        save_file(sd, str(f))
        model = lora_gpt(seed=1)
        before = state_of(model)
        refused(lambda: load_trainable_state(model, f), f, fragment)
        assert_same(model, before)
    save_file(good, str(f))
    model = lora_gpt(seed=1)
    assert load_trainable_state(model, f) == sorted(good)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in good.items())


def test_adalora_allocator_state_damaged_is_refused(tmp_path):
    from minift.methods.registry import build_method

    def make():
        torch.manual_seed(0)
        m = GPT(GPTConfig(**TINY_TRAIN, dropout=0.0))
        st_ = build_method(m, "adalora", {"init_r": 3, "target_r": 1, "targets": ("q_proj",), "tinit": 1,
                                          "tfinal": 1, "delta_t": 1}, lr=3e-3, total_steps=4)
        return m, st_
    model, st_ = make()
    train(model, batches(), train_cfg(tmp_path, steps=2), **st_.train_hooks())
    last = tmp_path / "last"
    assert (last / "allocator.json").is_file()

    def attempt():
        m, s = make()
        return load_checkpoint(last, m, make_optimizer(m, train_cfg(tmp_path)), s.allocator)
    assert attempt()["step"] == 2
    edit_json(last / "allocator.json", budget="many")
    refused(attempt, last / "allocator.json", "budget")
    edit_json(last / "allocator.json", budget=3)
    shutil.copy(last / "allocator.safetensors", tmp_path / "alloc.bak")
    garbage(last / "allocator.safetensors")
    refused(attempt, last / "allocator.safetensors")
    shutil.copy(tmp_path / "alloc.bak", last / "allocator.safetensors")
    sd = load_file(str(last / "allocator.safetensors"))
    if any(k.startswith("ipt/") for k in sd):
        edit_tensors(last / "allocator.safetensors", lambda t: t.pop(first(t, "ipt/")))
        refused(attempt, last / "allocator.safetensors", "ipt")
