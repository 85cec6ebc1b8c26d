"""The training loop: exact resume, crash-safe checkpoints, schedule, hooks, early stopping."""
import importlib
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from minift.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from minift.models.gpt import GPT, GPTConfig
from minift.training.loop import make_optimizer, train
from minift.training.config import TrainConfig, lr_factor

ckpt = importlib.import_module("minift.training.checkpoint")  # the module (minift re-exports functions by name)

TINY = dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32)


def gpt(dropout=0.1, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**TINY, dropout=dropout))


def batches(n=3, B=2, T=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(0, 97, (B, T), generator=g)
        mask = torch.ones_like(x)
        mask[0, -3:] = 0  # some padding, with no loss on it
        out.append({"input_ids": x, "attention_mask": mask, "labels": x.masked_fill(mask == 0, -100)})
    return out


def cfg(tmp_path, **kw):
    base = dict(lr=3e-3, steps=8, grad_accum=2, warmup=2, schedule="cosine", weight_decay=0.1,
                progress=False, plot=False, out_dir=str(tmp_path), seed=3)
    return TrainConfig(**{**base, **kw})


class Interrupt:
    def __init__(self, at):
        self.at = at

    def __call__(self, step, loss):
        if step == self.at:
            raise KeyboardInterrupt


class BombBatches(list):
    """Raises KeyboardInterrupt on the n-th batch access: an interrupt in the middle of a step."""

    def __init__(self, items, n):
        super().__init__(items)
        self.n = n

    def __getitem__(self, i):
        self.n -= 1
        if self.n == 0:
            raise KeyboardInterrupt
        return super().__getitem__(i)


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_resume_reproduces_the_uninterrupted_run_bitwise(tmp_path):
    data = batches()  # 3 batches, grad_accum 2, 8 steps: crosses several shuffled epochs
    full_model = gpt()
    full = train(full_model, data, cfg(tmp_path / "full"))

    model = gpt()
    part = train(model, data, cfg(tmp_path / "run"), on_step=Interrupt(3))
    assert part.interrupted and part.steps == 3 and len(part.losses) == 3
    torch.manual_seed(12345)  # the resumed run must not depend on the RNG it starts with
    resumed = train(gpt(), data, cfg(tmp_path / "run", resume=True))
    assert resumed.steps == 8
    assert resumed.losses == full.losses  # bitwise: python floats compared with ==
    assert len(set(full.losses)) == 8  # the losses really differ step to step (dropout, data order)

    # an interrupt in the middle of a step (inside its micro-batches) resumes exactly too
    model = gpt()
    mid = train(model, BombBatches(data, n=2 * 5 + 2), cfg(tmp_path / "mid"))
    assert mid.interrupted and mid.steps == 5
    m2 = gpt()
    again = train(m2, data, cfg(tmp_path / "mid", resume=True))
    assert again.losses == full.losses
    w1, w2 = weights(full_model), weights(m2)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_a_failure_after_a_step_keeps_the_steps_done(tmp_path):
    """An exception raised after step 5 (here from on_step) still leaves a checkpoint of 5 steps
    (a process killed outright keeps the last periodic one: see the next test), and the resumed
    run equals an uninterrupted one."""
    data = batches()
    c = dict(steps=6, grad_accum=1, schedule="linear", save_every=2)
    full = train(gpt(), data, cfg(tmp_path / "a", **c))

    def crash(step, loss):
        if step == 5:
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        train(gpt(), data, cfg(tmp_path / "b", **c), on_step=crash)
    assert json.loads((tmp_path / "b" / "last" / "state.json").read_text())["step"] == 5
    resumed = train(gpt(), data, cfg(tmp_path / "b", **c, resume=True))
    assert resumed.losses == full.losses


def test_a_metric_the_evaluation_lacks_fails_but_keeps_the_step(tmp_path):
    """The evaluation's failure is all or nothing: the checkpoint holds the step, and the
    evaluation is pending, so a resumed run with a working evaluation runs it exactly once."""
    data = batches()
    c = cfg(tmp_path, steps=2, grad_accum=1, metric="nope")
    with pytest.raises(KeyError, match="nope"):
        train(gpt(), data, c, eval_fn=lambda m: {"loss": 1.0})
    state = json.loads((tmp_path / "last" / "state.json").read_text())
    assert state["step"] == 2 and state["eval_pending"] and state["evals"] == []
    res = train(gpt(), data, cfg(tmp_path, steps=2, grad_accum=1, resume=True), eval_fn=lambda m: {"loss": 1.0})
    assert [e["step"] for e in res.evals] == [2]


def test_checkpoint_killed_halfway_leaves_the_previous_one_loadable(tmp_path, monkeypatch):
    model = gpt(dropout=0.0)
    c = cfg(tmp_path, steps=2, grad_accum=1)
    train(model, batches(), c)
    good = {k: v.clone() for k, v in ckpt.trainable_state(model).items()}
    opt = make_optimizer(model, c)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # the checkpoint we fail to write holds different weights

    real_save = ckpt.save_file

    def dies_on_optimizer(tensors, path, *a, **k):
        if path.endswith("optimizer.safetensors"):
            real_save(tensors, path, *a, **k)
            raise OSError("disk full (simulated)")  # half the checkpoint is on disk
        return real_save(tensors, path, *a, **k)

    monkeypatch.setattr(ckpt, "save_file", dies_on_optimizer)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, model, opt, {"step": 99, "losses": [], "evals": [], "best": None,
                                               "bad_evals": 0})
    monkeypatch.setattr(ckpt, "save_file", real_save)
    assert latest_checkpoint(tmp_path) == tmp_path / "last"
    fresh = gpt(dropout=0.0, seed=7)
    assert load_checkpoint(tmp_path / "last", fresh, make_optimizer(fresh, c))["step"] == 2
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in good.items())

    # a crash between the two renames of the swap: last/ is gone, last.old/ is used
    real_replace = os.replace

    def dies_on_second_rename(src, dst):
        if str(src).endswith("last.tmp"):
            raise OSError("power cut (simulated)")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", dies_on_second_rename)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, model, opt, {"step": 99, "losses": [], "evals": [], "best": None,
                                               "bad_evals": 0})
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    assert latest_checkpoint(tmp_path) == tmp_path / "last.old"
    fresh = gpt(dropout=0.0, seed=8)
    assert load_checkpoint(latest_checkpoint(tmp_path), fresh, make_optimizer(fresh, c))["step"] == 2
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in good.items())


