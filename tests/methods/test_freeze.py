"""Full fine-tuning, freezing strategies, gradual unfreezing, discriminative lrs and BitFit."""
import math

import pytest
import torch

from minift.methods import freeze, full
from minift.methods.freeze import FreezeConfig
from minift.models.bert import BertClassifier, BertConfig
from minift.models.gpt import GPT, GPTConfig


L12 = 12


def bert12(n_layer=L12):
    torch.manual_seed(0)
    return BertClassifier(BertConfig(vocab_size=40, max_position_embeddings=16, n_layer=n_layer, n_head=2,
                                     n_embd=8, n_inner=16, dropout=0.0), num_labels=3)


def gpt12(n_layer=L12):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=40, block_size=16, n_layer=n_layer, n_head=2, n_embd=8))


def expected_names(model, layers, extra_prefixes):
    """Parameter names of the given blocks plus those starting with any of extra_prefixes."""
    prefix = "bert.layers." if isinstance(model, BertClassifier) else "layers."
    want = tuple(f"{prefix}{i}." for i in layers) + tuple(extra_prefixes)
    return sorted(n for n, _ in model.named_parameters() if n.startswith(want))


HEAD = ("bert.pooler.", "classifier.")
# strategy -> (trainable blocks of a 12-layer model, pooler trainable?, grad_from_layer)
CASES = [
    (FreezeConfig("bottom_up"), range(6, 12), True, 6),
    (FreezeConfig("top_down"), range(0, 6), False, 0),
    (FreezeConfig("alternating"), [1, 3, 5, 7, 9, 11], True, 1),
    (FreezeConfig("ratio", ratio=0.25), range(3, 12), True, 3),
    (FreezeConfig("ratio", ratio=0.0), range(0, 12), True, 0),
    (FreezeConfig("ratio", ratio=1.0), [], False, 12),
    (FreezeConfig("adaptive", task_similarity=0.9), range(8, 12), True, 8),  # 70%: 8.4 -> 8
    (FreezeConfig("adaptive", task_similarity=0.6), range(5, 12), True, 5),  # 40%: 4.8 -> 5
    (FreezeConfig("adaptive", task_similarity=0.1), range(2, 12), True, 2),  # 20%: 2.4 -> 2
    (FreezeConfig("layers", layers=(0, 5, 11)), [1, 2, 3, 4, 6, 7, 8, 9, 10], False, 1),
]


@pytest.mark.parametrize("cfg,blocks,pooler,gfl", CASES, ids=lambda c: getattr(c, "strategy", None))
def test_trainable_set_of_each_strategy_on_12_layers(cfg, blocks, pooler, gfl):
    model = bert12()
    names = freeze.apply(model, cfg)
    want = expected_names(model, blocks, HEAD if pooler else ("classifier.",))
    assert sorted(names) == want
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == want
    assert not any(n.startswith("bert.embeddings.") for n in names)
    assert model.bert.grad_from_layer == gfl


def test_gpt_strategies_and_unfrozen_embeddings():
    model = gpt12()
    names = freeze.apply(model, FreezeConfig("bottom_up"))
    assert sorted(names) == expected_names(model, range(6, 12), ("ln_f.",))  # no classifier: skipped
    assert model.grad_from_layer == 6
    names = freeze.apply(model, FreezeConfig("top_down", freeze_embeddings=False))
    assert sorted(names) == expected_names(model, range(6), ("wte.", "wpe."))  # ln_f follows block 11
    assert model.grad_from_layer == 0  # embeddings train, so block 0 needs a graph
    names = freeze.apply(model, FreezeConfig("bottom_up", freeze_embeddings=False))
    assert model.grad_from_layer == 0 and "wte.weight" in names


def test_full_makes_everything_trainable_and_resets_shortcut():
    model = bert12()
    freeze.apply(model, FreezeConfig("bottom_up"))
    names = full.apply(model)
    assert names == [n for n, _ in model.named_parameters()]
    assert all(p.requires_grad for p in model.parameters())
    assert model.bert.grad_from_layer == 0


