"""One contract for every method of the registry: the same checks, through the same
``build_method`` + ``train``.

The rows come from ``minift.methods.registry.METHODS``: each method runs the rows CASES gives it
(id, model kind, options, expected trainable count as a function of the tiny model's sizes, or
None, and whether its init is a no-op), and a method CASES does not know yet runs with its
defaults on GPT and BERT. LLAMA_CASES gives every method its row on Llama (grouped-query
attention: 2 key/value heads for 4 query heads; BitFit on Qwen2's q/k/v biases, since a plain
Llama has no biases and BitFit refuses it); a method it does not know runs with its defaults
there. Each row checks that
  1. the trainable-parameter count matches the formula (or is > 0) and only the promised tensors
     train (a method that is not trained, the probe, trains nothing and changes no output),
  2. the method does not change the output before training where it promises a no-op init,
  3. a few steps of ``train`` on one batch lower the loss by a large factor (overfit),
  4. saving the trained weights and loading them into a freshly built model gives the same
     outputs (and, for PEFT methods with adapters.py support, through save/load_adapter;
     AdaLoRA's PEFT file up to rounding, as it keeps only the unpruned triplets).
"""
from dataclasses import fields

import pytest
import torch

from minift.methods import adalora
from minift.training.checkpoint import load_trainable_state, save_weights
from minift.methods.registry import METHODS, build_method, option_names, parse_method
from minift.models.bert import BertClassifier, BertConfig
from minift.models.gpt import GPT, GPTConfig
from minift.models.llama import Llama, LlamaConfig
from minift.training.loop import model_forward, train
from minift.training.config import TrainConfig

L, D, FF, V, C = 2, 32, 64, 61, 3  # layers, width, MLP width, vocab, classes
GPT_SIZES = dict(vocab_size=V, block_size=32, n_layer=L, n_head=4, n_embd=D, n_inner=FF)
BERT_SIZES = dict(vocab_size=V, max_position_embeddings=32, n_layer=L, n_head=4, n_embd=D, n_inner=FF,
                  dropout=0.0)
KV = 16  # Llama's key/value width: 2 key/value heads of head_dim 8 (its 4 query heads: 32)
LLAMA_SIZES = dict(vocab_size=V, max_position_embeddings=32, n_layer=L, n_head=4, n_kv_head=2, n_embd=D,
                   n_inner=FF)


def make(kind):
    torch.manual_seed(0)
    if kind == "gpt":
        model = GPT(GPTConfig(**GPT_SIZES))
        with torch.no_grad():  # weights nearer a trained GPT-2's scale than init's std 0.02: else the
            model.wte.weight.mul_(7.0)  # frozen tied head caps every logit near 0, and frozen
            for n, p in model.named_parameters():  # projections let a soft prompt barely move anything
                if n.endswith("proj.weight"):
                    p.mul_(5.0)
        return model
    if kind in ("llama", "qwen2"):  # qwen2: Llama with biases on q, k and v (BitFit's row)
        model = Llama(LlamaConfig(**LLAMA_SIZES, qkv_bias=kind == "qwen2"))
        with torch.no_grad():  # as for GPT: nearer a trained model's scale (the head is untied)
            model.embed_tokens.weight.mul_(7.0)
            model.lm_head.weight.mul_(7.0)
            for n, p in model.named_parameters():
                if n.endswith("proj.weight"):
                    p.mul_(5.0)
        return model
    return BertClassifier(BertConfig(**BERT_SIZES), num_labels=C)


def one_batch(kind):
    if kind in ("gpt", "llama", "qwen2"):  # learn to answer token 5 after anything: reachable by every method
        x = torch.tensor([[7, 8, 9, 10, 7, 8, 9, 10], [11, 12, 13, 14, 11, 12, 13, 14]])
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": torch.full_like(x, 5)}
    g = torch.Generator().manual_seed(1)
    x = torch.randint(1, V, (4, 10), generator=g)
    mask = torch.ones_like(x)
    if kind == "gpt":
        return {"input_ids": x, "attention_mask": mask, "labels": x}
    return {"input_ids": x, "attention_mask": mask, "token_type_ids": torch.zeros_like(x),
            "labels": torch.tensor([0, 1, 2, 1])}


def numel(model, pred):
    return sum(p.numel() for n, p in model.named_parameters() if pred(n))


HEAD = D * C + C                      # classifier weight + bias
LAYER = 4 * (D * D + D) + 2 * (D * FF) + FF + D + 2 * 2 * D  # 4 attn linears, MLP, 2 LayerNorms
LORA_QV = lambda r: L * 2 * (r * D + D * r)  # noqa: E731  A (r x D) and B (D x r) on q and v


def bitfit_count(m):
    return numel(m, lambda n: n.endswith(".bias") or n == "bias") + D * C  # biases + head weight


