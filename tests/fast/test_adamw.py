"""minift.fast.adamw's step (clipping folded into the fused AdamW kernel) equals its reference,
clip_grad_norm_ then torch.optim.AdamW(fused=True).step(), to float rounding: weights, moments,
step counts and the clipped gradients, over several steps with a changing lr, on the CPU's fused
kernel and, where there is one, on the GPU's."""
import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.optim.optimizer import register_optimizer_step_pre_hook

from minift.fast import adamw as fast_adamw

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _model(seed, device, shapes=((6, 5), (5,), (3, 6), (3,))):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(device)) for s in shapes]


def _opt(ps, **kw):
    groups = [{"params": [p for p in ps if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in ps if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=1e-2, fused=True, **kw)


def _grads(ps, step, scale, seed, none_at=()):
    g = torch.Generator().manual_seed(seed * 1000 + step)
    for i, p in enumerate(ps):
        p.grad = None if i in none_at else (torch.randn(p.shape, generator=g) * scale).to(p.device, p.dtype)


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-7)


def _run(device, seed, scale, max_norm, steps, lean, none_at=(), state=None):
    ps = _model(seed, device)
    opt = _opt(ps)
    if state is not None:
        opt.load_state_dict(copy.deepcopy(state))  # (loading keeps the tensors it is given)
    step = fast_adamw.Step(opt)
    for i in range(steps):
        for g in opt.param_groups:
            g["lr"] = 1e-2 * (1 - i / (2 * steps))  # a schedule: the lr changes every step
        _grads(ps, i, scale, seed, none_at if i == 1 else ())
        if lean:
            step.step(max_norm)
        else:
            fast_adamw.reference_step(opt, ps, max_norm)
    return ps, opt


def _same(a, b):
    (ps, opt), (qs, ref) = a, b
    for p, q in zip(ps, qs):
        _close(p, q)
        _close(p.grad, q.grad)  # the kernel writes the clipped gradients back, as clipping does
        s, r = opt.state[p], ref.state[q]
        assert set(s) == set(r) and s["step"].dtype == r["step"].dtype and s["step"].device == r["step"].device
        for k in s:
            _close(s[k], r[k])


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2 ** 16), scale=st.sampled_from([1e-3, 1.0, 30.0]),
       max_norm=st.sampled_from([None, 0.5, 1.0, 1e4]))
def test_equals_clip_then_fused_adamw(device, seed, scale, max_norm):
    _same(_run(device, seed, scale, max_norm, 4, lean=True), _run(device, seed, scale, max_norm, 4, lean=False))


@pytest.mark.parametrize("device", DEVICES)
def test_a_missing_gradient_takes_the_reference_step(device):
    # step 1 leaves the first parameter without a gradient: AdamW skips it, and so does Step
    lean, ref = (_run(device, 3, 1.0, 1.0, 3, lean=x, none_at=(0,)) for x in (True, False))
    _same(lean, ref)
    ps = _model(0, device)
    opt = _opt(ps)
    _grads(ps, 0, 1.0, 0, none_at=(0,))
    fast_adamw.Step(opt).step(1.0)  # the first step: no state for the parameter without a gradient
    assert ps[0] not in opt.state and all(opt.state[p]["step"].item() == 1 for p in ps[1:])


def test_a_loaded_state_is_gathered_again():
    # a state loaded into an optimizer that Step has already stepped: the next steps use its tensors
    # and its groups' settings, as the reference's do
    _, other = _run("cpu", 7, 1.0, 1.0, 2, lean=False)
    state = copy.deepcopy(other.state_dict())
    state["param_groups"][0]["lr"] = 0.05
    runs = {}
    for lean in (True, False):
        ps, opt = _run("cpu", 5, 1.0, 1.0, 2, lean=lean)
        step = fast_adamw.Step(opt)
        opt.load_state_dict(copy.deepcopy(state))
        for i in (2, 3):
            _grads(ps, i, 1.0, 5)
            step.step(1.0) if lean else fast_adamw.reference_step(opt, ps, 1.0)
        runs[lean] = (ps, opt)
    _same(runs[True], runs[False])
    assert all(runs[True][1].state[p]["step"].item() == 4 for p in runs[True][0])  # 2 loaded + 2
    ps, opt = runs[True]
    extra = torch.nn.Parameter(torch.ones(2))
    opt.add_param_group({"params": [extra], "weight_decay": 0.0})
    _grads(ps, 4, 1.0, 5)
    extra.grad = torch.ones(2)
    fast_adamw.Step(opt).step(1.0)
    step = fast_adamw.Step(opt)
    step.step(1.0)
    opt.add_param_group({"params": [more := torch.nn.Parameter(torch.ones(3))], "weight_decay": 0.0})
    more.grad = torch.ones(3)
    step.step(1.0)  # the added group is gathered
    assert opt.state[more]["step"].item() == 1 and not torch.equal(more.detach(), torch.ones(3))


