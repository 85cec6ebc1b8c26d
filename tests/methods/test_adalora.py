"""AdaLoRA: PEFT's RankAllocator as the oracle for the schedule and the pruning; algebra of
SVDLinear (no-op init, merge, finalize); the orthogonal penalty's formula and gradient;
batched factors equal the per-module path, with an overhead per shape group; a small
training run; clear errors on bad input."""
import contextlib
import copy
import types

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minift.methods import adalora
from minift.methods.adalora import AdaLoRAConfig, SVDLinear
from minift.methods.adalora_alloc import RankAllocator
from minift.models.gpt import GPT, GPTConfig
from minift.training.loop import model_forward, train
from minift.training.config import TrainConfig

from conftest import TINY_GPT, peft_adalora_pruned


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d + 8)  # two shapes: two score groups


class Toy(nn.Module):
    def __init__(self, d=16, n=3):
        super().__init__()
        self.layers = nn.ModuleList(Block(d) for _ in range(n))

    def forward(self, x):
        return sum(b.q_proj(x).sum() + b.v_proj(x).sum() for b in self.layers)


def gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(**TINY_GPT)).eval()


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, TINY_GPT["vocab_size"], (2, 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def cfg(**kw):
    base = dict(init_r=6, target_r=2, alpha=8, tinit=2, tfinal=3, delta_t=2, total_step=14)
    return AdaLoRAConfig(**{**base, **kw})


def randomize(model, seed=0, prune=True):
    """Random Λ (non-zero) and, with ``prune``, a random pruning through a few allocator steps."""
    g = torch.Generator().manual_seed(seed)
    mods = adalora.svd_modules(model)
    with torch.no_grad():
        for _, m in mods:
            m.lora_E.copy_(torch.randn(m.lora_E.shape, generator=g))
    if prune:
        alloc = RankAllocator(model, model.adalora_config)
        for _, m in mods:
            for p in (m.lora_A, m.lora_E, m.lora_B):
                p.grad = torch.randn(p.shape, generator=g)
        end = alloc.cfg.total_step - alloc.cfg.tfinal
        alloc.step(model, end - 1)  # scores from these gradients,
        alloc.step(model, end)  # then the final prune, to the target
        return alloc


# ---------------------------------------------------------------------------- PEFT oracle

@settings(max_examples=25, deadline=None)
@given(init_r=st.integers(1, 12), dr=st.integers(0, 11), n=st.integers(1, 6), tinit=st.integers(0, 20),
       tfinal=st.integers(0, 20), extra=st.integers(1, 40), delta_t=st.integers(1, 12))
def test_budget_schedule_matches_peft(init_r, dr, n, tinit, tfinal, extra, delta_t):
    PeftAllocator = pytest.importorskip("peft.tuners.adalora.layer").RankAllocator
    target_r = max(1, init_r - dr)
    total = tinit + tfinal + extra
    try:
        c = AdaLoRAConfig(init_r=init_r, target_r=target_r, tinit=tinit, tfinal=tfinal, delta_t=delta_t,
                          total_step=total)
    except ValueError as e:  # only the never-pruning schedule is refused (PEFT accepts it)
        assert "nothing would ever be pruned" in str(e)
        return
    fake = types.SimpleNamespace(named_parameters=lambda: [(f"m{i}.lora_A.default", torch.zeros(init_r, 1))
                                                           for i in range(n)])
    pc = types.SimpleNamespace(beta1=0.85, beta2=0.85, target_r=target_r, tinit=tinit, tfinal=tfinal,
                               total_step=total, deltaT=delta_t)
    oracle = PeftAllocator(fake, pc, "default")
    for t in range(total + 3):
        b, mask_ind = oracle.budget_schedule(t)
        assert adalora.budget(c, t, n) == b, t
        if t < total - tfinal:  # PEFT's update_and_allocate prunes at these steps, and at total - tfinal
            assert adalora.prunes_at(c, t) == mask_ind, t
    assert adalora.prunes_at(c, total - tfinal) and adalora.budget(c, total - tfinal, n) == target_r * n
    assert adalora.budget(c, 0) == init_r


@pytest.mark.parametrize("seed,conf", [
    (0, dict(init_r=6, target_r=2, tinit=2, tfinal=3, delta_t=2, total_step=14)),
    (1, dict(init_r=8, target_r=3, tinit=0, tfinal=2, delta_t=1, total_step=10, beta1=0.7, beta2=0.9)),
    (2, dict(init_r=5, target_r=1, tinit=3, tfinal=0, delta_t=3, total_step=13)),
])
def test_pruning_matches_peft_rank_allocator(seed, conf):
    peft = pytest.importorskip("peft")
    torch.manual_seed(seed)
    base = Toy()
    c = AdaLoRAConfig(alpha=8, **conf)
    mine = copy.deepcopy(base)
    adalora.apply(mine, c)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.AdaLoraConfig(
        target_modules=["q_proj", "v_proj"], init_r=c.init_r, target_r=c.target_r, lora_alpha=c.alpha,
        tinit=c.tinit, tfinal=c.tfinal, deltaT=c.delta_t, total_step=c.total_step, beta1=c.beta1,
        beta2=c.beta2))
    inner = theirs.base_model.model
    alloc = RankAllocator(mine, c)
    g = torch.Generator().manual_seed(seed)
    pruned_once = False
    for t in range(c.total_step + 2):
        for name, m in adalora.svd_modules(mine):  # identical weights (an "optimizer update") and gradients
            pm = inner.get_submodule(name)
            for pn in ("lora_A", "lora_E", "lora_B"):
                p, q = getattr(m, pn), getattr(pm, pn)["default"]
                with torch.no_grad():
                    p.add_(0.1 * torch.randn(p.shape, generator=g))
                    q.copy_(p)
                grad = torch.randn(p.shape, generator=g)
                p.grad, q.grad = grad.clone(), grad.clone()
        b = alloc.step(mine, t)
        theirs.base_model.update_and_allocate(t)
        if t <= c.total_step - c.tfinal:
            assert b == theirs.base_model.rankallocator.budget_schedule(t)[0]
        for name, m in adalora.svd_modules(mine):
            assert torch.equal(m.lora_E, inner.get_submodule(name).lora_E["default"]), (t, name)
        pattern = theirs.peft_config["default"].rank_pattern
        if pattern:
            pruned_once = True
            assert adalora.rank_pattern(mine) == {k.removesuffix(".lora_E.default"): v for k, v in pattern.items()}
            if adalora.prunes_at(c, t):
                assert sum(map(sum, pattern.values())) == b  # distinct scores: the budget, exactly
    assert pruned_once


