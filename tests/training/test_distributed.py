"""Training on 2 ranks (CPU, gloo) against one process: data parallel (LoRA, prompt tuning, AdaLoRA,
full fine-tuning), FSDP2-sharded full fine-tuning, Ctrl-C on one rank and resume on 2 ranks and on
1, damaged checkpoints, and `torchrun -m minift train` end to end.

One spawn of 2 processes runs every 2-rank case of the module (``two_ranks``); the one-process
references run here. Dropout is off: each rank draws its own masks, so only a run without dropout
can equal the one-process run.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from minift.cli import main
from minift.methods.registry import build_method
from minift.models.gpt import GPT, GPTConfig
from minift.training import distributed
from minift.training.config import TrainConfig
from minift.training.loop import train

TINY = dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32, dropout=0.0)
STEPS, STOP = 6, 3  # the run's steps; the step after which a Ctrl-C stops it
TOL = 1e-6


OPTIONS = {"full": {}, "lora": {"r": 4, "alpha": 8, "targets": ("q_proj", "v_proj")},
           "prompt": {"num_virtual_tokens": 3},  # its virtual positions move the targets (distributed.targets)
           "adalora": {"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 1, "delta_t": 1}}  # allocator, penalty


def model(method: str) -> tuple[GPT, dict]:
    """A tiny GPT with ``method`` applied, and the method's hooks for ``train``."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(**TINY))
    st = build_method(m, method, OPTIONS[method], lr=3e-3, weight_decay=0.1, total_steps=STEPS)
    return m, st.train_hooks()


def data() -> list[dict]:
    """Batches of 4, 3 and 1 rows (the last two deal 2+1 and 1+0 rows over 2 ranks), with padding."""
    g = torch.Generator().manual_seed(1)
    out = []
    for B in (4, 4, 3, 1):
        x = torch.randint(0, 97, (B, 12), generator=g)
        mask = torch.ones_like(x)
        mask[0, -3:] = 0
        out.append({"input_ids": x, "attention_mask": mask, "labels": x.masked_fill(mask == 0, -100)})
    return out


def cfg(out, **kw) -> TrainConfig:
    base = dict(lr=3e-3, steps=STEPS, grad_accum=2, warmup=1, schedule="cosine", weight_decay=0.1,
                progress=False, plot=False, out_dir=str(out), seed=3, log_every=2)
    return TrainConfig(**{**base, **kw})


def ctrl_c_on_rank_1(step, loss):
    """A SIGINT to rank 1 alone after step STOP, as torchrun's would land on one rank before another."""
    if step == STOP and distributed.rank() == 1:
        os.kill(os.getpid(), signal.SIGINT)


# ---------------------------------------------------------------------------- the 2-rank runs

CASES = [("lora", "lora", False), ("prompt", "prompt", False), ("adalora", "adalora", False), ("full", "full", False),
         ("sharded", "full", True)]  # (name, method, sharded)


def _rank(rank: int, port: int, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), CUDA_VISIBLE_DEVICES="")  # gloo on the CPU, GPUs or not
    torch.set_num_threads(1)
    distributed.init()
    tmp, got = Path(tmp), {}
    for name, method, shard in CASES:
        m, hooks = model(method)
        distributed.shard(m, torch.device("cpu"), bf16=False) if shard else distributed.replicate(m)
        got[name] = train(m, data(), cfg(tmp / name), **hooks).losses
    for name, method, shard in (("lora-stop", "lora", False), ("sharded-stop", "full", True)):
        m, hooks = model(method)
        distributed.shard(m, torch.device("cpu"), bf16=False) if shard else distributed.replicate(m)
        part = train(m, data(), cfg(tmp / name), on_step=ctrl_c_on_rank_1, **hooks)
        got[name + "-part"] = [part.steps, part.interrupted, part.losses]
        if rank == 0:  # kept for the one-process resume of the same checkpoint
            shutil.copytree(tmp / name / "last", tmp / name / "stopped")
        distributed.barrier()
        m, hooks = model(method)
        distributed.shard(m, torch.device("cpu"), bf16=False) if shard else distributed.replicate(m)
        got[name] = train(m, data(), cfg(tmp / name, resume=True), **hooks).losses
    if rank == 0:
        (tmp / "losses.json").write_text(json.dumps(got))
    distributed.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ranks")
    ctx = mp.start_processes(_rank, args=(_free_port(), str(tmp)), nprocs=2, join=False, start_method="spawn")
    for _ in range(180):  # seconds: a collective that never completes fails the test instead of hanging it
        if ctx.join(timeout=1):
            break
    else:
        for p in ctx.processes:
            p.kill()
        pytest.fail("the 2-rank runs did not finish in 180 s")
    return tmp, json.loads((tmp / "losses.json").read_text())


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("one")
    out = {}
    for method in OPTIONS:
        m, hooks = model(method)
        out[method] = train(m, data(), cfg(tmp / method), **hooks).losses
    return out


