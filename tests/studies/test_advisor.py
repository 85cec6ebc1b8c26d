"""Advisor: the rule tables branch by branch, the memory estimate against what PyTorch
really holds on CPU (parameters, gradients, AdamW state, tensors saved for backward), and
``recommend`` / ``minift recommend``."""
import json

import pytest
import torch

from minift.studies import advisor as A
from minift.cli import main
from minift.fast import loss as fast_loss
from minift.methods import adalora, freeze, full, lora, prefix, prompt
from minift.methods.common import count_trainable
from minift.models.bert import BertClassifier, BertConfig
from minift.models.gpt import GPT, GPTConfig
from minift.training.loop import model_forward
from conftest import saved_bytes

# ---------------------------------------------------------------------------- rule tables


@pytest.mark.parametrize("mem, complexity, data_size, expected", [
    (4, "low", None, "lora"), (4, "medium", None, "prefix_tuning"), (4, "high", None, "prefix_tuning"),
    (7.99, "low", None, "lora"), (8, "low", 10, "lora"),  # exactly 8 GB: the 8-16 row
    (8, "medium", 999, "lora"), (8, "medium", 1000, "layer_wise_freezing"),  # data size exactly 1000
    (12, "high", 10, "lora"), (12, "low", 5000, "layer_wise_freezing"), (12, "low", None, "layer_wise_freezing"),
    (15.99, "medium", 5000, "layer_wise_freezing"),
    (16, "high", None, "full_parameter"), (16, "medium", 10, "lora"),  # exactly 16 GB: the 16-32 row
    (24, "low", None, "lora"), (31.99, "high", None, "full_parameter"),
    (32, "low", 10, "full_parameter"), (80, "medium", None, "full_parameter"),  # exactly 32: >= 32
])
def test_rule_by_resources_every_branch_and_boundary(mem, complexity, data_size, expected):
    ans = A.rule_by_resources(mem, complexity, data_size)
    assert ans.method == expected
    assert ans.rule.startswith("by_resources")
    assert ("data size not given" in ans.assumption) == (8 <= mem < 16 and data_size is None)


@pytest.mark.parametrize("task, similarity, quality, expected", [
    ("classification", 0.9, "medium", "layer_wise_freezing"),
    ("classification", 0.8, "medium", "lora"),  # exactly 0.8 is not > 0.8
    ("classification", 0.80001, "medium", "layer_wise_freezing"),
    ("classification", 0.0, "high", "lora"), ("classification", None, "medium", "lora"),
    ("generation", None, "high", "full_parameter"), ("generation", 0.9, "medium", "prefix_tuning"),
    ("generation", None, "low", "prefix_tuning"),
    ("qa", 0.99, "high", "lora"), ("code", None, "high", "adalora"), ("other", None, "low", "lora"),
    ("summarization", 0.9, "high", "lora"),
])
def test_rule_by_task_every_branch_and_boundary(task, similarity, quality, expected):
    assert A.rule_by_task(task, similarity, quality).method == expected


def test_summary_rules_and_rule_names_map_to_methods():
    assert dict(A.SUMMARY_RULES) == {
        "ample resources": ("full_parameter",), "limited resources": ("lora", "prefix_tuning"),
        "many tasks": ("adalora",), "analysis": ("probing",),
        "balance of cost and quality": ("layer_wise_freezing",)}
    for _, names in A.SUMMARY_RULES:
        assert all(A.RULE_METHODS[n] in A.METHODS for n in names)