def test_checkpoint_is_pickle_free_and_adapter_only_when_base_is_frozen(tmp_path):
    model = gpt(dropout=0.0)
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("ln_f"))  # a stand-in for a PEFT method
    train(model, batches(), cfg(tmp_path, steps=1, grad_accum=1))
    files = sorted(os.listdir(tmp_path / "last"))
    assert all(f.endswith((".safetensors", ".json")) for f in files), files
    saved = load_file(str(tmp_path / "last" / "model.safetensors"))
    assert sorted(saved) == ["ln_f.bias", "ln_f.weight"]
    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert log[0]["step"] == 1 and {"loss", "lr", "tok_s"} <= set(log[0])


def test_lr_schedule():
    assert [lr_factor(s, 10, 3, "constant") for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_factor(3, 10, 3, "linear") == 1.0 and lr_factor(9, 10, 3, "linear") == pytest.approx(1 / 7)
    assert lr_factor(0, 10, 0, "cosine") == 1.0
    assert lr_factor(5, 10, 0, "cosine") == pytest.approx(0.5)
    assert TrainConfig(steps=100, warmup=0.1).warmup_steps(100) == 10
    assert TrainConfig(epochs=2, grad_accum=2).total_steps(5) == 5


def test_hooks_are_called_where_promised(tmp_path):
    model = gpt(dropout=0.0)
    calls = []

    class Allocator:  # AdaLoRA's place: gradients present (after backward, before zero_grad)
        def step(self, m, step):
            calls.append(("alloc", step, all(p.grad is not None for p in m.parameters() if p.requires_grad)))

    class Unfreezer:
        def step(self, step):
            calls.append(("unfreeze", step))

    c = cfg(tmp_path, steps=3, grad_accum=1, warmup=0, schedule="constant", weight_decay=0.0)
    no_pen = train(gpt(dropout=0.0), batches(), cfg(tmp_path / "ref", steps=1, grad_accum=1))
    res = train(model, batches(), c, allocator=Allocator(), unfreezer=Unfreezer(),
                penalty=lambda m: torch.tensor(10.0))
    assert calls == [("unfreeze", 0), ("alloc", 0, True), ("unfreeze", 1), ("alloc", 1, True),
                     ("unfreeze", 2), ("alloc", 2, True)]
    assert res.losses[0] == pytest.approx(no_pen.losses[0] + 10.0)

    # param groups keep their own lr ratios (LoRA+ / discriminative lrs) under the schedule
    m = gpt(dropout=0.0)
    groups = [{"params": list(m.layers.parameters()), "lr": 1e-3},
              {"params": [p for n, p in m.named_parameters() if not n.startswith("layers.")], "lr": 4e-3}]
    seen = []
    orig = torch.optim.AdamW.step

    def spy(self, *a, **k):
        seen.append([g["lr"] for g in self.param_groups])
        return orig(self, *a, **k)

    torch.optim.AdamW.step = spy
    try:
        train(m, batches(), cfg(tmp_path / "g", steps=3, grad_accum=1, warmup=1, schedule="linear"),
              param_groups=groups)
    finally:
        torch.optim.AdamW.step = orig
    assert all(math.isclose(b / a, 4.0) for a, b in seen) and seen[0][0] == pytest.approx(0.5e-3)


def test_eval_early_stopping_and_best(tmp_path):
    scores = iter([3.0, 2.0, 2.5, 2.6, 2.7, 2.8])
    res = train(gpt(dropout=0.0), batches(), cfg(tmp_path, steps=20, grad_accum=1, eval_every=2, patience=2),
                eval_fn=lambda m: {"loss": next(scores)})
    assert res.stopped_early and res.steps == 8
    assert [e["step"] for e in res.evals] == [2, 4, 6, 8] and res.best == {"step": 4, "loss": 2.0}
    assert (tmp_path / "best" / "model.safetensors").is_file()


def test_config_validation():
    with pytest.raises(ValueError, match="exactly one of steps and epochs"):
        TrainConfig()
    with pytest.raises(ValueError, match="schedule 'step' is unknown"):
        TrainConfig(steps=1, schedule="step")
    with pytest.raises(ValueError, match="grad_accum must be >= 1"):
        TrainConfig(steps=1, grad_accum=0)


@pytest.mark.parametrize("method, opts", [
    ("adalora", {"init_r": 4, "target_r": 2, "targets": ("q_proj", "v_proj"), "tinit": 1, "tfinal": 1,
                 "delta_t": 1, "orth_reg_weight": 0.1}),
    ("freeze", {"unfreeze_every": 2, "lr_decay": 2.6}),
    ("prefix", {"num_virtual_tokens": 3, "projection_dim": 8}),
])
def test_resume_is_exact_with_method_hooks(method, opts, tmp_path):
    """AdaLoRA (allocator state + penalty), gradual unfreezing + discriminative groups, prefix."""
    from minift.methods.registry import build_method
    from minift.models.bert import BertClassifier, BertConfig

    def fresh():
        torch.manual_seed(0)
        m = BertClassifier(BertConfig(vocab_size=50, max_position_embeddings=32, n_layer=2, n_head=2, n_embd=16,
                                      n_inner=32, dropout=0.1), num_labels=2)
        return m, build_method(m, method, opts, lr=1e-2, total_steps=7).train_hooks()

    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(3):
        x = torch.randint(1, 50, (2, 9), generator=g)
        data.append({"input_ids": x, "attention_mask": torch.ones_like(x), "labels": torch.tensor([0, 1])})
    c = dict(steps=7, grad_accum=1, lr=1e-2)
    m, hooks = fresh()
    full = train(m, data, cfg(tmp_path / "a", **c), **hooks)
    m, hooks = fresh()
    assert train(m, data, cfg(tmp_path / "b", **c), on_step=Interrupt(3), **hooks).interrupted
    m, hooks = fresh()
    assert train(m, data, cfg(tmp_path / "b", **c, resume=True), **hooks).losses == full.losses
    logged = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 8))