# ---------------------------------------------------------------------------- allocator

def test_live_count_equals_budget_and_ties_prune_in_module_order():
    model = Toy()
    c = cfg(init_r=4, target_r=1, tinit=0, tfinal=0, delta_t=1, total_step=6)
    adalora.apply(model, c)
    alloc = RankAllocator(model, c)
    for _, m in adalora.svd_modules(model):
        for p in (m.lora_A, m.lora_E, m.lora_B):
            p.grad = torch.zeros_like(p)  # every score is 0: all tied
    for t in range(6):
        b = alloc.step(model, t)
        flags = [f for v in adalora.rank_pattern(model).values() for f in v]
        assert sum(flags) == b == adalora.budget(c, t, 6)
        assert flags == [False] * (24 - b) + [True] * b  # earlier in module order is pruned first


def test_allocator_step_never_reads_a_tensor_back():
    """No .item(), bool(tensor) or boolean-mask indexing (each a GPU sync) in any phase's step:
    recorded at the dispatcher, the ops that copy a value to the host never appear."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            self.ops.add(name)
            if name in ("index", "index_put", "index_put_") and any(
                    i is not None and i.dtype == torch.bool for i in args[1]):
                self.ops.add("boolean-mask indexing")  # needs nonzero(): a sync on GPU
            return func(*args, **(kwargs or {}))
    model, c = Toy(), cfg(tinit=1, tfinal=2, delta_t=1, total_step=6)
    adalora.apply(model, c)
    alloc = RankAllocator(model, c)
    for t in range(7):
        for _, m in adalora.svd_modules(model):
            for p in (m.lora_A, m.lora_E, m.lora_B):
                p.grad = torch.randn_like(p)
        with Record():
            alloc.step(model, t)
    assert {"sort", "index_put_", "_foreach_mul_"} <= Record.ops  # it did prune, batched
    assert not Record.ops & {"_local_scalar_dense", "nonzero", "boolean-mask indexing"}, Record.ops


def test_allocator_state_round_trip():
    model, c = gpt(), cfg()
    adalora.apply(model, c)
    a = RankAllocator(model, c)
    loss = model_forward(model, batch()).loss
    loss.backward()
    a.step(model, 0)
    b = RankAllocator(model, c)
    b.load_state_dict(a.state_dict())
    assert b.budget == a.budget
    assert all(torch.equal(x, y) for x, y in zip(a.ipt_ema + a.unc_ema, b.ipt_ema + b.unc_ema))
    assert torch.equal(a.triplet_scores(), b.triplet_scores())


# ---------------------------------------------------------------------------- algebra

def test_init_is_noop_and_only_adapters_train():
    base, model = gpt(), gpt()
    names = adalora.apply(model, cfg())
    assert names == [f"layers.{i}.attn.{p}_proj" for i in range(2) for p in "qv"]
    with torch.no_grad():
        assert torch.equal(model_forward(model, batch()).loss, model_forward(base, batch()).loss)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.rsplit(".", 1)[-1] in ("lora_A", "lora_E", "lora_B") for n in trainable)
    assert sum(p.numel() for n, p in model.named_parameters() if p.requires_grad) == 4 * 6 * (32 + 1 + 32)


def test_pruned_triplets_contribute_nothing_and_merge_equals_unmerged():
    model = gpt()
    adalora.apply(model, cfg())
    randomize(model)
    x = batch()
    with torch.no_grad():
        ref = model_forward(model, x).loss
        w0 = {n: m.weight.clone() for n, m in adalora.svd_modules(model)}
        for _, m in adalora.svd_modules(model):  # rewrite P and Q of pruned triplets: nothing changes
            dead = ~m.lora_mask
            m.lora_A[dead] = torch.randn_like(m.lora_A[dead])
            m.lora_B[:, dead] = torch.randn_like(m.lora_B[:, dead])
        assert torch.equal(model_forward(model, x).loss, ref)
        logits = model(x["input_ids"]).logits
        adalora.merge(model)
        torch.testing.assert_close(model(x["input_ids"]).logits, logits, atol=1e-5, rtol=1e-5)
        adalora.unmerge(model)
        for n, m in adalora.svd_modules(model):
            torch.testing.assert_close(m.weight, w0[n], atol=1e-6, rtol=0)


def test_finalize_keeps_outputs_and_shrinks():
    model = gpt()
    c = cfg()
    adalora.apply(model, c)
    randomize(model)
    pattern = adalora.rank_pattern(model)
    x = batch()["input_ids"]
    with torch.no_grad():
        before = model(x).logits
    ranks = adalora.finalize(model)
    assert ranks == {n: sum(v) for n, v in pattern.items()} and sum(ranks.values()) == 4 * c.target_r
    with torch.no_grad():
        assert (model(x).logits - before).abs().max() <= 1e-6
    for n, m in adalora.svd_modules(model):
        assert m.lora_A.shape == (ranks[n], 32) and m.lora_B.shape == (32, ranks[n]) and m.lora_A.requires_grad
        assert m.scaling == pytest.approx(c.alpha / (c.init_r + 1e-5))  # ranknum stays init_r, as in PEFT
    fresh = gpt()  # a finalized adapter loads into a model built from its rank pattern
    adalora.apply(fresh, c, rank_pattern=pattern)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x).logits, model(x).logits)


def test_orth_penalty_formula_and_gradcheck():
    torch.manual_seed(0)
    model = Toy(d=6, n=2).double()
    adalora.apply(model, cfg(init_r=3, target_r=1))
    mods = [m for _, m in adalora.svd_modules(model)]
    want = sum(((m.lora_B.T @ m.lora_B - torch.eye(3, dtype=torch.double)) ** 2).sum()
               + ((m.lora_A @ m.lora_A.T - torch.eye(3, dtype=torch.double)) ** 2).sum() for m in mods) / 8
    torch.testing.assert_close(adalora.orth_penalty(model), want, rtol=1e-12, atol=0)
    for m in mods:  # exactly orthonormal P and Q: the penalty is 0
        with torch.no_grad():
            m.lora_A.copy_(torch.linalg.qr(torch.randn(m.in_features, 3, dtype=torch.double))[0].T)
            m.lora_B.copy_(torch.linalg.qr(torch.randn(m.out_features, 3, dtype=torch.double))[0])
    assert adalora.orth_penalty(model).item() == pytest.approx(0.0, abs=1e-20)
    leaves = [torch.randn(p.shape, dtype=torch.double, requires_grad=True)
              for m in mods for p in (m.lora_A, m.lora_B)]
    for m in mods:
        del m._parameters["lora_A"], m._parameters["lora_B"]

    def f(*ts):
        for m, A, B in zip(mods, ts[0::2], ts[1::2]):
            m.lora_A, m.lora_B = A, B
        return adalora.orth_penalty(model)
    assert torch.autograd.gradcheck(f, leaves)


def test_orth_penalty_with_ranks_that_differ_between_modules():
    """A loaded rank pattern gives modules of several r: the Grams are grouped by r."""
    torch.manual_seed(0)
    model, c = Toy(d=6, n=2).double(), cfg(init_r=3, target_r=1)
    names = [f"layers.{i}.{p}_proj" for i in range(2) for p in "qv"]
    adalora.apply(model, c, rank_pattern={n: [True] * k for n, k in zip(names, (3, 2, 1, 2))})
    mods = [m for _, m in adalora.svd_modules(model)]
    eye = lambda r: torch.eye(r, dtype=torch.double)  # noqa: E731
    want = sum(((m.lora_B.T @ m.lora_B - eye(m.r)) ** 2).sum() + ((m.lora_A @ m.lora_A.T - eye(m.r)) ** 2).sum()
               for m in mods) / 8
    torch.testing.assert_close(adalora.orth_penalty(model), want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_batched_factors_give_the_same_loss_and_gradients(checkpointing):
    model = gpt()
    adalora.apply(model, cfg(targets=("q_proj", "v_proj", "up_proj", "down_proj")))  # three shape groups
    randomize(model)
    model.train().checkpointing = checkpointing
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads(context):
        with context(model):
            loss = model_forward(model, batch()).loss + 0.5 * adalora.orth_penalty(model)
        grads = torch.autograd.grad(loss, params)
        return loss, grads
    plain, plain_grads = loss_and_grads(lambda m: contextlib.nullcontext())
    batched, batched_grads = loss_and_grads(adalora.batched_factors)
    torch.testing.assert_close(batched, plain, rtol=1e-6, atol=1e-6)
    for g, h in zip(batched_grads, plain_grads):
        torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-7)
    mods = [m for _, m in adalora.svd_modules(model)]
    def left():  # the stacks or a module's factors outlive the block
        return getattr(model, "adalora_stacks", None) is not None or any(m.factors is not None for m in mods)
    assert not left()
    with pytest.raises(RuntimeError, match="boom"), adalora.batched_factors(model):
        raise RuntimeError("boom")
    assert not left()  # an exception inside leaves nothing behind either
    if not checkpointing:  # (with it, batched_factors leaves the modules alone)
        with adalora.batched_factors(model), pytest.raises(ValueError, match="already active"):
            with adalora.batched_factors(model):
                pass


def test_training_with_batched_factors_equals_without():
    """Same losses, pattern and weights through pruning, with ``train``'s forward_context or without."""
    from minift.methods.registry import build_method
    opts = dict(init_r=4, target_r=2, targets=("q_proj", "v_proj", "up_proj"), tinit=1, tfinal=2, delta_t=1,
                total_step=7, orth_reg_weight=0.1)
    runs = []
    for batched in (True, False):
        model = gpt()
        hooks = build_method(model, "adalora", opts, lr=1e-2).train_hooks()
        if not batched:
            hooks["forward_context"] = None
        res = train(model, [batch(0), batch(1)], TrainConfig(lr=1e-2, steps=7, warmup=0, progress=False,
                                                             plot=False), **hooks)
        runs.append((res.losses, adalora.rank_pattern(model), model.state_dict()))
    (la, pa, sa), (lb, pb, sb) = runs
    assert la == pytest.approx(lb, rel=1e-5) and pa == pb
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-4, atol=1e-6)