@pytest.mark.parametrize("call, match", [
    (lambda: A.rule_by_resources(-1), "positive"), (lambda: A.rule_by_resources(0), "positive"),
    (lambda: A.rule_by_resources(float("nan")), "positive"),
    (lambda: A.rule_by_resources(8, "extreme"), "complexity"),
    (lambda: A.rule_by_resources(8, "low", -5), "data size"),
    (lambda: A.rule_by_task("classification", 1.5), r"\[0, 1\]"),
    (lambda: A.rule_by_task("classification", -0.1), r"\[0, 1\]"),
    (lambda: A.rule_by_task("generation", None, "great"), "data quality"),
    (lambda: A.preset("gpt5"), "unknown preset 'gpt5'"),
    (lambda: A.estimate_memory(A.preset("gpt2"), "qlora", 1, 8), "unknown method"),
    (lambda: A.estimate_memory(A.preset("gpt2"), "full", 1, 2048), "positions"),
    (lambda: A.estimate_memory(A.preset("gpt2"), "prompt", 1, 20), "no text"),
    (lambda: A.estimate_memory(A.preset("gpt2"), "full", 0, 8), ">= 1"),
    (lambda: A.estimate_memory(A.preset("gpt2"), "lora", 1, 8, targets=("c_attn",)), "targets"),
    (lambda: A.estimate_memory(A.preset("gpt2"), "full", 1, 8, "fp32", frozen_dtype="bf16"), "frozen_dtype"),
    (lambda: A.recommend(A.preset("gpt2"), -4, 1, 8), "positive"),
])
def test_bad_input_is_a_clear_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------------------- the estimate on CPU

GPT_CFG = dict(vocab_size=97, block_size=64, n_layer=4, n_head=4, n_embd=32)
BERT_CFG = dict(vocab_size=99, max_position_embeddings=64, n_layer=4, n_head=4, n_embd=32, n_inner=64)
P = 5  # virtual tokens
OPTS = {"lora": dict(r=4, targets=A.PROJ), "dora": dict(r=4, targets=A.PROJ),
        "adalora": dict(init_r=6, targets=A.PROJ, orth_penalty=False), "prefix": dict(num_virtual_tokens=P),
        "prompt": dict(num_virtual_tokens=P)}


def build(kind: str, method: str, dropout: float = 0.0):
    """A tiny model with ``method`` applied as the bench applies it; returns (config, model)."""
    torch.manual_seed(0)
    if kind == "gpt":
        cfg = GPTConfig(**GPT_CFG, dropout=dropout)
        model = GPT(cfg)
        fast_loss.enable(model)  # the estimate models the fused loss, which bench and train switch on
    else:
        cfg = BertConfig(**BERT_CFG, dropout=dropout)
        model = BertClassifier(cfg, num_labels=3)
    head = ("classifier",) if kind == "bert" else ()
    if method == "full":
        full.apply(model)
    elif method in ("lora", "dora"):
        lora.apply(model, lora.LoRAConfig(r=4, targets=A.PROJ, dora=method == "dora", modules_to_save=head))
    elif method == "adalora":
        adalora.apply(model, adalora.AdaLoRAConfig(init_r=6, target_r=4, targets=A.PROJ, total_step=10, tinit=0,
                                                   tfinal=0, delta_t=1, modules_to_save=head))
    elif method == "prefix":
        prefix.apply(model, prefix.PrefixConfig(num_virtual_tokens=P, modules_to_save=head))
    elif method == "prompt":
        prompt.apply(model, prompt.PromptConfig(num_virtual_tokens=P, modules_to_save=head))
    elif method == "freeze":
        freeze.apply(model, freeze.FreezeConfig(strategy="bottom_up"))
    elif method == "bitfit":
        freeze.bitfit(model)
    elif method == "probe":
        for p in model.parameters():
            p.requires_grad_(False)
    model.train()
    return cfg, model


def batch_for(kind: str, B: int, T: int) -> dict:
    ids = torch.randint(1, 90, (B, T), generator=torch.Generator().manual_seed(1))
    if kind == "gpt":
        return {"input_ids": ids, "labels": ids}
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.arange(B) % 3}


def estimate(kind, method, cfg, B, T, **kw):
    extra = {**OPTS.get(method, {}), **kw}
    return A.estimate_memory(cfg, method, B, T + (P if method in ("prefix", "prompt") else 0), "fp32",
                             device="cpu", num_labels=3, **extra)


TRAINED = ("full", "lora", "dora", "adalora", "prefix", "prompt", "freeze", "bitfit")


