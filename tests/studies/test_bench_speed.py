"""`minift bench` runs what `minift train` runs by default: the speed plan it picks per method on
CUDA (chosen without a GPU, as tests/training/test_speed.py does), the flags that override it, and
the CPU, where nothing changes."""
import json
import math

import pytest

from minift.cli import build_parser, main
from minift.methods.registry import build_method
from minift.methods.spec import TrainHooks
from minift.models.gpt import GPT
from minift.studies import bench, bench_report, bench_speed
from minift.studies.presets import PRESETS
from minift.training import speed


@pytest.fixture(autouse=True)
def no_graphs_yet(monkeypatch):
    monkeypatch.setattr(speed, "GRAPHED", [False])  # as in a fresh (isolated) process


def hooks_of(method: str) -> TrainHooks:
    """The method's real training hooks, on a tiny model on the CPU."""
    cfg = bench.BenchConfig(model="tiny-gpt", device="cpu")
    return build_method(GPT(PRESETS["tiny-gpt"]), method, bench.method_options(cfg, method), total_steps=5).hooks


def plan_for(method: str, **kw):
    cfg = bench.BenchConfig(model=kw.pop("model", "gpt2-medium"), device=kw.pop("device", "cuda"), **kw)
    p = bench_speed.speed_plan(cfg, method, hooks_of(method))
    return p, bench_speed.resolved(cfg, p)


GRAPHED_METHODS = ("full", "lora", "dora", "prefix", "prompt", "freeze", "bitfit", "probe")


@pytest.mark.parametrize("method", GRAPHED_METHODS)
def test_cuda_default_is_trains_plan_graphed(method):
    p, rc = plan_for(method)
    assert p.fast and p.compile and p.compile_mode == "reduce-overhead" and p.merged_lora and p.recompute_act
    assert not p.pad  # bench's batches have one shape already
    assert "CUDA graphs" in p.describe() and "padded" not in p.describe()
    want = "frozen_bf16+compile:reduce-overhead" + ("+merged_forward+recompute_act" if method == "lora" else "")
    assert bench.variant_name(rc, method) == want


def test_cuda_default_matches_minift_trains_plan():
    """The same function, the same answer: bench only drops padding (its batches have one shape)."""
    for method in ("full", "lora", "adalora"):
        ours, _ = plan_for(method)
        train = speed.plan(device_type="cuda", method=method, hooks=hooks_of(method), task="causal-lm",
                           max_len=1024, given={})
        assert (ours.fast, ours.merged_lora, ours.compile, ours.compile_mode, ours.recompute_act) == \
            (train.fast, train.merged_lora, train.compile, train.compile_mode, train.recompute_act)
        assert ours.describe() == train.describe()


def test_adalora_stays_eager_on_cuda_as_in_train():
    p, rc = plan_for("adalora")
    assert p.fast and not p.compile
    assert "adalora's allocator and penalty and forward_context run between steps" in p.describe()
    assert bench.variant_name(rc, "adalora") == "frozen_bf16"


def test_the_factor_kernel_is_a_merged_lora_rows_variant_and_reaches_its_layers(tmp_path, capsys):
    _, rc = plan_for("lora", lora_factor_kernel=True)
    assert bench.variant_name(rc, "lora").endswith("+merged_forward+factor_kernel")
    cfg = bench.BenchConfig(device="cpu", methods=("lora",), lora_merged_forward=True, lora_factor_kernel=True)
    model, _, _ = bench.build(cfg, "lora")
    from minift.methods.lora import lora_modules
    assert all(m.factor_kernel for _, m in lora_modules(model))
    from minift.cli import main
    assert main(["bench", "--device", "cpu", "--methods", "lora", "--steps", "1", "--warmup", "0",
                 "--lora-merged-forward", "--lora-factor-kernel", "--out", str(tmp_path), "--name", "b"]) == 0
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert rows[0]["variant"].endswith("merged_forward+factor_kernel")
    for argv in ([], ["--speed", "eager"], ["--no-lora-merged-forward"]):  # no merged forward: refused
        assert main(["bench", "--device", "cpu", "--methods", "lora", "--lora-factor-kernel", *argv]) == 2
        assert "--lora-factor-kernel is a backward of LoRA's merged forward" in capsys.readouterr().err


