"""Benchmark harness arithmetic and a CPU smoke run (time is never asserted there); on a GPU, a
check of the CUDA timing itself against GPU work of known length."""
import json
import math
import sys
import time
from dataclasses import replace

import pytest
import torch

from minift.studies import bench, bench_report
from minift.studies import bench_timing
from minift.cli import main
from minift.models.gpt import GPT, GPTConfig


def test_flops_formula_reduces_to_the_textbook_forms():
    N, L, T, d = 1_000_000, 12, 1024, 768
    assert bench.flops_per_token(N, N, L, T, d) == 6 * N + 12 * L * T * d  # full fine-tuning
    assert bench.flops_per_token(N, 0, L, T, d) == 4 * N + 12 * L * T * d  # frozen base
    assert bench.flops_per_token(N, 0, L, T, d, train=False) == 2 * N + 4 * L * T * d  # forward only
    # bottom half frozen and run without autograd: backward reaches only the top half
    half = bench.flops_per_token(N, N // 2, L, T, d, backward_layers=L // 2)
    assert half == 2 * N + 4 * L * T * d + 2 * (N / 2) + 8 * (L // 2) * T * d + 2 * (N // 2)


def test_matmul_params_counts_linears_and_tied_head():
    cfg = GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=8)
    m = GPT(cfg)
    n, nt = bench.matmul_params(m)
    per_layer = 4 * 8 * 8 + 2 * 8 * 32
    assert n == 2 * per_layer + 50 * 8
    assert nt == n
    for p in m.parameters():
        p.requires_grad_(False)
    assert bench.matmul_params(m) == (n, 0)


def test_ratios_are_relative_to_full_in_the_same_run():
    def row(method, tps, peak):
        return bench_report.Row("minift", "m", method, "v", "d", "bf16", 1, 8, 1, 1, 1.0, tps, peak, math.nan)
    rows = bench.add_ratios([row("full", 100.0, 4.0), row("lora", 150.0, 2.0)])
    assert rows[1].ratio_tokens_vs_full == pytest.approx(1.5)
    assert rows[1].ratio_mem_vs_full == pytest.approx(0.5)
    assert rows[0].ratio_tokens_vs_full == pytest.approx(1.0)


def test_bad_config():
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        bench.BenchConfig(methods=("nope",))
    with pytest.raises(ValueError, match="unknown model preset"):
        bench.BenchConfig(model="gpt5")
    with pytest.raises(ValueError, match="unknown compile mode 'fast'; choose from default"):
        bench.BenchConfig(compile=True, compile_mode="fast")


def test_cpu_smoke_run(tmp_path, capsys):
    methods = [m for m in bench.METHODS]
    rc = main(["bench", "--device", "cpu", "--methods", ",".join(methods), "--steps", "2", "--warmup", "1",
               "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "bench-tiny-gpt.json").read_text())
    got = [r["method"] for r in data["rows"]]
    assert got == methods
    by = {r["method"]: r for r in data["rows"]}
    assert by["full"]["trainable"] == by["full"]["total"]
    assert 0 < by["lora"]["trainable"] < by["full"]["trainable"]
    assert by["probe"]["trainable"] == 0
    assert all(r["tokens_per_s"] > 0 for r in data["rows"])
    assert by["full"]["ratio_tokens_vs_full"] == pytest.approx(1.0)
    assert data["meta"]["device"].startswith("cpu")
    assert "| minift | tiny-gpt | lora |" in (tmp_path / "bench-tiny-gpt.md").read_text()


@pytest.mark.parametrize("plot", [False, True], ids=["without-matplotlib", "with-matplotlib"])
def test_bench_names_only_the_files_it_wrote(plot, tmp_path, monkeypatch, capsys):
    """`minift bench` names the files it wrote and only those: no PNG without matplotlib (the plot
    extra), and an earlier run's PNG never stays beside the new table."""
    if plot:
        pytest.importorskip("matplotlib")
    else:
        monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    (tmp_path / "b.png").write_bytes(b"an earlier run's plot")
    assert main(["bench", "--device", "cpu", "--methods", "full", "--steps", "1", "--warmup", "0",
                 "--out", str(tmp_path), "--name", "b"]) == 0
    wrote = [line for line in capsys.readouterr().err.splitlines() if line.startswith("wrote ")]
    assert len(wrote) == 1
    named = wrote[0].removeprefix("wrote ").split(", ")
    assert sorted(named) == sorted(str(p) for p in tmp_path.iterdir())
    assert [n.rsplit(".", 1)[1] for n in named] == ["json", "md", "png"][:3 if plot else 2]


def test_bench_cli_bad_input(capsys):
    assert main(["bench", "--device", "cpu", "--methods", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown method 'nope'" in err[0]


def test_probe_flops_leave_out_the_unused_lm_head():
    m = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=8))
    with_head, _ = bench.matmul_params(m)
    without, _ = bench.matmul_params(m, lm_head=False)
    assert with_head - without == 50 * 8


@pytest.mark.parametrize("argv,msg", [(["--batch", "0"], "batch >= 1"), (["--methods", ""], "--methods is empty"),
                                      (["--loss-chunk", "0"], "loss_chunk must be >= 1"),
                                      (["--dropout", "1"], "dropout must be in [0, 1)"),
                                      (["--model", "tiny-llama", "--dropout", "0.1"], "tiny-llama has none")])
def test_bench_cli_rejects_zero_and_empty(argv, msg, capsys):
    assert main(["bench", "--device", "cpu", *argv]) == 2
    assert msg in capsys.readouterr().err


@pytest.mark.parametrize("model", ["tiny-bert", "tiny-gpt"])
def test_dropout_reaches_the_model_and_lora_and_names_the_row(model):
    """--dropout P: the model's dropout and LoRA's are P (to match a recipe's run), the row says so."""
    cfg = bench.BenchConfig(model=model, methods=("lora",), device="cpu", dropout=0.1)
    m, _, _ = bench.build(cfg, "lora")
    assert {mod.p for mod in m.modules() if isinstance(mod, torch.nn.Dropout)} == {0.1}
    lora_layers = [mod for mod in m.modules() if hasattr(mod, "lora_A")]
    assert lora_layers and all(isinstance(mod.dropout, torch.nn.Dropout) for mod in lora_layers)
    assert "dropout0.1" in bench.variant_name(cfg, "lora")
    assert "dropout" not in bench.variant_name(replace(cfg, dropout=0.0), "lora")
    m0, _, _ = bench.build(replace(cfg, dropout=0.0), "lora")  # the default: none (BERT's preset has 0.1)
    assert {mod.p for mod in m0.modules() if isinstance(mod, torch.nn.Dropout)} <= {0.0}


@pytest.mark.parametrize("method", ["lora", "bitfit", "full"])
def test_the_frozen_base_is_cast_as_minift_train_casts_it(method):
    """frozen_bf16 (CUDA's default; the CPU turns it off, so the test sets it after) stores the
    frozen base through minift.fast.frozen: every frozen parameter in bf16, BitFit's LayerNorms
    (their biases train) and every trainable parameter in fp32."""
    cfg = bench.BenchConfig(model="tiny-gpt", methods=(method,), device="cpu")
    cfg.frozen_bf16 = True
    m, _, _ = bench.build(cfg, method)
    for n, p in m.named_parameters():
        keep = p.requires_grad or (method == "bitfit" and "ln_" in n)
        assert p.dtype == (torch.float32 if keep else torch.bfloat16), n
    assert any(p.dtype == torch.bfloat16 for p in m.parameters()) == (method != "full")


def test_run_hands_over_the_rows_after_each_method():
    """A run killed mid-way (a GPU call's time limit) keeps the methods that finished."""
    seen = []
    cfg = bench.BenchConfig(model="tiny-gpt", methods=("full", "lora"), batch=2, seq_len=32, steps=1, warmup=1,
                            device="cpu")
    rows = bench.run(cfg, progress=lambda s: None, on_row=lambda rs: seen.append([r.method for r in rs]))
    assert seen == [["full"], ["full", "lora"]] and [r.method for r in rows] == ["full", "lora"]
    assert rows[1].ratio_tokens_vs_full > 0


def test_isolated_processes_and_merged_lora_forward(tmp_path):
    """--isolate runs each method in a spawned process; the merged-forward LoRA row names its
    flag and still gets its ratio to full fine-tuning (which ran without it)."""
    rc = main(["bench", "--device", "cpu", "--methods", "full,lora", "--steps", "1", "--warmup", "0",
               "--isolate", "--lora-merged-forward", "--out", str(tmp_path), "--name", "iso"])
    assert rc == 0
    by = {r["method"]: r for r in json.loads((tmp_path / "iso.json").read_text())["rows"]}
    assert by["full"]["variant"] == "eager-fp32-base" and by["lora"]["variant"] == "merged_forward+stacked_qkv"
    assert by["lora"]["ratio_tokens_vs_full"] > 0
    rc = main(["bench", "--device", "cpu", "--methods", "lora", "--steps", "1", "--warmup", "0", "--loss-chunk", "16",
               "--out", str(tmp_path), "--name", "chunk"])
    assert rc == 0 and json.loads((tmp_path / "chunk.json").read_text())["rows"][0]["variant"] == "loss_chunk=16"
    rc = main(["bench", "--device", "cpu", "--methods", "lora", "--steps", "1", "--warmup", "0", "--sdpa-math",
               "--no-fused-adamw", "--out", str(tmp_path), "--name", "math"])
    row = json.loads((tmp_path / "math.json").read_text())["rows"][0]
    assert rc == 0 and row["variant"] == "sdpa_math" and row["tokens_per_s"] > 0  # CPU AdamW is never fused
    assert bench.variant_name(bench.BenchConfig(fused_adamw=False), "full") == "frozen_bf16+foreach_adamw"
    assert bench.variant_name(bench.BenchConfig(sync_each_step=True), "full") == "frozen_bf16+sync_each_step"
    assert bench.variant_name(bench.BenchConfig(device="cpu", sync_each_step=True), "full") == "eager-fp32-base"
    assert "synchronized once" in bench_timing.describe(bench.BenchConfig())
    assert "every step" in bench_timing.describe(bench.BenchConfig(sync_each_step=True))
    assert bench.meta(bench.BenchConfig(device="cpu", sync_each_step=True))["timing"] == "wall clock per step"
    assert bench.variant_name(bench.BenchConfig(device="cpu", loss_chunk=8), "probe") == "eager-fp32-base"  # no loss
    assert bench.BenchConfig(device="cpu", compile=True).isolate  # on by default with compile
    assert not bench.BenchConfig(device="cpu").isolate


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA event timing needs a GPU")
def test_window_timing_measures_gpu_work_and_host_stalls():
    cfg = bench.BenchConfig(device="cuda", steps=6, warmup=1)
    cycles = 20_000_000
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(cycles)  # warm up the sleep kernel
    s.record()
    torch.cuda._sleep(cycles)
    e.record()
    torch.cuda.synchronize()
    gpu_ms = s.elapsed_time(e)
    gpu_step = lambda i: torch.cuda._sleep(cycles)  # noqa: E731
    window, _, each = bench_timing.time_steps(gpu_step, cfg)
    synced, _, _ = bench_timing.time_steps(gpu_step, replace(cfg, sync_each_step=True))
    assert len(each) == cfg.steps
    assert window == pytest.approx(gpu_ms, rel=0.2) and synced == pytest.approx(gpu_ms, rel=0.2)
    # a step whose host work the GPU cannot hide (no GPU work queued ahead): the GPU idles, and
    # the window counts the idle time
    host_step = lambda i: (time.sleep(0.01), torch.cuda._sleep(1000))  # noqa: E731
    assert bench_timing.time_steps(host_step, cfg)[0] >= 9.0
    # host work (5 ms) in front of longer GPU work: queued, the host prepares the next step while
    # the GPU runs this one and the step costs the GPU work only; synchronized, it costs both
    assert gpu_ms > 8.0
    mixed_step = lambda i: (time.sleep(0.005), torch.cuda._sleep(cycles))  # noqa: E731
    queued = bench_timing.time_steps(mixed_step, cfg)[0]
    synced = bench_timing.time_steps(mixed_step, replace(cfg, sync_each_step=True))[0]
    assert queued == pytest.approx(gpu_ms, rel=0.2) and synced - queued > 3.0


def test_max_grad_norm_clips_every_step_as_a_run_does(monkeypatch, capsys):
    """--max-grad-norm N: each timed step clips the gradients to N with the clipping and AdamW step
    `minift train` takes on that device (``fast.adamw.chosen``), and the row says so; none by default."""
    from minift.fast import adamw as fast_adamw
    calls = []

    def chosen(opt, fast):
        def update(max_norm):
            ps = [p for g in opt.param_groups for p in g["params"]]
            calls.append((len(ps), max_norm, all(p.grad is not None for p in ps)))
            return fast_adamw.reference_step(opt, ps, max_norm)
        return update
    monkeypatch.setattr(fast_adamw, "chosen", chosen)
    cfg = bench.BenchConfig(model="tiny-gpt", methods=("lora",), batch=2, seq_len=32, device="cpu", steps=2, warmup=1,
                            max_grad_norm=0.5)
    pr = bench.prepare(cfg, "lora")
    pr.step(0)
    pr.step(1)
    n = sum(p.requires_grad for p in pr.model.parameters())
    assert calls == [(n, 0.5, True)] * 2
    assert "clip0.5" in bench.variant_name(cfg, "lora") and "clip" not in bench.variant_name(cfg, "probe")
    assert bench.meta(cfg)["max_grad_norm"] == 0.5 and "max_grad_norm" not in bench.meta(replace(cfg, max_grad_norm=None))
    calls.clear()
    bench.prepare(replace(cfg, max_grad_norm=None), "lora").step(0)
    assert calls == [(n, None, True)]  # the step itself, without clipping
    assert main(["bench", "--device", "cpu", "--max-grad-norm", "0"]) == 2
    assert "max_grad_norm must be > 0, got 0.0" in capsys.readouterr().err