@pytest.mark.parametrize("n_layer,ratio,n_frozen", [
    (12, 0.125, 2),   # 1.5 rounds half up
    (12, 0.04, 0),    # 0.48
    (12, 0.0417, 1),  # 0.5004
    (10, 0.7, 7),     # 0.7 * 10 = 7.000000000000001 in floating point
    (10, 0.35, 4),    # 3.5 -> 4
    (12, 1.0, 12),
    (12, 0.0, 0),
])
def test_ratio_rounding(n_layer, ratio, n_frozen):
    assert freeze.frozen_layers(FreezeConfig("ratio", ratio=ratio), n_layer) == list(range(n_frozen))


def test_adaptive_thresholds_are_strict_at_their_boundaries():
    up = lambda x: math.nextafter(x, 2.0)  # noqa: E731
    assert freeze.adaptive_ratio(up(0.8)) == 0.7
    assert freeze.adaptive_ratio(0.8) == 0.4      # exactly 0.8 is not > 0.8
    assert freeze.adaptive_ratio(up(0.5)) == 0.4
    assert freeze.adaptive_ratio(0.5) == 0.2      # exactly 0.5 is not > 0.5
    assert freeze.adaptive_ratio(0.0) == 0.2 and freeze.adaptive_ratio(1.0) == 0.7
    fl = lambda s: freeze.frozen_layers(FreezeConfig("adaptive", task_similarity=s), 12)  # noqa: E731
    assert fl(0.8) == list(range(5)) and fl(up(0.8)) == list(range(8))
    assert fl(0.5) == list(range(2)) and fl(up(0.5)) == list(range(5))


