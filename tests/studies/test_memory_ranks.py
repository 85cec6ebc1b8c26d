"""The memory estimate of one rank of N (``minift.studies.memory_ranks``), by hand on a tiny GPT, and
``minift recommend --nproc N [--shard]``."""
import re

import pytest

from minift.cli import main
from minift.models.bert import BertConfig
from minift.models.gpt import GPTConfig
from minift.studies import memory_ranks
from minift.studies.memory import estimate_memory
from minift.studies.memory_ranks import estimate_per_rank

# every tensor of this model has an even number of elements: its shards over 2 ranks are exact halves
TINY = GPTConfig(vocab_size=16, block_size=16, n_layer=2, n_head=2, n_embd=8, n_inner=32, dropout=0.0)
# one block: q, k, v, o (8x8 + 8 each), up (8x32 + 32), down (32x8 + 8), two LayerNorms (8 + 8 each)
BLOCK = 4 * (64 + 8) + (256 + 32) + (256 + 8) + 2 * 16  # 872
ROOT = 16 * 8 + 16 * 8 + 2 * 8  # wte, wpe, ln_f (weight, bias)
TENSORS = 2 * (6 * 2 + 4) + 4  # 36: + wte, wpe, ln_f weight and bias


@pytest.mark.parametrize("config", [TINY, BertConfig(vocab_size=16, max_position_embeddings=16, n_layer=2, n_head=2,
                                                     n_embd=8, n_inner=32)])
@pytest.mark.parametrize("method", ["full", "lora", "prefix", "freeze", "probe"])
def test_one_rank_is_the_one_process_estimate(config, method):
    for kw in ({}, {"dtype": "fp32", "device": "cpu"}):
        assert estimate_per_rank(config, method, 4, 12, nproc=1, num_virtual_tokens=4, **kw) == \
            estimate_memory(config, method, 4, 12, num_virtual_tokens=4, **kw)


def test_hand_sizes_of_the_tiny_model():
    est = estimate_memory(TINY, "full", 2, 8, "fp32", device="cpu")
    assert est.total_params == 2 * BLOCK + ROOT
    assert est.optimizer_state == 8 * (2 * BLOCK + ROOT) + 4 * TENSORS