def test_adalora_overhead_over_lora_is_per_shape_group_not_per_module():
    """With batched_factors, AdaLoRA's ops beyond LoRA's (Λ, the penalty) run once per shape
    group: going from 2 to 4 layers adds no kernel ops to that difference."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from minift.methods.registry import build_method

    class Kernels(TorchDispatchMode):  # ops that run a kernel: views left out
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "aten" and not func.is_view and func.overloadpacket.__name__ != "_unsafe_view":
                self.n += 1
            return func(*args, **(kwargs or {}))

    def count(method, n_layer):
        torch.manual_seed(0)
        model = GPT(GPTConfig(**{**TINY_GPT, "n_layer": n_layer})).train()
        opts = dict(targets=("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"),
                    **({"tinit": 1, "tfinal": 1, "total_step": 10} if method == "adalora" else {}))
        hooks = build_method(model, method, opts).train_hooks()
        if method == "lora":  # LoRA's one-addmm forward (minift.fast), as AdaLoRA's SVDLinear does
            from minift.fast import lora as fast_lora
            fast_lora.enable(model, merged=False)
        with Kernels() as k:
            with (hooks["forward_context"] or (lambda m: contextlib.nullcontext()))(model):
                loss = model_forward(model, batch()).loss
                if hooks["penalty"] is not None:
                    loss = loss + hooks["penalty"](model)
            loss.backward()
        return k.n
    assert count("adalora", 4) - count("lora", 4) == count("adalora", 2) - count("lora", 2)


# ---------------------------------------------------------------------------- training

def test_training_reaches_target_budget_and_lowers_loss():
    model = gpt()
    c = cfg(init_r=6, target_r=2, tinit=4, tfinal=6, delta_t=2, total_step=30, alpha=16)
    adalora.apply(model, c)
    alloc = RankAllocator(model, c)
    res = train(model, [batch(0), batch(1)], TrainConfig(lr=2e-2, steps=c.total_step, warmup=0, schedule="constant",
                                                         progress=False, plot=False),
                allocator=alloc, penalty=lambda m: c.orth_reg_weight * adalora.orth_penalty(m))
    live = sum(map(sum, adalora.rank_pattern(model).values()))
    assert live == alloc.budget == 4 * c.target_r
    for _, m in adalora.svd_modules(model):  # the final pattern holds: pruned Λ are zero
        assert not m.lora_E[~m.lora_mask].any()
    assert sum(res.losses[-3:]) / 3 < 0.7 * sum(res.losses[:3]) / 3, (res.losses[:3], res.losses[-3:])


# ---------------------------------------------------------------------------- bad input

def test_allocator_without_gradients():
    model = gpt()
    adalora.apply(model, cfg())
    with pytest.raises(ValueError, match=r"needs gradients.*layers\.0\.attn\.q_proj\.lora_A.*loss\.backward"):
        RankAllocator(model, cfg()).step(model, 0)


@pytest.mark.parametrize("kw,msg", [
    (dict(tinit=10, tfinal=4, total_step=14), "schedule cannot fit"),
    (dict(tinit=3, tfinal=0, delta_t=20, total_step=14), "nothing would ever be pruned"),
    (dict(target_r=7), "target_r=7 must be <= init_r=6"),
    (dict(total_step=None), "total_step must be set"),
    (dict(beta1=1.0), "beta1 must be in"),
    (dict(delta_t=0), "delta_t must be an integer >= 1"),
])
def test_config_errors(kw, msg):
    with pytest.raises(ValueError, match=msg):
        cfg(**kw)


def test_rank_pattern_for_other_modules_and_other_misuse():
    model = gpt()
    c = cfg()
    pattern = {f"layers.{i}.attn.{p}_proj": [True, False] for i in range(2) for p in "qv"}
    with pytest.raises(ValueError, match=r"names 'layers\.0\.attn\.k_proj'.*adapted modules: layers\.0\.attn\.q_proj"):
        adalora.apply(model, c, rank_pattern={**pattern, "layers.0.attn.k_proj": [True]})
    with pytest.raises(ValueError, match=r"no entry for 'layers\.1\.attn\.v_proj'"):
        adalora.apply(gpt(), c, rank_pattern={k: v for k, v in pattern.items() if "1.attn.v" not in k})
    with pytest.raises(ValueError, match=r"rank 40 \(init_r=40\) is too large"):
        adalora.apply(gpt(), cfg(init_r=40, target_r=2))
    with pytest.raises(ValueError, match="no AdaLoRA layers"):
        RankAllocator(gpt(), c)
    other = gpt()
    adalora.apply(other, c)
    alloc = randomize(other)  # prunes to the target, then shrink
    adalora.finalize(other)
    with pytest.raises(ValueError, match="was finalized"):
        alloc.step(other, 0)
    adalora.apply(model, c, rank_pattern=pattern)
    with pytest.raises(ValueError, match="needs every AdaLoRA layer at init_r=6"):
        RankAllocator(model, c)
    with pytest.raises(ValueError, match="already has AdaLoRA layers"):
        adalora.apply(model, c)


# ---------------------------------------------------------------------------- adapter files

def test_minift_layout_round_trip_keeps_pruning_state(tmp_path):
    from minift.adapters import load_adapter, save_adapter
    model = gpt()
    adalora.apply(model, cfg())
    randomize(model)
    save_adapter(model, tmp_path, layout="minift")
    fresh = load_adapter(gpt(), tmp_path)
    assert adalora.rank_pattern(fresh) == adalora.rank_pattern(model)
    assert fresh.adalora_config == model.adalora_config
    x = batch()["input_ids"]
    with torch.no_grad():
        assert torch.equal(fresh(x).logits, model(x).logits)
    adalora.finalize(model)  # a finalized adapter round-trips too
    save_adapter(model, tmp_path / "final", layout="minift")
    fresh = load_adapter(gpt(), tmp_path / "final")
    with torch.no_grad():
        assert torch.equal(fresh(x).logits, model(x).logits)


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_peft_layout_both_ways(kind, tmp_path):
    peft = pytest.importorskip("peft")
    from conftest import hf_bert, hf_gpt2
    from minift.adapters import load_adapter, save_adapter
    from minift.models.bert import Bert
    hf, d = (hf_gpt2 if kind == "gpt2" else hf_bert)(tmp_path / "base")
    load = (lambda: GPT.from_pretrained(d)) if kind == "gpt2" else (lambda: Bert.from_pretrained(d))
    ids = batch()["input_ids"]

    def hf_out(m):
        with torch.no_grad():
            o = m(input_ids=ids)
        return o.logits if kind == "gpt2" else o.last_hidden_state

    def mine_out(m):
        with torch.no_grad():
            return m(ids).logits if kind == "gpt2" else m(ids).last_hidden_state
    # minift -> PEFT: pruned q/v (and up_proj), stacked into c_attn for GPT-2
    model = load()
    adalora.apply(model, cfg(targets=("q_proj", "v_proj", "up_proj")))
    randomize(model)
    save_adapter(model, tmp_path / "out", layout="peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "out").eval()
    torch.testing.assert_close(hf_out(theirs), mine_out(model), atol=1e-5, rtol=1e-5)
    # PEFT -> minift: a PEFT AdaLoRA, pruned by its own allocator, saved by save_pretrained
    targets = ["c_attn", "c_fc"] if kind == "gpt2" else ["query", "value", "intermediate.dense"]
    pm = peft_adalora_pruned(hf, tmp_path, target_modules=targets)
    mine = load_adapter(load(), tmp_path / "peft")
    torch.testing.assert_close(mine_out(mine), hf_out(pm), atol=1e-5, rtol=1e-5)
    assert sum(m.r for _, m in adalora.svd_modules(mine)) > 0


def test_loading_a_rank_pattern_for_other_modules(tmp_path):
    import json
    from minift.adapters import load_adapter, save_adapter
    model = gpt()
    adalora.apply(model, cfg())
    save_adapter(model, tmp_path, layout="peft")
    conf = json.loads((tmp_path / "adapter_config.json").read_text())
    conf["rank_pattern"]["transformer.h.7.attn.c_attn.lora_E"] = [True] * conf["init_r"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(conf))
    fresh = gpt()
    with pytest.raises(ValueError, match=r"rank_pattern names 'transformer\.h\.7\.attn\.c_attn', which this GPT"):
        load_adapter(fresh, tmp_path)
    assert not adalora.svd_modules(fresh)  # left as it was