@pytest.mark.parametrize("kind", ["gpt", "bert"])
@pytest.mark.parametrize("method", TRAINED)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("B, T", [(3, 12), (2, 3)])  # T = 3 < P: GPT prefix attention takes the bottom-right mask
def test_saved_activations_match_autograd_byte_for_byte(kind, method, dropout, B, T):
    """The symbolic forward predicts exactly what autograd keeps (fp32, CPU) for every
    method, without dropout and with hidden and attention dropout (then SDPA on CPU takes
    its math path and keeps T x T tensors); frozen bottom layers (freeze) keep nothing."""
    cfg, model = build(kind, method, dropout=dropout)
    assert all(layer.attn.attn_dropout == dropout for layer in model.layers)
    got, _ = saved_bytes(model, batch_for(kind, B, T))
    assert got == estimate(kind, method, cfg, B, T).activations


def test_adalora_orthogonal_penalty_is_counted():
    cfg, model = build("gpt", "adalora")
    got, _ = saved_bytes(model, batch_for("gpt", 2, 10), loss_extra=adalora.orth_penalty)
    assert got == estimate("gpt", "adalora", cfg, 2, 10, orth_penalty=True).activations
    assert got > estimate("gpt", "adalora", cfg, 2, 10, orth_penalty=False).activations


def test_frozen_bottom_half_keeps_nothing():
    cfg, _ = build("gpt", "full")
    per = {m: estimate("gpt", m, cfg, 2, 16) for m in ("full", "freeze")}
    cfg8 = GPTConfig(**{**GPT_CFG, "n_layer": 8})
    half = A.estimate_memory(cfg8, "freeze", 2, 16, "fp32", device="cpu")
    # 8 layers with the bottom 4 frozen keep exactly what 4 trainable layers over frozen embeddings keep
    top4 = A.estimate_memory(cfg, "freeze", 2, 16, "fp32", device="cpu", frozen_layers=0)
    assert half.activations == top4.activations
    assert per["freeze"].activations < per["full"].activations


@pytest.mark.parametrize("kind", ["gpt", "bert"])
@pytest.mark.parametrize("method", TRAINED)
def test_weights_gradients_and_adamw_state_equal_what_one_step_holds(kind, method):
    cfg, model = build(kind, method)
    B, T = 2, 8
    est = estimate(kind, method, cfg, B, T)
    params = {id(p): p for p in model.parameters()}.values()
    assert (est.trainable_params, est.total_params) == count_trainable(model)
    assert est.weights == sum(p.numel() * p.element_size() for p in params)
    opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=1e-3)
    model_forward(model, batch_for(kind, B, T)).loss.backward()
    assert est.gradients == sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    opt.step()
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values())
    assert est.optimizer_state == state


@pytest.mark.parametrize("kind", ["gpt", "bert"])
def test_prefix_with_reparameterization_counts_exactly(kind):
    cfg, model = build(kind, "full")
    head = ("classifier",) if kind == "bert" else ()
    prefix.apply(model, prefix.PrefixConfig(num_virtual_tokens=P, projection_dim=7, modules_to_save=head))
    est = estimate(kind, "prefix", cfg, 2, 8, projection_dim=7)
    assert (est.trainable_params, est.total_params) == count_trainable(model)


def test_frozen_weights_in_bf16_halve_their_bytes():
    cfg, model = build("gpt", "lora")
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    est = A.estimate_memory(cfg, "lora", 2, 8, "bf16", frozen_dtype="bf16", **OPTS["lora"])
    assert est.weights == sum(p.numel() * p.element_size() for p in model.parameters())


def test_probe_keeps_every_hidden_state_and_trains_nothing():
    cfg, model = build("gpt", "probe")
    with torch.no_grad():
        out = model(batch_for("gpt", 2, 12)["input_ids"], output_hidden_states=True, compute_logits=False)
    est = A.estimate_memory(cfg, "probe", 2, 12, "fp32", device="cpu")
    assert est.activations == sum(h.numel() * h.element_size() for h in out.hidden_states)
    assert est.trainable_params == est.gradients == est.optimizer_state == 0


