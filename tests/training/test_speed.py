"""minift train's default path: which speed choices a run gets (training/speed.py), that padding
for CUDA graphs computes the same loss, that the steady throughput times steps only, and that
reading the loss back once per log interval records exactly what reading it every step did."""
import json

import pytest
import torch

from minift.methods.spec import TrainHooks
from minift.models.bert import BertClassifier, BertConfig
from minift.models.gpt import GPT, GPTConfig
from minift.training.data import pad_batch, pad_rows, pad_to_one_shape
from minift.training.forward import model_forward
from minift.training.loop import train
from minift.training.config import TrainConfig
from minift.training import speed
from minift.training.speed import WARMUP_STEPS, plan
from minift.training import loop as loop_mod

from training.test_train import BombBatches, batches, cfg, gpt  # (tests/ is on the path: pyproject.toml)


def choose(device="cuda", method="lora", hooks=None, task="classification", given=None, merged=False, peft=True):
    return plan(device_type=device, method=method, hooks=hooks or TrainHooks(), task=task, max_len=64,
                given=given or {}, merged_forward=merged, peft=peft)


# ---------------------------------------------------------------------------- which mode when

def test_the_cpu_default_is_the_reference_path():
    p = choose("cpu")
    assert (p.fast, p.merged_lora, p.compile, p.pad) == (False, False, False, False)
    assert p.describe() == "reference path (eager)"


@pytest.fixture(autouse=True)
def no_graphs_yet(monkeypatch):
    monkeypatch.setattr(speed, "GRAPHED", [False])  # as in a fresh process


def test_cuda_default_is_fast_merged_and_graphed_with_static_shapes():
    p = choose()
    assert p.fast and p.merged_lora and p.compile and p.compile_mode == "reduce-overhead" and p.recompute_act
    assert p.pad  # classification: one sequence length, so the graphs are captured once
    assert "CUDA graphs" in p.describe() and "padded to one shape" in p.describe()


def test_a_second_graphed_model_in_one_process_compiles_without_graphs():
    assert choose().compile_mode == "reduce-overhead"  # planning alone captures nothing
    speed.GRAPHED[0] = True  # what the loop records once it compiled a model under CUDA graphs
    p = choose()
    assert p.compile and p.compile_mode == "default" and not p.pad
    assert "already captured" in p.describe()


def test_causal_lm_blocks_are_not_padded():
    p = choose(task="causal-lm")
    assert p.compile and not p.pad


@pytest.mark.parametrize("hook", ["allocator", "penalty", "forward_context", "unfreezer"])
def test_methods_with_hooks_between_steps_stay_eager(hook):
    p = choose(method="adalora", hooks=TrainHooks(**{hook: object()}))
    assert p.fast and not p.compile and not p.pad
    assert f"adalora's {hook}" in p.describe()


def test_parameter_groups_do_not_stop_compilation():
    assert choose(hooks=TrainHooks(param_groups=[{"params": []}])).compile  # LoRA+: still graphed


@pytest.mark.parametrize("given, want", [
    ({"compile": False}, dict(fast=True, compile=False, pad=False, recompute_act=False)),  # eager: host-bound
    ({"fast": False}, dict(fast=False, merged_lora=False, compile=True, recompute_act=False)),
    ({"recompute_act": False}, dict(fast=True, merged_lora=True, compile=True, recompute_act=False)),
    ({"compile_mode": "default"}, dict(compile=True, compile_mode="default", pad=False)),
    ({"compile": True}, dict(compile=True, compile_mode="reduce-overhead", pad=True)),
])
def test_every_choice_has_an_opt_out(given, want):
    p = choose(given=given)
    assert {k: getattr(p, k) for k in want} == want