def close(a, b):
    return len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) <= TOL


@pytest.mark.parametrize("name, method", [(name, method) for name, method, _ in CASES])
def test_two_ranks_log_the_losses_of_one_process(two_ranks, one_process, name, method):
    _, got = two_ranks
    assert len(got[name]) == STEPS and close(got[name], one_process[method]), (got[name], one_process[method])


@pytest.mark.parametrize("name, method", [("lora-stop", "lora"), ("sharded-stop", "full")])
def test_ctrl_c_on_one_rank_stops_both_after_the_same_step_and_resume_continues(two_ranks, one_process, name,
                                                                               method):
    tmp, got = two_ranks
    steps, interrupted, losses = got[name + "-part"]
    assert interrupted and steps == STOP and close(losses, one_process[method][:STOP])
    assert close(got[name], one_process[method])
    ckpt = tmp / name / "last"
    assert (ckpt / ".metadata").is_file() and (ckpt / "rng.1.safetensors").is_file()  # a checkpoint of 2 ranks


@pytest.mark.parametrize("name, method", [("lora-stop", "lora"), ("sharded-stop", "full")])
def test_one_process_resumes_a_checkpoint_of_two_ranks(two_ranks, one_process, tmp_path, name, method):
    tmp, _ = two_ranks
    shutil.copytree(tmp / name / "stopped", tmp_path / "last")  # what the 2 ranks wrote at the Ctrl-C
    m, hooks = model(method)
    res = train(m, data(), cfg(tmp_path, resume=True), **hooks)
    assert res.steps == STEPS and close(res.losses, one_process[method])


# ---------------------------------------------------------------------------- torchrun -m minift train