@pytest.mark.parametrize("kwargs,msg", [
    (dict(strategy="ratio", ratio=-0.1), r"ratio must be in \[0, 1\]"),
    (dict(strategy="ratio", ratio=1.5), r"ratio must be in \[0, 1\]"),
    (dict(strategy="ratio", ratio=float("nan")), r"ratio must be in \[0, 1\]"),
    (dict(strategy="adaptive", task_similarity=1.2), r"task_similarity must be in \[0, 1\]"),
    (dict(strategy="ratio"), r"needs ratio"),
    (dict(strategy="adaptive"), r"needs task_similarity"),
    (dict(strategy="bottom_up", ratio=0.5), r"ratio is only used by strategy='ratio'"),
    (dict(strategy="layers", layers=(1, -1)), r"non-negative layer indices"),
    (dict(strategy="bottomup"), r"strategy must be one of bottom_up, top_down"),
])
def test_bad_config(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        FreezeConfig(**kwargs)


def test_bad_input_at_apply():
    model = bert12()
    with pytest.raises(ValueError, match=r"layer 12 is out of range: the model has layers 0\.\.11"):
        freeze.apply(model, FreezeConfig("layers", layers=(3, 12)))
    with pytest.raises(ValueError, match="matches no Module.*available names"):
        freeze.apply(model, FreezeConfig(modules_to_save=("score",)))
    with pytest.raises(ValueError, match="GPT, Llama, Bert and BertClassifier"):
        freeze.apply(torch.nn.Linear(2, 2), FreezeConfig())


# ---------------------------------------------------------------- frozen layers cost less

def _record(model, layers, fn):
    """Run fn() recording, per block, the grad mode it ran in and the tensors it saved for backward."""
    current, saved, grad_mode = [None], {i: 0 for i in range(len(layers))}, {}
    hooks = []
    for i, block in enumerate(layers):
        def pre(mod, args, i=i):
            current[0] = i
            grad_mode[i] = torch.is_grad_enabled()
        hooks.append(block.register_forward_pre_hook(pre))
        hooks.append(block.register_forward_hook(lambda *a: current.__setitem__(0, None)))

    def pack(t):
        if current[0] is not None:
            saved[current[0]] += 1
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    for h in hooks:
        h.remove()
    return saved, grad_mode


@pytest.mark.parametrize("make", [bert12, gpt12], ids=["bert", "gpt"])
def test_frozen_bottom_saves_nothing_and_gradients_match_naive(make):
    ids = torch.randint(1, 40, (2, 10))
    batch_kw = dict(labels=torch.tensor([0, 2])) if make is bert12 else dict(targets=ids)
    # naive freezing: every parameter keeps requires_grad, the optimizer just leaves some out
    naive = make(4)
    saved_n, _ = _record(naive, naive.layers, lambda: naive(ids, **batch_kw).loss.backward())
    model = make(4)
    names = freeze.apply(model, FreezeConfig("bottom_up"))
    assert (model.bert if make is bert12 else model).grad_from_layer == 2
    saved_f, grad_mode = _record(model, model.layers, lambda: model(ids, **batch_kw).loss.backward())
    assert saved_n[0] > 0 and saved_n[1] > 0  # the naive version keeps activations of blocks 0, 1
    assert saved_f[0] == 0 and saved_f[1] == 0  # frozen blocks: nothing saved for backward
    assert 0 < saved_f[2] <= saved_n[2] and saved_f[3] == saved_n[3] > 0  # block 2's input needs no grad
    assert grad_mode == {0: False, 1: False, 2: True, 3: True}  # run under no_grad
    naive_params = dict(naive.named_parameters())
    for n, p in model.named_parameters():
        if n in names:
            torch.testing.assert_close(p.grad, naive_params[n].grad, rtol=0, atol=0)
        else:
            assert p.grad is None


# ---------------------------------------------------------------- ULMFiT and BitFit

def _trainable_blocks(model):
    return [i for i, b in enumerate(model.layers) if any(p.requires_grad for p in b.parameters())]


def test_gradual_unfreezing_schedule_step_by_step():
    model = bert12(4)
    u = freeze.GradualUnfreezer(model, every=2)
    assert _trainable_blocks(model) == [3] and model.bert.grad_from_layer == 3
    assert model.classifier.weight.requires_grad and model.bert.pooler.weight.requires_grad
    assert not model.bert.embeddings.word_embeddings.weight.requires_grad
    expect = {0: [], 1: [], 2: [2], 3: [], 4: [1], 5: [], 6: [0], 7: [], 8: [], 20: []}
    for s, new in expect.items():
        assert u.step(s) == new, s
        assert _trainable_blocks(model) == u.trainable_layers()
        assert model.bert.grad_from_layer == u.trainable_layers()[0]
    assert _trainable_blocks(model) == [0, 1, 2, 3]
    u = freeze.GradualUnfreezer(gpt12(), every=10, start_layers=2, group_size=3)
    assert u.trainable_layers() == [10, 11]
    assert u.step(9) == [] and u.step(10) == [7, 8, 9] and u.step(35) == list(range(1, 7))
    assert u.step(40) == [0] and u.model.grad_from_layer == 0
    with pytest.raises(ValueError, match="every must be >= 1"):
        freeze.GradualUnfreezer(model, every=0)
    with pytest.raises(ValueError, match=r"start_layers must be in \[0, 4\]"):
        freeze.GradualUnfreezer(model, every=1, start_layers=5)


def test_unfrozen_layers_get_updated_by_an_optimizer_built_at_the_start():
    model = bert12(3)
    u = freeze.GradualUnfreezer(model, every=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    stale = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids, labels = torch.randint(1, 40, (4, 6)), torch.tensor([0, 1, 2, 0])
    emb = model.bert.embeddings.word_embeddings.weight.detach().clone()
    first_change = {}
    for step in range(6):
        u.step(step)
        before = [torch.cat([p.detach().flatten().clone() for p in b.parameters()]) for b in model.layers]
        model(ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
        for i, b in enumerate(model.layers):
            if not torch.equal(before[i], torch.cat([p.detach().flatten() for p in b.parameters()])):
                first_change.setdefault(i, step)
    assert first_change == {2: 0, 1: 2, 0: 4}  # each block moves from the step it is unfrozen
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, emb)  # frozen: no decay either
    assert len(stale.param_groups[0]["params"]) < sum(1 for _ in model.parameters())  # the pitfall


def test_discriminative_lrs_step_by_step():
    model, lr, d = bert12(4), 1e-2, 2.6
    groups = freeze.discriminative_param_groups(model, lr, decay=d)
    assert [(g["name"], g["lr"]) for g in groups] == [
        ("embeddings", lr / d ** 4), ("layers.0", lr / d ** 3), ("layers.1", lr / d ** 2),
        ("layers.2", lr / d), ("layers.3", lr), ("head", lr)]
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())  # every parameter exactly once
    opt = torch.optim.SGD(groups, lr=123.0)
    before = [[p.detach().clone() for p in g["params"]] for g in groups]
    model(torch.randint(1, 40, (2, 5)), labels=torch.tensor([1, 2])).loss.backward()
    grads = [[p.grad.clone() for p in g["params"]] for g in groups]
    opt.step()
    for g, b0, gr in zip(groups, before, grads):
        for p, p0, gp in zip(g["params"], b0, gr):
            torch.testing.assert_close(p.detach(), p0 - g["lr"] * gp)
    freeze.apply(model, FreezeConfig("bottom_up"))
    names = [g["name"] for g in freeze.discriminative_param_groups(model, lr, trainable_only=True)]
    assert names == ["layers.2", "layers.3", "head"]
    with pytest.raises(ValueError, match="decay must be > 0"):
        freeze.discriminative_param_groups(model, lr, decay=0)


@pytest.mark.parametrize("make", [bert12, gpt12], ids=["bert", "gpt"])
def test_bitfit_trains_only_biases_and_head(make):
    model = make(2)
    names = freeze.bitfit(model)
    want = sorted(n for n, _ in model.named_parameters() if n.endswith(".bias") or n.startswith("classifier."))
    assert sorted(names) == want
    assert "classifier.weight" in names if make is bert12 else not any("classifier" in n for n in names)
    assert all(n.endswith(".bias") or n.startswith("classifier.") for n in names)
    assert (model.bert if make is bert12 else model).grad_from_layer == 0  # every block has biases
    trainable, total = sum(p.numel() for p in model.parameters() if p.requires_grad), \
        sum(p.numel() for p in model.parameters())
    assert 0 < trainable < 0.2 * total


def test_adapters_added_after_freezing_still_get_gradients():
    """freeze.apply sets grad_from_layer; LoRA added afterwards must not be skipped by it."""
    from minift.methods import lora
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=4, n_head=2, n_embd=8))
    freeze.apply(m, FreezeConfig("bottom_up"))
    assert m.grad_from_layer == 2
    lora.apply(m, lora.LoRAConfig(r=2, targets=("q_proj",)))
    ids = torch.randint(0, 50, (2, 6))
    m(ids, ids).loss.backward()
    for i, layer in enumerate(m.layers):
        assert layer.attn.q_proj.lora_A.grad is not None, f"layer {i} got no gradient"


def test_bitfit_head_lr_ratio_puts_the_head_in_its_own_group():
    from minift.methods.registry import build_method
    model = bert12(2)
    st = build_method(model, "bitfit", {"head_lr_ratio": 10}, lr=1e-3)
    groups = st.train_hooks()["param_groups"]
    by_name = {g["name"]: g for g in groups}
    head = {id(p) for p in model.classifier.parameters()}
    assert by_name["head"]["lr"] == pytest.approx(1e-2) and by_name["other"]["lr"] == pytest.approx(1e-3)
    assert {id(p) for p in by_name["head"]["params"]} == head
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in groups for p in g["params"]} == trainable  # every trainable tensor, once
    assert build_method(bert12(2), "bitfit", {}, lr=1e-3).train_hooks().get("param_groups") is None
    with pytest.raises(ValueError, match="head_lr_ratio must be a number > 0"):
        build_method(bert12(2), "bitfit", {"head_lr_ratio": 0}, lr=1e-3)