@pytest.mark.parametrize("device, peft, given, hooks, want", [
    ("cuda", True, {}, TrainHooks(), True),                   # a method that saves no base weight
    ("cuda", False, {}, TrainHooks(), False),                 # full fine-tuning saves every weight
    ("cpu", True, {}, TrainHooks(), False),                   # the CPU runs the reference path
    ("cuda", True, {"fast": False}, TrainHooks(), False),     # opt-outs
    ("cuda", True, {"bf16": False}, TrainHooks(), False),     # no autocast: the layers would multiply fp32 by bf16
    ("cuda", True, {}, TrainHooks(unfreezer=object()), False),  # a weight it unfreezes would train in bf16
])
def test_the_frozen_base_is_stored_in_bf16_where_nothing_saves_or_trains_it(device, peft, given, hooks, want):
    p = plan(device_type=device, method="x", hooks=hooks, task="causal-lm", max_len=64, given=given, peft=peft)
    assert p.bf16_frozen_base is want


def test_recompute_act_asked_for_where_it_does_not_apply_says_so():
    for device, given in (("cpu", {}), ("cuda", {"compile": False})):
        p = choose(device, given={**given, "recompute_act": True})
        assert not p.recompute_act and "MLP activation kept" in p.describe()


def test_compile_asked_for_on_the_cpu_compiles_without_graphs_or_padding():
    p = choose("cpu", given={"compile": True})
    assert p.compile and p.compile_mode == "default" and not p.pad and not p.fast and not p.recompute_act


def test_merged_forward_asked_for_applies_on_the_cpu_too():
    assert choose("cpu", merged=True).merged_lora


# ---------------------------------------------------------------------------- padding is exact

def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model_forward(model, batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def tiny_classifier(num_labels=3):
    torch.manual_seed(0)
    return BertClassifier(BertConfig(vocab_size=50, n_layer=2, n_head=2, n_embd=16, n_inner=32,
                                     max_position_embeddings=40, dropout=0.0), num_labels=num_labels).train()


def test_padding_leaves_the_gpt_loss_unchanged():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32, dropout=0.0)).eval()
    batch = batches(n=1, B=3, T=11)[0]
    padded = pad_batch(batch, 32, pad_id=5)
    assert padded["input_ids"].shape == (3, 32) and (padded["labels"][:, 11:] == -100).all()
    torch.testing.assert_close(model_forward(model, padded).loss, model_forward(model, batch).loss,
                               rtol=1e-5, atol=1e-6)