@pytest.mark.parametrize("N", [2, 4])
def test_data_parallel_activations_are_those_of_batch_over_n_and_state_is_whole(N):
    one = estimate_memory(TINY, "lora", 8 // N, 12, "fp32", device="cpu")
    est = estimate_per_rank(TINY, "lora", 8, 12, "fp32", device="cpu", nproc=N)
    assert (est.activations, est.logits) == (one.activations, one.logits)
    assert (est.weights, est.gradients, est.optimizer_state) == (one.weights, one.gradients, one.optimizer_state)
    assert est.comm == 4 * est.trainable_params  # one bucket: every gradient, as one flat fp32 copy
    assert est.gathered == 0 and est.ranks == N
    assert est.peak == max(one.backward_peak, one.step_peak + est.comm)


def test_data_parallel_buckets_follow_sum_gradients(monkeypatch):
    monkeypatch.setattr(memory_ranks, "BUCKET", 1)  # one tensor a bucket: the largest neighbours count
    est = estimate_per_rank(TINY, "full", 4, 8, "fp32", device="cpu", nproc=2)
    assert est.comm == 4 * (256 + 32)  # up_proj's weight and bias (or its bias and down_proj's weight)


def test_sharded_state_is_one_nth_and_adds_the_gathered_working_set():
    whole = estimate_memory(TINY, "full", 4, 8, "fp32", device="cpu")
    est = estimate_per_rank(TINY, "full", 4, 8, "fp32", device="cpu", nproc=2, shard=True)
    n = 2 * BLOCK + ROOT
    assert (est.weights, est.gradients) == (4 * n // 2, 4 * n // 2) == (whole.weights // 2, whole.gradients // 2)
    assert est.optimizer_state == 8 * n // 2 + 4 * TENSORS  # the moments halve; one step count per tensor
    # fp32: root and one block gathered, and their unsharded gradients (no bf16 -> fp32 copy)
    assert est.gathered == 2 * 4 * ROOT + 2 * 4 * BLOCK
    one = estimate_memory(TINY, "full", 2, 8, "fp32", device="cpu")
    assert (est.activations, est.logits) == (one.activations, one.logits)
    assert est.comm == 0 and est.peak == max(est.backward_peak, est.step_peak)
    assert est.backward_peak == est.weights + est.optimizer_state + est.activations + est.logits + est.extras \
        + est.gathered


def test_sharded_bf16_gathers_bf16_weights_and_reduces_fp32_gradients():
    est = estimate_per_rank(TINY, "full", 4, 8, nproc=2, shard=True)  # CUDA, bf16 autocast
    n = 2 * BLOCK + ROOT
    assert (est.weights, est.gradients) == (2 * n, 2 * n)  # the fp32 shards
    assert est.gathered == 2 * 2 * ROOT + 2 * 2 * BLOCK + 4 * BLOCK
    # no autocast copies of the weights: the gathered ones are bf16 already
    assert est.activations < estimate_memory(TINY, "full", 2, 8).activations


@pytest.mark.parametrize("kw, match", [
    ({"nproc": 0}, ">= 1"), ({"nproc": -2}, ">= 1"),
    ({"nproc": 2, "shard": True, "method": "lora"}, "shards full fine-tuning"),
    ({"nproc": 1, "shard": True}, "several ranks"),
    ({"nproc": 3}, "divide evenly"),
])
def test_bad_ranks_are_value_errors(kw, match):
    method = kw.pop("method", "full")
    with pytest.raises(ValueError, match=match):
        estimate_per_rank(TINY, method, 4, 8, **kw)


def test_cli_recommend_says_per_rank(capsys):
    assert main(["recommend", "--preset", "gpt2", "--gpu-mem", "16", "--batch", "8", "--seq-len", "512",
                 "--nproc", "4", "--shard"]) == 0
    out = capsys.readouterr().out
    assert "per rank of 4 GPUs" in out and "estimated peak per rank" in out
    assert "full fine-tuning sharded, the others data parallel, 2 rows per rank" in out
    assert main(["recommend", "--preset", "gpt2", "--gpu-mem", "16", "--batch", "8", "--seq-len", "512"]) == 0
    assert "per rank" not in capsys.readouterr().out


@pytest.mark.parametrize("argv, match", [
    (["--nproc", "0"], "--nproc must be >= 1"),
    (["--nproc", "3"], "divide evenly over --nproc 3"),
    (["--shard"], "--shard needs several GPUs"),
])
def test_cli_recommend_bad_ranks_exit_2_with_one_line(argv, match, capsys):
    assert main(["recommend", "--preset", "gpt2", "--gpu-mem", "16", "--batch", "8", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(match, err)


# ---------------------------------------------------------------------------- minift bench --nproc N

def test_bench_nproc_refuses_a_machine_with_fewer_gpus(monkeypatch, capsys):
    import torch
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main(["bench", "--nproc", "2", "--model", "gpt2", "--batch", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs 2 CUDA GPUs; this machine has 1" in err


@pytest.mark.parametrize("argv, match", [
    (["--nproc", "0"], "--nproc must be >= 2"), (["--nproc", "1", "--dry-run"], "--nproc must be >= 2"),
    (["--nproc", "2", "--batch", "3"], "divide evenly over --nproc 2"),
    (["--nproc", "2", "--methods", "full,prefix"], "not a subset of full,lora"),
    (["--nproc", "2", "--model", "gpt5"], "unknown model preset"),
    (["--nproc", "2", "--device", "cpu"], "CUDA GPUs only"),
])
def test_bench_nproc_bad_flags_exit_2_with_one_line(argv, match, capsys):
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(match, err)


def test_bench_nproc_dry_run_prints_the_torchrun_command(capsys, tmp_path):
    assert main(["bench", "--nproc", "4", "--dry-run", "--model", "gpt2", "--batch", "8", "--seq-len", "256",
                 "--methods", "full", "--out", str(tmp_path)]) == 0
    cmd = capsys.readouterr().out.split()
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", "-m"]
    assert cmd[6] == "minift.studies.bench_dist" and "--rows=full,full-shard" in cmd and "--batch=8" in cmd
    assert f"--out={tmp_path}/bench-gpt2-4gpu.json" in cmd
    assert not list(tmp_path.iterdir())  # nothing ran