def test_resuming_an_early_stopped_run_does_not_train_on(tmp_path):
    scores = iter([3.0, 2.0, 2.5, 2.6])
    c = cfg(tmp_path, steps=20, grad_accum=1, eval_every=2, patience=2)
    first = train(gpt(dropout=0.0), batches(), c, eval_fn=lambda m: {"loss": next(scores)})
    assert first.stopped_early and first.steps == 8
    log = (tmp_path / "metrics.jsonl").read_text()
    again = train(gpt(dropout=0.0), batches(), cfg(tmp_path, steps=20, grad_accum=1, eval_every=2, patience=2,
                                                   resume=True),
                  eval_fn=lambda m: pytest.fail("an early-stopped run was evaluated again"))
    assert again.stopped_early and again.steps == 8 and again.losses == first.losses
    assert again.best == first.best and (tmp_path / "metrics.jsonl").read_text() == log


def test_a_fresh_start_truncates_the_metrics_log(tmp_path):
    train(gpt(dropout=0.0), batches(), cfg(tmp_path, steps=3, grad_accum=1))
    train(gpt(dropout=0.0), batches(), cfg(tmp_path, steps=2, grad_accum=1))
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_bad_device_is_a_one_line_value_error():
    with pytest.raises(ValueError, match="device 'nope' is unknown; use auto, cpu, cuda or cuda:N"):
        TrainConfig(steps=1, device="nope")
    with pytest.raises(ValueError, match="device 'mps' is unknown"):
        TrainConfig(steps=1, device="mps")
    assert TrainConfig(steps=1, device="cpu").device == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device is available"):
            TrainConfig(steps=1, device="cuda")
    else:
        with pytest.raises(ValueError, match="only"):
            TrainConfig(steps=1, device=f"cuda:{torch.cuda.device_count()}")