# Llama's linear layers (in, out): q, k, v, o, gate, up, down; k and v are KV wide (GQA)
LLAMA_LINEARS = {"q_proj": (D, D), "k_proj": (D, KV), "v_proj": (D, KV), "o_proj": (D, D),
                 "gate_proj": (D, FF), "up_proj": (D, FF), "down_proj": (FF, D)}
SEVEN = tuple(LLAMA_LINEARS)
LLAMA_LAYER = sum(i * o for i, o in LLAMA_LINEARS.values()) + 2 * D  # no biases; 2 RMSNorm weights
LORA_LLAMA = lambda r: L * sum(r * (i + o) for i, o in LLAMA_LINEARS.values())  # noqa: E731


# method -> rows: (id, model kind, options, expected trainable count (model -> int) or None, no-op init)
CASES = {
    "full": [("full-gpt", "gpt", {}, lambda m: sum(p.numel() for p in m.parameters()), True),
             ("full-bert", "bert", {}, lambda m: sum(p.numel() for p in m.parameters()), True)],
    "lora": [("lora-gpt", "gpt", {"r": 4, "alpha": 8, "targets": ("q_proj", "v_proj", "up_proj")},
              lambda m: LORA_QV(4) + L * (4 * D + FF * 4), True),
             ("lora-bert", "bert", {"r": 4, "alpha": 8, "targets": ("q_proj", "v_proj")},
              lambda m: LORA_QV(4) + HEAD, True),
             ("loraplus-bert", "bert", {"r": 4, "targets": ("q_proj", "v_proj", "up_proj"), "lr_ratio": 4.0},
              lambda m: LORA_QV(4) + L * (4 * D + FF * 4) + HEAD, True)],
    "dora": [("dora-bert", "bert", {"r": 4, "targets": ("q_proj", "v_proj")},
              lambda m: LORA_QV(4) + L * 2 * D + HEAD, True)],
    "freeze": [("freeze-bert", "bert", {"strategy": "bottom_up"},
                lambda m: (L - L // 2) * LAYER + (D * D + D) + HEAD, True),
               ("gradual-bert", "bert", {"unfreeze_every": 100, "lr_decay": 2.6},
                lambda m: LAYER + (D * D + D) + HEAD, True)],
    "bitfit": [("bitfit-bert", "bert", {}, bitfit_count, True)],
    "adalora": [("adalora-bert", "bert", {"init_r": 6, "target_r": 2, "targets": ("q_proj", "v_proj"),
                                          "tinit": 2, "tfinal": 2, "delta_t": 2},
                 lambda m: L * 2 * (6 * D + 6 + D * 6) + HEAD, True)],  # A (r x D), E (r x 1), B (D x r)
    "prefix": [("prefix-gpt", "gpt", {"num_virtual_tokens": 4, "projection_dim": 32},
                lambda m: 4 * D + (D * 32 + 32) + (32 * L * 2 * D + L * 2 * D), False)],
    "prompt": [("prompt-gpt", "gpt", {"num_virtual_tokens": 8}, lambda m: 8 * D, False)],
    "probe": [("probe-bert", "bert", {}, lambda m: 0, True), ("probe-gpt", "gpt", {}, lambda m: 0, True)],
}
# Llama: every method, LoRA-family and AdaLoRA on all seven projections
LLAMA_CASES = {
    "full": [("full-llama", "llama", {}, lambda m: sum(p.numel() for p in m.parameters()), True)],
    "lora": [("lora-llama", "llama", {"r": 4, "alpha": 8, "targets": SEVEN}, lambda m: LORA_LLAMA(4), True)],
    "dora": [("dora-llama", "llama", {"r": 4, "targets": SEVEN},  # + one magnitude per output row
              lambda m: LORA_LLAMA(4) + L * sum(o for _, o in LLAMA_LINEARS.values()), True)],
    "freeze": [("freeze-llama", "llama", {"strategy": "bottom_up"},  # top block, final norm, untied lm_head
                lambda m: (L - L // 2) * LLAMA_LAYER + D + V * D, True)],
    "bitfit": [("bitfit-qwen2", "qwen2", {}, lambda m: L * (D + KV + KV), True)],  # q, k, v biases
    "adalora": [("adalora-llama", "llama", {"init_r": 6, "target_r": 2, "targets": SEVEN,
                                            "tinit": 2, "tfinal": 2, "delta_t": 2},
                 lambda m: L * sum(6 * i + 6 + o * 6 for i, o in LLAMA_LINEARS.values()), True)],
    "prefix": [("prefix-llama", "llama", {"num_virtual_tokens": 4, "projection_dim": 32},  # rows KV wide
                lambda m: 4 * KV + (KV * 32 + 32) + (32 * L * 2 * KV + L * 2 * KV), False)],
    "prompt": [("prompt-llama", "llama", {"num_virtual_tokens": 8}, lambda m: 8 * D, False)],
    "probe": [("probe-llama", "llama", {}, lambda m: 0, True)],
}

ROWS = [(row[0], row[1], method, *row[2:]) for method in METHODS
        for row in CASES.get(method, [(f"{method}-{k}-defaults", k, {}, None, False) for k in ("gpt", "bert")])
        + LLAMA_CASES.get(method, [(f"{method}-llama-defaults", "llama", {}, None, False)])]
LR = {"full": 3e-3, "freeze": 3e-3, "bitfit": 3e-2, "lora": 3e-2, "dora": 1e-1, "prefix": 3e-2, "prompt": 1e-1}
# By how much a row's loss must fall (default 4), by row id or method. Prompt tuning only adds
# input vectors that the first LayerNorm rescales: on a tiny random model it moves the loss less
# than the others in 40 steps (Lester et al. note it needs scale). BitFit on Qwen2 has only the
# q/k/v biases (96 numbers here): the v bias adds a constant to each layer's output, the q/k
# biases barely move attention; its loss levels off near 1 at any learning rate.
FACTOR = {"prompt": 2.5, "bitfit-qwen2": 2.5}


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_method_contract(row, tmp_path):
    row_id, kind, method, opts, expected, noop_init = row
    batch = one_batch(kind)
    base = make(kind).eval()
    with torch.no_grad():
        before = model_forward(base, batch).loss.item()

    model = make(kind)
    st = build_method(model, method, opts, lr=LR.get(method, 1e-2), total_steps=40)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    n_trainable = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    if expected is not None:
        assert n_trainable == expected(model)
    if not METHODS[method].trained:  # the probe: the model stays frozen and unchanged
        assert n_trainable == 0 and st.train_hooks() == dict.fromkeys(st.train_hooks())
        with torch.no_grad():
            assert torch.equal(model_forward(model.eval(), batch).loss, model_forward(base, batch).loss)
        return
    assert 0 < n_trainable <= sum(p.numel() for p in model.parameters())
    if st.peft and method not in ("freeze", "bitfit"):  # adapters train; no base weight does
        base_names = {n for n, _ in base.named_parameters()}
        assert all(n not in base_names or n.startswith("classifier.") for n in trainable), sorted(trainable)
    if noop_init:
        with torch.no_grad():
            assert model_forward(model.eval(), batch).loss.item() == pytest.approx(before, abs=1e-5)

    cfg = TrainConfig(lr=LR.get(method, 1e-2), steps=40, warmup=0, schedule="constant", max_grad_norm=None,
                      progress=False, plot=False, seed=0)
    res = train(model, [batch], cfg, **st.train_hooks())
    if st.allocator is not None:  # AdaLoRA's allocator ran: the budget fell to target_r per module
        assert st.allocator.budget == opts["target_r"] * len(adalora.svd_modules(model))
    factor = FACTOR.get(row_id, FACTOR.get(method, 4.0))
    assert res.losses[-1] < res.losses[0] / factor, (res.losses[0], res.losses[-1])  # overfits one batch

    save_weights(model, tmp_path / "w")
    fresh = make(kind)
    build_method(fresh, method, opts, lr=1e-2, total_steps=40)
    load_trainable_state(fresh, tmp_path / "w" / "model.safetensors")
    with torch.no_grad():
        a, b = model_forward(model.eval(), batch).loss, model_forward(fresh.eval(), batch).loss
    assert torch.equal(a, b)
    if method in ("lora", "dora", "adalora", "prefix", "prompt"):  # the adapter files round-trip too
        from minift.adapters import load_adapter, save_adapter
        for layout in ("minift", "peft"):
            save_adapter(model, tmp_path / layout, layout=layout)
            fresh = load_adapter(make(kind), tmp_path / layout)
            with torch.no_grad():
                b = model_forward(fresh.eval(), batch).loss
            if layout == "peft" and method == "adalora":  # PEFT's file keeps only the unpruned triplets:
                torch.testing.assert_close(b, a, atol=1e-6, rtol=0)  # the same sum less its zero terms
            else:
                assert torch.equal(b, a), layout


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_parses_its_defaults_into_its_dataclasses(method):
    spec = METHODS[method]
    ms = parse_method(method, total_steps=2000)  # AdaLoRA's schedule needs the run's length
    for cls, got in ((spec.config, ms.config), (spec.training, ms.training)):
        assert (got is None) if cls is None else isinstance(got, cls)
    assert set(option_names(method)) == {f.name for c in (spec.config, spec.training) if c for f in fields(c)}


def test_an_option_of_another_method_names_where_it_was_given():
    with pytest.raises(ValueError, match=r"^run.toml: \[method\] r does not apply to --method full"):
        parse_method("full", {"r": 8}, origin={"r": "run.toml: [method] r"})
    with pytest.raises(ValueError, match=r"^--num-virtual-tokens does not apply to --method lora \(its options: "):
        parse_method("lora", {"num_virtual_tokens": 8})


def test_every_cli_flag_is_an_option_of_some_method():
    from minift.training.settings import METHOD_FLAGS
    options = {n for m in METHODS for n in option_names(m)}
    assert {name for name, _, _ in METHOD_FLAGS} <= options