def test_the_recomputed_activation_is_a_merged_lora_rows_variant_and_reaches_the_mlps(tmp_path, capsys):
    _, rc = plan_for("lora", lora_recompute_act=True)
    assert bench.variant_name(rc, "lora").endswith("+merged_forward+recompute_act")
    from minift.fast import mlp as fast_mlp
    for fast in (True, False):  # minift.fast's pieces on, or the merged forward alone
        cfg = bench.BenchConfig(device="cpu", methods=("lora",), lora_merged_forward=True, lora_recompute_act=True,
                                fast=fast)
        model, _, _ = bench.build(cfg, "lora")
        assert all(type(b.mlp) is fast_mlp.GPTMLP for b in model.layers)
    assert main(["bench", "--device", "cpu", "--methods", "lora", "--steps", "1", "--warmup", "0",
                 "--lora-merged-forward", "--lora-recompute-act", "--out", str(tmp_path), "--name", "b"]) == 0
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert rows[0]["variant"].endswith("merged_forward+stacked_qkv+recompute_act")
    assert main(["bench", "--device", "cpu", "--methods", "lora", "--lora-recompute-act"]) == 2
    assert "--lora-recompute-act is a backward of LoRA's merged forward" in capsys.readouterr().err


@pytest.mark.parametrize("kw, mlps, attns", [
    ({}, 2, 2), ({"lora_targets": ("q_proj", "v_proj")}, 0, 2), ({"lora_targets": ("q_proj", "down_proj")}, 2, 0),
    ({"dropout": 0.1}, 0, 0)])
def test_a_row_says_recompute_act_and_stacked_qkv_only_where_they_happen(kw, mlps, attns):
    """No adapter on down_proj, fewer than two on q, k, v, or LoRA dropout (the merged forward does not
    apply while training): nothing is recomputed or stacked there, and the row's variant and speed line
    do not say it is."""
    cfg = bench.BenchConfig(model="tiny-gpt", device="cpu", methods=("lora",), lora_merged_forward=True,
                            lora_recompute_act=True, **kw)
    _, _, p = bench.build(cfg, "lora")
    assert (p.recompute_act, p.stack_qkv) == (mlps > 0, attns > 0)
    variant = bench.variant_name(bench_speed.resolved(cfg, p), "lora")
    assert variant.endswith("+recompute_act") is (mlps > 0) and ("+stacked_qkv" in variant) is (attns > 0)
    assert (f"MLP activation recomputed: {mlps} MLPs" in p.describe()) is (mlps > 0)
    assert (f"q/k/v LoRA stacked: {attns} attention modules" in p.describe()) is (attns > 0)


def test_the_activation_budget_is_a_compiled_rows_variant():
    _, rc = plan_for("lora", activation_budget=0.8)
    assert bench.variant_name(rc, "lora").endswith("+merged_forward+recompute_act+activation_budget0.8")
    _, rc = plan_for("adalora", activation_budget=0.8)  # eager by its plan: no budget applies
    assert bench.variant_name(rc, "adalora") == "frozen_bf16"
    with pytest.raises(ValueError, match=r"activation_budget must be in \(0, 1\]"):
        bench.BenchConfig(activation_budget=1.5)


def test_classification_presets_are_planned_as_classification_without_padding():
    p, _ = plan_for("lora", model="tiny-bert")
    assert p.compile and p.compile_mode == "reduce-overhead" and not p.pad
    assert "padded" not in p.describe()


def test_a_second_graphed_model_in_one_process_compiles_without_graphs():
    speed.GRAPHED[0] = True  # bench.prepare records it after compiling under CUDA graphs (--no-isolate)
    p, _ = plan_for("lora")
    assert p.compile and p.compile_mode == "default" and "already captured" in p.describe()


@pytest.mark.parametrize("kw, want", [
    (dict(speed="eager"), dict(fast=True, compile=False, merged_lora=False)),
    (dict(compile=False), dict(fast=True, compile=False, merged_lora=True)),
    (dict(compile_mode="default"), dict(compile=True, compile_mode="default")),
    (dict(lora_merged_forward=False), dict(compile=True, merged_lora=False)),
    (dict(speed="eager", lora_merged_forward=True), dict(compile=False, merged_lora=True)),
    (dict(speed="eager", compile=True), dict(compile=True, compile_mode="reduce-overhead")),
    (dict(fast=False), dict(fast=False, merged_lora=False, compile=True, recompute_act=False)),
    (dict(lora_recompute_act=False), dict(compile=True, merged_lora=True, recompute_act=False)),
    (dict(speed="eager"), dict(compile=False, recompute_act=False)),  # eager: kept, unless asked for
    (dict(compile=False), dict(compile=False, merged_lora=True, recompute_act=False)),
    (dict(speed="eager", lora_merged_forward=True, lora_recompute_act=True), dict(compile=False, recompute_act=True)),
    (dict(lora_merged_forward=False), dict(merged_lora=False, recompute_act=False)),
    (dict(lora_factor_kernel=True), dict(merged_lora=True, recompute_act=False)),  # down_proj keeps its kernel
    (dict(fast=False, lora_merged_forward=True, lora_recompute_act=True), dict(fast=False, recompute_act=True)),
])
def test_every_choice_has_an_override(kw, want):
    p, rc = plan_for("lora", **kw)
    assert {k: getattr(p, k) for k in want} == want
    assert (rc.fast, rc.compile, rc.compile_mode, rc.lora_merged_forward, rc.lora_recompute_act) == \
        (p.fast, p.compile, p.compile_mode, p.merged_lora, p.recompute_act)