def test_a_state_of_other_settings_takes_the_reference_step():
    # a checkpoint of a non-fused optimizer (a CPU run resumed on a GPU): its groups say fused None and
    # its step counts sit on the CPU as they were saved; the reference step runs what torch would
    _, plain = _run("cpu", 2, 1.0, 1.0, 2, lean=False)
    saved = copy.deepcopy(plain.state_dict())
    for g in saved["param_groups"]:
        g["fused"] = None
    runs = {}
    for lean in (True, False):
        ps = _model(2, "cpu")
        opt = _opt(ps)
        step = fast_adamw.Step(opt)
        opt.load_state_dict(copy.deepcopy(saved))
        assert not fast_adamw.applies(opt)
        _grads(ps, 5, 30.0, 2)
        if lean:
            step.step(0.5)
            assert not step.lean
        else:
            fast_adamw.reference_step(opt, ps, 0.5)
        runs[lean] = (ps, opt)
    _same(runs[True], runs[False])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_parameters(dtype):
    # the kernel reads grad_scale as float32 whatever the parameters' dtype
    runs = {}
    for lean in (True, False):
        ps = [torch.nn.Parameter(p.detach().to(dtype)) for p in _model(4, "cpu")]
        opt = _opt(ps)
        step = fast_adamw.Step(opt)
        for i in range(3):
            _grads(ps, i, 30.0, 4)
            step.step(0.5) if lean else fast_adamw.reference_step(opt, ps, 0.5)
        runs[lean] = ps
    for p, q in zip(runs[True], runs[False]):
        torch.testing.assert_close(p, q, rtol=2e-2, atol=2e-2)  # a few ulps of the parameters' dtype


def test_applies_only_to_plain_fused_adamw():
    ps = _model(0, "cpu")
    assert fast_adamw.applies(_opt(ps))
    assert not fast_adamw.applies(torch.optim.AdamW(ps, fused=False))
    assert not fast_adamw.applies(torch.optim.Adam(ps, fused=True))
    assert not fast_adamw.applies(_opt(ps, amsgrad=True))
    assert not fast_adamw.applies(torch.optim.AdamW(ps, lr=torch.tensor(1e-3), fused=True))
    hooked = _opt(ps)
    hooked.register_step_post_hook(lambda *a: None)
    assert not fast_adamw.applies(hooked)
    mixed = _model(0, "cpu")
    mixed[0] = torch.nn.Parameter(mixed[0].detach().double())
    assert not fast_adamw.applies(_opt(mixed))
    assert not fast_adamw.applies(_opt([torch.nn.Parameter(p.detach().double()) for p in ps]))  # float32 scale
    assert fast_adamw.applies(_opt([torch.nn.Parameter(p.detach().bfloat16()) for p in ps]))
    handle = register_optimizer_step_pre_hook(lambda *a: None)
    try:
        assert not fast_adamw.applies(_opt(ps))  # a global hook
    finally:
        handle.remove()


def test_chosen_keeps_the_reference_on_the_cpu_and_without_fast():
    ps = _model(0, "cpu")
    opt = _opt(ps)
    for fast in (True, False):
        _grads(ps, 0, 1.0, 0)
        update = fast_adamw.chosen(opt, fast)
        assert update.__qualname__.startswith("chosen") and "lean" not in update.__code__.co_freevars
        update(1.0)
    assert all(opt.state[p]["step"].item() == 2 for p in ps)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA: the lean step is chosen on a GPU only")
def test_chosen_takes_the_lean_step_on_cuda():
    ps = _model(0, "cuda")
    assert isinstance(fast_adamw.chosen(_opt(ps), True).__self__, fast_adamw.Step)
    assert not hasattr(fast_adamw.chosen(_opt(ps), False), "__self__")