def test_known_sizes_and_peak_structure():
    gpt2 = A.preset("gpt2")
    e = A.estimate_memory(gpt2, "full", 8, 1024)
    assert e.total_params == 124_439_808  # GPT-2 small, tied head
    assert A.estimate_memory(gpt2, "lora", 8, 1024).trainable_params == 12 * 2 * 8 * (768 + 768)
    assert e.peak == max(e.backward_peak, e.step_peak) and e.phase == "start of backward"
    assert e.total >= e.peak
    small = A.estimate_memory(gpt2, "full", 1, 8)  # tiny batch: the optimizer step is the peak
    assert small.phase == "optimizer step" and small.peak == small.step_peak
    sizes = [A.estimate_memory(gpt2, "lora", b, 512).peak for b in (1, 2, 4)]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    assert "peak" in e.table() and "GiB" in e.table()


# ---------------------------------------------------------------------------- recommend and the CLI

def test_recommend_ranks_what_fits_and_names_the_disagreement():
    rec = A.recommend(A.preset("gpt2"), 6, 8, 1024, "classification", similarity=0.9)
    assert rec.by_task.method == "layer_wise_freezing" and rec.by_resources.method == "prefix_tuning"
    assert rec.grounded and all(c.fits for c in rec.grounded)
    budget = 6 * A.GiB * 0.9
    assert all(c.peak_bytes <= budget for c in rec.grounded) and all(c.peak_bytes > budget for c in rec.rejected)
    assert "full" in [c.method for c in rec.rejected]
    assert rec.grounded[0].method == "freeze"  # the task rule's pick fits, so it comes first
    assert "disagree" in rec.summary
    mid = A.recommend(A.preset("gpt2"), 24, 8, 1024, "qa")  # rules: lora; full fits too
    assert mid.grounded[0].method == "lora" and "full fine-tuning also fits" in mid.summary
    big = A.recommend(A.preset("gpt2"), 80, 8, 1024, "generation", data_quality="high")
    assert big.grounded[0].method == "full" and not big.rejected
    none = A.recommend(A.preset("gpt2-large"), 1, 8, 1024, "qa")
    assert not none.grounded and "nothing fits" in none.summary and "does not fit" in none.summary


def test_cli_recommend_json_and_text(capsys, tmp_path):
    assert main(["recommend", "--preset", "gpt2", "--gpu-mem", "16", "--batch", "8", "--seq-len", "1024",
                 "--task", "code", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["by_task"]["method"] == "adalora" and out["by_resources"]["method"] == "lora"
    assert {c["method"] for c in out["grounded"]} <= set(A.METHODS)
    d = tmp_path / "g"  # an HF-format directory: only config.json is read
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 97, "n_positions": 64,
                                               "n_embd": 32, "n_layer": 2, "n_head": 4}))
    assert main(["recommend", "--model", str(d), "--gpu-mem", "4", "--batch", "2", "--seq-len", "32"]) == 0
    text = capsys.readouterr().out
    assert "rule table, by resources: prefix_tuning" in text and "grounded" in text
    d = tmp_path / "b"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "model_type": "bert", "vocab_size": 99, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 64, "max_position_embeddings": 64}))
    assert main(["recommend", "--model", str(d), "--gpu-mem", "4", "--task", "classification",
                 "--similarity", "0.8", "--seq-len", "32"]) == 0
    assert "by task:      lora" in capsys.readouterr().out


@pytest.mark.parametrize("argv, match", [
    (["--preset", "gpt2", "--gpu-mem", "-8"], "positive"),
    (["--preset", "gpt5", "--gpu-mem", "8"], "unknown preset"),
    (["--preset", "bert-base", "--gpu-mem", "8", "--task", "classification", "--similarity", "1.2"], r"\[0, 1\]"),
    (["--preset", "gpt2", "--gpu-mem", "8", "--task", "poetry"], "unknown task"),
    (["--model", "/nonexistent/dir", "--gpu-mem", "8"], "does not exist"),
])
def test_cli_bad_input_exits_2_with_one_line(argv, match, capsys):
    assert main(["recommend", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert __import__("re").search(match, err)