def test_an_all_ones_mask_is_dropped_and_changes_nothing():
    import importlib
    from minift.models.gpt import GPT, GPTConfig
    t = importlib.import_module("minift.training.forward")
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=8)).eval()
    ids = torch.randint(0, 50, (2, 6))
    full = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    moved = t.to_device(full, "cpu")
    assert "attention_mask" not in moved
    torch.testing.assert_close(t.model_forward(m, moved).loss, t.model_forward(m, full).loss, atol=1e-6, rtol=0)
    padded = dict(full, attention_mask=torch.tensor([[1] * 6, [1] * 4 + [0] * 2]))
    assert "attention_mask" in t.to_device(padded, "cpu")


class Evaluator:
    """A real eval_fn: the dev loss, plus a sampled number (an eval may draw random numbers, as
    generation does). ``bomb_call``: raise KeyboardInterrupt in the middle of that call (1-based),
    after it drew its random numbers."""

    def __init__(self, data, bomb_call=None):
        self.data, self.bomb_call, self.calls = data, bomb_call, 0

    def __call__(self, model):
        from minift.training.loop import model_forward
        self.calls += 1
        sample = torch.rand(3).sum().item()
        if self.calls == self.bomb_call:
            raise KeyboardInterrupt
        loss = sum(model_forward(model, b).loss.item() for b in self.data) / len(self.data)
        return {"loss": loss, "sample": sample}


@pytest.mark.parametrize("where", ["eval_fn", "best"])
@pytest.mark.parametrize("bomb_call", [2, 4])  # the eval at step 4, and the final one at step 8
def test_an_evaluation_interrupted_by_ctrl_c_runs_again_on_resume(tmp_path, monkeypatch, where, bomb_call):
    """Ctrl-C inside the evaluation at step s (in eval_fn, or while best/ is written after its
    metrics were recorded): the resumed run evaluates step s again, once, and then goes on
    exactly as an uninterrupted run — evals, best, losses and metrics.jsonl all the same."""
    train_module = importlib.import_module("minift.training.loop")
    data = batches()
    c = dict(steps=8, grad_accum=1, eval_every=2, save_every=3)
    full = train(gpt(), data, cfg(tmp_path / "a", **c), eval_fn=Evaluator(data))
    assert [e["step"] for e in full.evals] == [2, 4, 6, 8]
    at = 2 * bomb_call  # the step whose evaluation is interrupted

    if where == "eval_fn":
        part = train(gpt(), data, cfg(tmp_path / "b", **c), eval_fn=Evaluator(data, bomb_call=bomb_call))
    else:  # the metrics of step `at` are recorded; Ctrl-C hits while its new best/ is written
        improving = [e["step"] for e in full.evals if e == min((f for f in full.evals if f["step"] <= e["step"]),
                                                              key=lambda f: f["loss"])]
        assert at in improving  # so best/ is written after the eval at `at`
        real, calls = train_module.save_weights, []

        def bomb(model, path):
            calls.append(1)
            if len(calls) == improving.index(at) + 1:
                raise KeyboardInterrupt
            return real(model, path)
        monkeypatch.setattr(train_module, "save_weights", bomb)
        part = train(gpt(), data, cfg(tmp_path / "b", **c), eval_fn=Evaluator(data))
        monkeypatch.setattr(train_module, "save_weights", real)
    assert part.interrupted and part.steps == at
    assert [e["step"] for e in part.evals] == list(range(2, at, 2))  # the interrupted one is not done
    state = json.loads((tmp_path / "b" / "last" / "state.json").read_text())
    assert state["step"] == at and [e["step"] for e in state["evals"]] == list(range(2, at, 2))

    resumed = train(gpt(), data, cfg(tmp_path / "b", **c, resume=True), eval_fn=Evaluator(data))
    assert [e["step"] for e in resumed.evals] == [2, 4, 6, 8]  # step `at` exactly once
    assert resumed.evals == full.evals and resumed.best == full.best and resumed.losses == full.losses
    def log(d):  # metrics.jsonl without the throughput, which is not reproducible
        return [{k: v for k, v in json.loads(line).items() if k != "tok_s"}
                for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log(tmp_path / "b") if "eval" in r] == [2, 4, 6, 8]
    assert log(tmp_path / "b") == log(tmp_path / "a")
    again = train(gpt(), data, cfg(tmp_path / "b", **c, resume=True),
                  eval_fn=lambda m: pytest.fail("a finished run was evaluated again"))
    assert again.evals == full.evals