def test_compile_forces_a_hooked_method_too():
    p, _ = plan_for("adalora", compile=True)
    assert p.compile and p.compile_mode == "reduce-overhead"


def test_isolation_follows_compiling():
    assert bench.BenchConfig(device="cuda").isolate  # the plan compiles: one graphed model per process
    assert not bench.BenchConfig(device="cuda", speed="eager").isolate
    assert not bench.BenchConfig(device="cuda", compile=False).isolate
    assert not bench.BenchConfig(device="cpu").isolate
    assert bench.BenchConfig(device="cpu", compile=True).isolate
    with pytest.raises(ValueError, match="unknown speed 'fastest'"):
        bench.BenchConfig(speed="fastest")


def test_cli_flags_default_to_the_plan():
    a = build_parser().parse_args(["bench"])
    assert (a.speed, a.compile, a.compile_mode, a.lora_merged_forward, a.no_fast) == ("default", None, None, None,
                                                                                     False)
    a = build_parser().parse_args(["bench", "--no-compile", "--no-lora-merged-forward", "--speed", "eager",
                                   "--compile-mode", "default", "--no-fast"])
    assert (a.speed, a.compile, a.compile_mode, a.lora_merged_forward, a.no_fast) == ("eager", False,
                                                                                     "default", False, True)


# ---------------------------------------------------------------------------- the CPU: as before

@pytest.mark.parametrize("method", ["full", "lora", "adalora"])
def test_cpu_runs_eager_with_minift_fast_as_before(method):
    p, rc = plan_for(method, model="tiny-gpt", device="cpu")
    assert p.fast and not p.compile and not p.merged_lora and not p.pad
    assert bench.variant_name(rc, method) == "eager-fp32-base"
    assert p.describe().startswith("minift.fast on") and "not compiled" in p.describe()
    assert not rc.isolate


def test_cpu_run_records_the_plan_and_first_step_apart(tmp_path):
    rc = main(["bench", "--device", "cpu", "--methods", "full,lora", "--steps", "2", "--warmup", "1",
               "--out", str(tmp_path), "--name", "sp"])
    assert rc == 0
    data = json.loads((tmp_path / "sp.json").read_text())
    assert "speed plan per method" in data["meta"]["speed"]
    for r in data["rows"]:
        assert r["variant"] == "eager-fp32-base"  # the CPU: what bench ran before
        assert r["speed"].startswith("minift.fast on") and r["first_step_s"] > 0
        assert len(r["extra"]["step_ms_each"]) == 2  # the first (warm-up) step is not in the window
    md = (tmp_path / "sp.md").read_text()
    assert "| first step s |" in md and "- tiny-gpt lora: minift.fast on" in md


def test_timed_first_times_the_first_call_only():
    calls, first = [], []
    step = bench.timed_first(calls.append, "cpu", first)
    for i in range(3):
        step(i)
    assert calls == [0, 1, 2] and len(first) == 1 and first[0] >= 0


def test_a_method_run_eager_by_its_plan_still_compares_with_full():
    def row(method, variant, tps, speed_line):
        return bench_report.Row("minift", "m", method, variant, "d", "bf16", 1, 8, 1, 1, 1.0, tps, 2.0, math.nan,
                                speed=speed_line)
    rows = bench.add_ratios([row("full", "frozen_bf16+compile:reduce-overhead", 100.0, "graphs"),
                             row("adalora", "frozen_bf16", 50.0, "eager: adalora's allocator")])
    assert rows[1].ratio_tokens_vs_full == pytest.approx(0.5)
    # rows without a plan (PEFT's, older files) compare only within their variant, as before
    peft_like = bench.add_ratios([row("full", "a", 100.0, ""), row("lora", "b", 50.0, "")])
    assert math.isnan(peft_like[1].ratio_tokens_vs_full)