@pytest.mark.parametrize("device", DEVICES)
def test_the_loop_takes_it_on_cuda_with_fast_and_trains_to_the_same_weights(device, monkeypatch):
    from minift.models.gpt import GPT, GPTConfig
    from minift.training.config import TrainConfig
    from minift.training.loop import train

    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": (x := torch.randint(0, 97, (2, 12), generator=g)), "labels": x} for _ in range(3)]
    calls, lean = [], fast_adamw.Step.step
    monkeypatch.setattr(fast_adamw.Step, "step", lambda self, m: calls.append(m) or lean(self, m))
    out = {}
    for fast in (True, False):
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32, dropout=0.0))
        cfg = TrainConfig(lr=3e-2, steps=5, max_grad_norm=0.05, progress=False, plot=False, fast=fast, seed=3,
                          device=device, bf16=False)
        res = train(model, data, cfg)
        out[fast] = (res.losses, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
    assert calls == ([0.05] * 5 if device == "cuda" else [])  # on the CPU the loop keeps the reference
    assert out[True][0] == pytest.approx(out[False][0], rel=1e-5)
    # Adam moves a weight by up to lr a step whatever its gradient's size, so a rounding difference in
    # one step's update feeds the next steps' gradients: after 5 steps at lr 3e-2 the weights can
    # differ by 1e-5 and more; 1e-4 is a thousandth of the 0.15 they can move
    for k in out[True][1]:
        torch.testing.assert_close(out[True][1][k], out[False][1][k], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("method,options", [
    ("full", {}), ("lora", {"r": 4, "targets": ("q_proj", "v_proj")}),
    ("adalora", {"init_r": 4, "target_r": 2, "targets": ("q_proj", "v_proj"), "tinit": 1, "tfinal": 1, "delta_t": 1}),
    ("freeze", {"unfreeze_every": 2})])  # gradual unfreezing: steps with missing gradients
def test_the_loop_with_the_lean_step_forced_on_the_cpu(method, options, monkeypatch, tmp_path):
    # the CPU has a fused kernel too: the loop's optimizer made fused and Step taken wherever it applies
    # train to the reference's weights, and a run interrupted and resumed to the uninterrupted one's
    from minift.methods.registry import build_method
    from minift.models.bert import BertClassifier, BertConfig
    from minift.training import loop
    from minift.training.config import TrainConfig
    make, used = loop.make_optimizer, []

    def fused(*a, **k):
        opt = make(*a, **k)
        for g in opt.param_groups:
            g["fused"] = True
        return opt

    def chosen(opt, fast):
        if not fast:
            return lambda m: fast_adamw.reference_step(opt, [p for g in opt.param_groups for p in g["params"]], m)
        used.append(lean := fast_adamw.Step(opt))
        return lean.step
    monkeypatch.setattr(loop, "make_optimizer", fused)
    monkeypatch.setattr(fast_adamw, "chosen", chosen)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": (x := torch.randint(1, 50, (2, 9), generator=g)), "attention_mask": torch.ones_like(x),
             "labels": torch.tensor([0, 1])} for _ in range(3)]

    def run(fast, out, on_step=None, **kw):
        torch.manual_seed(0)
        m = BertClassifier(BertConfig(vocab_size=50, max_position_embeddings=32, n_layer=2, n_head=2, n_embd=16,
                                      n_inner=32, dropout=0.1), num_labels=2)
        hooks = build_method(m, method, options, lr=1e-2, total_steps=6).train_hooks()
        cfg = TrainConfig(lr=1e-2, steps=6, max_grad_norm=0.05, fast=fast, progress=False, plot=False, seed=3,
                          out_dir=str(out), **kw)
        res = loop.train(m, data, cfg, on_step=on_step, **hooks)
        return res.losses, {k: v.detach().clone() for k, v in m.state_dict().items()}

    lean, ref = run(True, tmp_path / "a"), run(False, tmp_path / "b")
    # every step on the lean path; gradual unfreezing: the reference while some layer has no gradient
    assert (used[0].lean_steps == 6) if method != "freeze" else (0 <= used[0].lean_steps < 6)
    assert lean[0] == pytest.approx(ref[0], rel=1e-5)
    for k in lean[1]:
        torch.testing.assert_close(lean[1][k], ref[1][k], rtol=1e-5, atol=1e-6)

    def stop(step, loss):
        if step == 3:
            raise KeyboardInterrupt
    run(True, tmp_path / "c", on_step=stop)
    losses, weights = run(True, tmp_path / "c", resume=True)
    assert losses == lean[0] and all(torch.equal(weights[k], lean[1][k]) for k in weights)