def test_padding_leaves_the_classifier_loss_unchanged():
    model = tiny_classifier().eval()
    ids = torch.randint(1, 50, (4, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    batch = {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
             "labels": torch.tensor([0, 2, 1, 1])}
    padded = pad_batch(batch, 24)
    assert padded["labels"].shape == (4,) and padded["token_type_ids"].shape == (4, 24)
    torch.testing.assert_close(model_forward(model, padded).loss, model_forward(model, batch).loss,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind,method", [("classifier", None), ("gpt", None), ("classifier", "prompt"),
                                         ("gpt", "prefix"), ("gpt", "lora-fast"), ("classifier", "lora-fast")])
def test_padded_rows_leave_the_loss_and_every_gradient_unchanged(kind, method):
    """An epoch's short last batch, padded to the full rows (pad_rows), trains exactly as it was:
    a plain model, prompt and prefix tuning, LoRA with minift.fast's pieces (merged forward, fused loss)."""
    if kind == "classifier":
        model = tiny_classifier()
        ids = torch.randint(1, 50, (3, 9))
        mask = torch.ones_like(ids)
        mask[1, 6:] = 0
        batch = {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
                 "labels": torch.tensor([0, 2, 1])}
    else:
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32, dropout=0.0)).train()
        batch = batches(n=1, B=3, T=11)[0]
    if method is not None:
        from minift import fast
        from minift.training.run import build
        name = method.split("-")[0]
        opts = {"num_virtual_tokens": 4} if name in ("prompt", "prefix") else {"r": 4, "targets": ["q_proj", "v_proj"]}
        build(model, name, opts, lr=1e-3, total_steps=1)
        if method.endswith("fast"):
            assert fast.enable(model)
    padded = pad_rows(batch, 8, pad_id=5)
    assert padded["input_ids"].shape == (8, batch["input_ids"].shape[1])
    assert (padded["labels"][3:] == -100).all() and padded["attention_mask"][3:].sum(1).tolist() == [1] * 5
    loss, grads = loss_and_grads(model, batch)
    loss_p, grads_p = loss_and_grads(model, padded)
    torch.testing.assert_close(loss_p, loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_p.keys()
    for n in grads:
        torch.testing.assert_close(grads_p[n], grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_padded_rows_count_no_target_on_several_ranks():
    """Under torchrun each rank's share of the loss is its targets over the batch's
    (distributed.targets): rows added by pad_rows are no target, and a rank that gets only such
    rows has a loss of 0 (not NaN) and a share of 0."""
    from minift.training.distributed import targets
    model = tiny_classifier()
    batch = {"input_ids": torch.randint(1, 50, (3, 9)), "attention_mask": torch.ones(3, 9, dtype=torch.long),
             "labels": torch.tensor([0, 2, 1])}
    padded = pad_rows(batch, 8)
    assert targets(padded, model) == targets(batch, model) == 3
    assert targets({**batch, "labels": torch.tensor([0.5, 1.0, 2.0])}, model) == 3  # a regression: every row
    only_pads = {k: v[3:] for k, v in padded.items()}
    assert targets(only_pads, model) == 0
    loss = model_forward(model, only_pads).loss
    assert loss.item() == 0.0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() and not p.grad.any() for p in model.parameters() if p.grad is not None)


def test_one_shape_for_every_batch_and_float_labels_keep_their_rows():
    bs = [{"input_ids": torch.ones(4, 7, dtype=torch.long), "labels": torch.tensor([0, 1, 0, 1])},
          {"input_ids": torch.ones(4, 9, dtype=torch.long), "labels": torch.tensor([1, 1, 0, 0])},
          {"input_ids": torch.ones(2, 5, dtype=torch.long), "labels": torch.tensor([1, 0])}]
    out = pad_to_one_shape(bs)
    assert {tuple(b["input_ids"].shape) for b in out} == {(4, 9)}
    assert all(b.keys() == out[0].keys() for b in out)  # a mask on every batch: one graph's inputs
    assert out[2]["labels"].tolist() == [1, 0, -100, -100]
    assert out[2]["attention_mask"].tolist() == [[1] * 5 + [0] * 4] * 2 + [[1] + [0] * 8] * 2
    regression = {"input_ids": torch.ones(2, 5, dtype=torch.long), "labels": torch.tensor([0.5, 1.5])}
    assert pad_rows(regression, 4) is regression  # a mean squared error would count added rows
    assert pad_rows(out[0], 4) is out[0]


def test_a_padded_graphed_run_keeps_every_mask_so_every_step_has_one_signature():
    """The longest batch of a padded run has an all-ones mask that to_device would drop (a second
    input signature under CUDA graphs: compiled and captured again); such a run keeps every mask,
    and a run of unpadded blocks still drops them (the flash path)."""
    from minift.training.forward import any_padded, to_device
    bs = pad_to_one_shape([{"input_ids": torch.ones(2, 9, dtype=torch.long), "labels": torch.tensor([0, 1])},
                           {"input_ids": torch.ones(2, 5, dtype=torch.long), "labels": torch.tensor([1, 0])}])
    assert bs[0]["attention_mask"].all() and any_padded(bs)
    assert all(to_device(b, "cpu", keep_mask=any_padded(bs)).keys() == bs[0].keys() for b in bs)
    assert "attention_mask" not in to_device(bs[0], "cpu")
    blocks = [{"input_ids": torch.ones(2, 8, dtype=torch.long), "attention_mask": torch.ones(2, 8, dtype=torch.long)}]
    assert not any_padded(blocks) and not any_padded([{"input_ids": torch.ones(1, 3, dtype=torch.long)}])


def test_a_batch_without_mask_gets_one_when_padded_and_a_long_one_is_refused():
    b = {"input_ids": torch.ones(2, 4, dtype=torch.long)}
    p = pad_batch(b, 6)
    assert p["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0]] * 2
    assert pad_batch(p, 6) is p
    with pytest.raises(ValueError, match="a batch of 6 tokens cannot be padded to 4"):
        pad_batch(p, 4)


# ---------------------------------------------------------------------------- the steady throughput

def test_the_steady_throughput_leaves_evaluations_and_checkpoints_out(tmp_path, monkeypatch):
    """steady_tokens_per_s / steady_step_ms time the training steps after the warm-up ones: an
    evaluation or checkpoint in between (here each made to take 0.3 s) is not a step's time."""
    import time as time_mod
    real_save = loop_mod.save_checkpoint

    def slow_save(*a, **k):
        time_mod.sleep(0.3)
        return real_save(*a, **k)

    monkeypatch.setattr("minift.training.loop.save_checkpoint", slow_save)

    def slow_eval(m):
        time_mod.sleep(0.3)
        return {"loss": 1.0}

    res = train(gpt(dropout=0.0), batches(), cfg(tmp_path, steps=7, grad_accum=1, eval_every=2, save_every=2),
                eval_fn=slow_eval)
    assert len(res.evals) == 4  # steps 2, 4, 6 and the last: 1.2 s of evaluations, 0.6 s of checkpoints
    assert 0 < res.steady_step_ms < 150, res.steady_step_ms  # a tiny model's step: milliseconds
    tokens = [int(b["attention_mask"].sum()) for b in batches()]  # each of the 3 batches
    n = 7 - WARMUP_STEPS  # the steps in the window
    assert res.steady_tokens_per_s > n * (sum(tokens) / 3) / 1.0  # n steps in well under a second
    assert res.tokens_per_s < res.steady_tokens_per_s  # the whole run's figure keeps them in
    # the two figures are of one window: the n steps after the warm-up
    window_tokens = res.steady_tokens_per_s * n * res.steady_step_ms / 1000
    assert n * min(tokens) <= round(window_tokens) <= n * max(tokens)

    # resumed with an evaluation pending (it runs before the first new step): still only steps
    (tmp_path / "r").mkdir()
    c = cfg(tmp_path / "r", steps=7, grad_accum=1, eval_every=2, metric="nope")
    with pytest.raises(KeyError, match="nope"):  # the step-2 evaluation fails: pending in the checkpoint
        train(gpt(dropout=0.0), batches(), c, eval_fn=lambda m: {"loss": 1.0})
    res = train(gpt(dropout=0.0), batches(), cfg(tmp_path / "r", steps=7, grad_accum=1, eval_every=2, resume=True),
                eval_fn=slow_eval)
    assert [e["step"] for e in res.evals] == [2, 4, 6, 7]
    resumed_n = 7 - 2 - WARMUP_STEPS  # resumed after step 2: the window is the steps after its warm-up
    assert 0 < res.steady_step_ms < 150 and res.steady_tokens_per_s < resumed_n * max(tokens) / 0.001


def test_a_run_of_warm_up_steps_only_has_no_steady_window(tmp_path):
    """The window opens after speed.WARMUP_STEPS steps (compiling, recording CUDA graphs): a run
    that ends there has no steady figure, one step more has one."""
    res = train(gpt(dropout=0.0), batches(), cfg(tmp_path, steps=WARMUP_STEPS, grad_accum=1))
    assert res.steady_step_ms is None and res.steady_tokens_per_s == 0.0 and res.first_step_s > 0
    res = train(gpt(dropout=0.0), batches(), cfg(tmp_path / "more", steps=WARMUP_STEPS + 1, grad_accum=1))
    assert res.steady_step_ms > 0 and res.steady_tokens_per_s > 0


# ---------------------------------------------------------------------------- one read per interval

def log_lines(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_reading_the_loss_back_per_interval_records_every_step_as_before(tmp_path):
    data = batches()
    every = train(gpt(), data, cfg(tmp_path / "a", log_every=1))
    interval = train(gpt(), data, cfg(tmp_path / "b", log_every=3))
    assert interval.losses == every.losses and len(interval.losses) == 8
    a, b = log_lines(tmp_path / "a"), log_lines(tmp_path / "b")
    assert [(r["step"], r["loss"], r["lr"]) for r in a] == [(r["step"], r["loss"], r["lr"]) for r in b]
    assert all("tok_s" in r for r in a)
    assert [r["step"] for r in b if "tok_s" in r] == [3, 6, 8]  # the steps read back (and the last)


def test_an_interrupt_between_reads_keeps_every_finished_step(tmp_path):
    """Steps 1-4 are done but not yet read back (log_every 10) when Ctrl-C comes inside step 5:
    the checkpoint holds their losses, and the resumed run equals an uninterrupted one."""
    data = batches()
    full = train(gpt(), data, cfg(tmp_path / "full", log_every=10))
    part = train(gpt(), BombBatches(data, 2 * 4 + 2), cfg(tmp_path / "run", log_every=10))
    assert part.interrupted and part.steps == 4 and len(part.losses) == 4
    assert [r["step"] for r in log_lines(tmp_path / "run")] == [1, 2, 3, 4]
    resumed = train(gpt(), data, cfg(tmp_path / "run", resume=True, log_every=10))
    assert resumed.losses == full.losses


def test_log_every_must_be_positive():
    with pytest.raises(ValueError, match="log_every must be >= 1, got 0"):
        TrainConfig(steps=1, log_every=0)


# ---------------------------------------------------------------------------- the activation budget

def test_the_compile_settings_hold_while_the_steps_run(tmp_path, monkeypatch):
    """``activation_budget`` is torch.compile's activation_memory_budget, and AOTAutograd's cache takes
    custom autograd Functions, while a compiled run's steps run (the step compiles inside them), and
    PyTorch's own settings hold again after; here compile is a no-op, so that the test does not pay
    for compiling, and the forward hook reads the settings."""
    import contextlib
    import torch._functorch.config as functorch_config
    cache = "autograd_cache_allow_custom_autograd_functions"
    default, seen = functorch_config.activation_memory_budget, []
    cached = getattr(functorch_config, cache, None)
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: None)

    def look(model):
        seen.append((functorch_config.activation_memory_budget, getattr(functorch_config, cache, True)))
        return contextlib.nullcontext()
    c = TrainConfig(steps=2, batch_size=2, lr=1e-3, device="cpu", progress=False, plot=False, compile=True,
                    activation_budget=0.7)
    train(gpt(dropout=0.0), batches(), c, forward_context=look)
    assert seen == [(0.7, True), (0.7, True)]  # AOTAutograd's cache takes minift's Functions too
    assert functorch_config.activation_memory_budget == default and getattr(functorch_config, cache, None) == cached
    seen.clear()
    train(gpt(dropout=0.0), batches(), TrainConfig(steps=1, batch_size=2, lr=1e-3, device="cpu", progress=False,
                                                   plot=False), forward_context=look)
    assert seen == [(default, cached if cached is not None else True)]  # an eager run changes neither


def test_an_activation_budget_needs_a_compiled_run_and_a_share():
    with pytest.raises(ValueError, match="applies to a compiled run"):
        train(gpt(dropout=0.0), batches(), TrainConfig(steps=1, lr=1e-3, device="cpu", progress=False,
                                                       activation_budget=0.5))
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"activation_budget must be in \(0, 1\]"):
            TrainConfig(steps=1, activation_budget=bad)
    assert speed.compile_context(None, compiled=False) is not None  # nothing asked: nothing to refuse
    p = plan(device_type="cuda", method="lora", hooks=TrainHooks(), task="causal-lm", max_len=64,
             given={"activation_budget": 0.8})
    assert "activation memory budget 0.8" in p.describe()


CASES_OF_FROZEN = [
    ("lora", {"r": 2, "targets": ["q_proj", "v_proj"]}, True),
    ("lora", {"r": 2, "targets": ["q_proj"], "dora": True}, True),
    ("dora", {"r": 2}, True),
    ("adalora", {"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 1, "targets": ["q_proj", "v_proj"]}, True),
    ("prefix", {"num_virtual_tokens": 3}, True),
    ("prompt", {"num_virtual_tokens": 3}, True),
    ("bitfit", {}, True),
    ("freeze", {"strategy": "ratio", "ratio": 0.5}, True),
    ("freeze", {"unfreeze_every": 1}, False),  # gradual unfreezing: every weight may train
    ("full", {}, False),
]


@pytest.mark.parametrize("method, options, cast", CASES_OF_FROZEN)
def test_a_cuda_run_s_plan_casts_the_frozen_base_of_every_method_that_allows_it(method, options, cast, monkeypatch):
    """``run.speed_up`` as a CUDA run calls it (the device's kind stubbed: the CPU has no CUDA), for
    every trained method of the registry: the plan's note says what ``fast.frozen`` did, and the
    model holds exactly that: every frozen parameter in bf16 (but BitFit's LayerNorms, whose biases
    train), none that may train later."""
    from types import SimpleNamespace
    from minift import fast
    from minift.methods.registry import METHODS, build_method
    from minift.training import forward, run
    assert {m for m, spec in METHODS.items() if spec.trained} <= {c[0] for c in CASES_OF_FROZEN}
    monkeypatch.setattr(forward, "pick_device", lambda device: torch.device("cuda"))
    model = gpt()
    st = build_method(model, method, options, total_steps=10)
    try:
        _, speed_note = run.speed_up(model, st, SimpleNamespace(method=method, train={}), TrainConfig(steps=1),
                                     "causal-lm", 16, [], None)
        bf16 = {n for n, p in model.named_parameters() if p.dtype == torch.bfloat16}
        if not cast:
            assert "frozen base" not in speed_note and not bf16
        else:
            frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
            assert bf16 == {n for n in frozen if method != "bitfit" or "ln_" not in n}  # ln_1, ln_2, ln_f
            assert bf16 and speed_note.endswith(f"frozen base in bf16 ({len(bf16)} tensors)")
    finally:
        fast.disable(model)


@pytest.mark.parametrize("method, options, given, want", [
    ("lora", {"r": 2, "targets": ["q_proj", "v_proj", "down_proj"]}, {}, 2),  # both MLPs
    ("lora", {"r": 2, "targets": ["q_proj", "v_proj", "down_proj"]}, {"recompute_act": False}, 0),
    ("lora", {"r": 2, "targets": ["q_proj", "v_proj", "down_proj"]}, {"compile": False}, 0),
    ("lora", {"r": 2, "targets": ["q_proj", "v_proj"]}, {}, 0),  # no adapter on down_proj
    ("lora", {"r": 2, "targets": ["down_proj"], "dropout": 0.1}, {}, 0),  # not merged while training
    ("dora", {"r": 2, "targets": ["down_proj"]}, {}, 0),  # DoRA keeps the reference forward
])
def test_a_compiled_cuda_run_recomputes_the_mlp_activation_where_down_proj_merges(method, options, given, want,
                                                                                  monkeypatch):
    """``run.speed_up`` as a CUDA run calls it (the device's kind stubbed): the plan's choice reaches
    the model, the MLPs whose down_proj takes the merged forward while training recompute their
    activation, and the note says how many."""
    from types import SimpleNamespace
    from minift import fast
    from minift.fast import mlp as fast_mlp
    from minift.methods.registry import build_method
    from minift.training import forward, run
    monkeypatch.setattr(forward, "pick_device", lambda device: torch.device("cuda"))
    model = gpt(dropout=0.0)
    st = build_method(model, method, options, total_steps=10)
    try:
        _, note = run.speed_up(model, st, SimpleNamespace(method=method, train=given), TrainConfig(steps=1),
                               "causal-lm", 16, [], None)
        assert len(fast_mlp.recomputing(model)) == want
        assert (f"MLP activation recomputed: {want} MLPs" in note) == (want > 0)
        stacks = 2 if method == "lora" and not options.get("dropout") and "q_proj" in options["targets"] else 0
        assert (f"q/k/v LoRA stacked: {stacks} attention modules" in note) == (stacks > 0)  # fast.qkv
    finally:
        fast.disable(model)