@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A tiny GPT-2 directory with a word-level tokenizer, and a causal-LM text file."""
    from conftest import tiny_lm_dir
    return tiny_lm_dir(tmp_path_factory.mktemp("lm"))


def train_args(lm, out, steps, *extra):
    # constant lr: a run of 2 steps continued to 4 takes the steps of a run of 4. On the CPU, as the
    # torchrun runs (GPUs hidden) are, so that one-process runs compare with them on a GPU machine
    # too (a later --device in extra wins)
    return ["train", "--model", lm / "gpt", "--train", lm / "lm.txt", "--task", "causal-lm", "--max-len", "8",
            "--method", "full", "--steps", str(steps), "--batch-size", "4", "--lr", "1e-2", "--schedule", "constant",
            "--no-progress", "--device", "cpu", "--out", out, *extra]


def logged(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_torchrun_sharded_then_one_process_resume(lm, tmp_path, capsys):
    from safetensors.torch import load_file
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "minift",
           *map(str, train_args(lm, tmp_path / "two", 2, "--shard"))]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[2],
                       env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count('"steps": 2') == 1  # one summary line: rank 0's
    assert main([str(a) for a in train_args(lm, tmp_path / "one", 2)]) == 0
    capsys.readouterr()
    assert close(logged(tmp_path / "two"), logged(tmp_path / "one"))
    two, one = (load_file(tmp_path / d / "model" / "model.safetensors") for d in ("two", "one"))
    # 1e-5: the key bias's true gradient is 0 (softmax ignores a shift), and AdamW scales its rounding
    # noise up to a step of up to lr; every other weight agrees to 1e-6
    assert two.keys() == one.keys() and all(torch.allclose(two[k], one[k], atol=1e-5, rtol=0) for k in one)
    # the 2 ranks' checkpoint continued on one process, to the steps of a one-process run of 4
    assert main([str(a) for a in train_args(lm, tmp_path / "two", 4, "--resume")]) == 0
    assert main([str(a) for a in train_args(lm, tmp_path / "four", 4)]) == 0
    capsys.readouterr()
    assert close(logged(tmp_path / "two"), logged(tmp_path / "four"))


def test_torchrun_data_parallel_lora_with_evaluations(lm, tmp_path, capsys):
    from safetensors.torch import load_file
    # torchrun's parser refuses --r (an abbreviation of several of its flags): the rank goes in a --config
    (tmp_path / "run.toml").write_text("[method]\nname = 'lora'\nr = 2\n")
    extra = ["--method", "lora", "--config", tmp_path / "run.toml", "--dev", lm / "lm.txt", "--eval-every", "1"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "minift",
           *map(str, train_args(lm, tmp_path / "two", 3, *extra))]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[2],
                       env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("data parallel over 2 ranks") == 1  # rank 0 alone prints
    assert main([str(a) for a in train_args(lm, tmp_path / "one", 3, *extra)]) == 0
    capsys.readouterr()
    records = [[json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
               for d in ("two", "one")]
    assert [sorted(r) for r in records[0]] == [sorted(r) for r in records[1]]  # 3 steps, 3 evaluations
    assert close([r.get("loss", r.get("eval", {}).get("loss")) for r in records[0]],
                 [r.get("loss", r.get("eval", {}).get("loss")) for r in records[1]])
    two, one = (load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in ("two", "one"))
    assert two.keys() == one.keys() and all(torch.allclose(two[k], one[k], atol=TOL, rtol=0) for k in one)


@pytest.mark.parametrize("extra, ranks, needle", [
    (["--method", "lora", "--shard"], "2", "--shard shards full fine-tuning"),
    (["--shard"], "1", "--shard needs several processes"),
    (["--batch-size", "3"], "2", "--batch-size 3 is the global batch and must divide evenly over the 2 ranks"),
])
def test_bad_launch_exits_2_with_one_line(lm, tmp_path, capsys, monkeypatch, extra, ranks, needle):
    monkeypatch.setenv("WORLD_SIZE", ranks)  # as torchrun sets it; the check comes before joining any rank
    rc = main([str(a) for a in train_args(lm, tmp_path / "o", 2)] + extra)
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and needle in err, err


def test_a_damaged_or_foreign_checkpoint_of_two_ranks_is_one_error_naming_its_file(two_ranks, tmp_path):
    from conftest import garbage
    from minift.files import InputError
    from minift.training.checkpoint import load_checkpoint
    from minift.training.loop import make_optimizer
    tmp, _ = two_ranks
    m, _ = model("full")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    lora_into_full = r"stopped/\.metadata: tensor 'layers\.0\.attn\.q_proj\.lora_A' .* does not exist in the model"
    with pytest.raises(InputError, match=lora_into_full):
        load_checkpoint(tmp / "lora-stop" / "stopped", m, make_optimizer(m, cfg(tmp_path)))  # LoRA's, into full
    shutil.copytree(tmp / "sharded-stop" / "stopped", tmp_path / "last")
    garbage(tmp_path / "last" / ".metadata")
    with pytest.raises(InputError, match=r"last/\.metadata: not a readable torch.distributed.checkpoint index"):
        load_checkpoint(tmp_path / "last", m, make_optimizer(m, cfg(tmp_path)))
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


def test_more_ranks_than_gpus_on_a_cuda_run_exits_2(lm, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    rc = main([str(a) for a in train_args(lm, tmp_path / "o", 2)] + ["--device", "cuda"])
    err = capsys.readouterr().err
    assert rc == 2 and "2 ranks on this host but 1 GPU(s)" in err and len(err.strip().splitlines()) == 1, err


def test_an_explicit_gpu_under_torchrun_exits_2(lm, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    rc = main([str(a) for a in train_args(lm, tmp_path / "o", 2)] + ["--device", "cuda:0"])
    err = capsys.readouterr().err
    assert rc == 2 and "--device cuda:0 would put every rank on one GPU" in err, err
