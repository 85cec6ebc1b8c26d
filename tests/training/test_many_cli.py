"""`minift train-many` end to end: K jobs equal K `minift train` runs; Ctrl-C and --resume; bad jobs -> exit 2."""
import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import WORDS, llama_dir, tiny_lm_dir
from minift.cli import main

many = importlib.import_module("minift.training.many")  # the module (its _job_losses is patched below)
many_run = importlib.import_module("minift.training.many_run")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tiny_lm_dir(tmp_path_factory.mktemp("many"))
    (d / "lm2.txt").write_text(" ".join(reversed(WORDS * 5)))
    pc = [{"prompt": f"the film was {w}", "completion": " good" if w in ("good", "great", "fun") else " bad"}
          for w in ("good", "great", "fun", "bad", "awful", "dull")]
    (d / "pc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pc))
    (d / "pc_dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pc[:3]))
    return d


def toml(tables: dict) -> str:
    """A TOML document from {table: {key: value}} (tables named like "job.train" nest under [[job]])."""
    def value(v):
        return json.dumps(v) if not isinstance(v, bool) else str(v).lower()
    return "".join(f"[{t}]\n" + "".join(f"{k} = {value(v)}\n" for k, v in kv.items()) + "\n"
                   for t, kv in tables.items())


# three jobs: two tasks, other ranks, targets, seeds (two share one), schedules, LoRA+, step counts, a dev set
JOBS = {
    "a": {"method": {"r": 2, "alpha": 4, "targets": ["q_proj", "v_proj"]},
          "train": {"lr": 1e-2, "steps": 6, "warmup": 2, "schedule": "cosine", "weight_decay": 0.1, "seed": 1,
                    "batch_size": 2},
          "data": {"train": "lm.txt", "task": "causal-lm", "max_len": 8}},
    "b": {"method": {"r": 4, "alpha": 3, "targets": ["up_proj", "down_proj"], "rslora": True, "lr_ratio": 4.0},
          "train": {"lr": 5e-3, "steps": 3, "schedule": "linear", "seed": 2, "max_grad_norm": 0.05,
                    "batch_size": 3, "eval_every": 2},
          "data": {"train": "pc.jsonl", "dev": "pc_dev.jsonl", "task": "prompt-completion", "max_len": 12}},
    "c": {"method": {"r": 1, "alpha": 8, "targets": ["q_proj", "o_proj"]},
          "train": {"lr": 2e-2, "epochs": 2, "schedule": "constant", "seed": 1, "batch_size": 4},
          "data": {"train": "lm2.txt", "task": "causal-lm", "max_len": 6}},
}


def jobs_toml(d: Path, jobs=JOBS) -> Path:
    text = 'model = "gpt"\ndevice = "cpu"\n\n' + toml({"train": {"log_every": 1}})
    for name, tables in jobs.items():
        text += f'[[job]]\nname = "{name}"\n\n' + toml({f"job.{t}": kv for t, kv in tables.items()})
    path = d / "jobs.toml"
    path.write_text(text)
    return path


def run_cli(argv, capsys):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def run_many(d: Path, top: dict, jobs: dict, capsys, out: str = "many") -> None:
    """`minift train-many` on CPU over d/jobs.toml (``top``'s tables, then a [[job]] per job) into d/``out``."""
    text = 'device = "cpu"\n\n' + toml(top)
    for name, tables in jobs.items():
        text += f'[[job]]\nname = "{name}"\n\n' + toml({f"job.{t}": kv for t, kv in tables.items()})
    (d / "jobs.toml").write_text(text)
    rc, _, err = run_cli(["train-many", "--config", d / "jobs.toml", "--out", d / out, "--no-progress"], capsys)
    assert rc == 0, err


def log(d: Path) -> list[dict]:
    return [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]


def losses(d: Path) -> list[float]:
    return [r["loss"] for r in log(d) if "loss" in r]


def test_jobs_equal_separate_train_runs(files, tmp_path, capsys):
    cfg = jobs_toml(files)
    rc, out, err = run_cli(["train-many", "--config", cfg, "--out", tmp_path / "many", "--no-progress"], capsys)
    assert rc == 0, err
    summaries = {json.loads(line)["job"]: json.loads(line) for line in out.splitlines()}
    assert set(summaries) == set(JOBS) and summaries["b"]["steps"] == 3 and summaries["a"]["steps"] == 6
    for name, tables in JOBS.items():
        alone = files / f"alone_{name}.toml"  # the same tables as one `minift train --config` file
        alone.write_text(toml({"method": {"name": "lora", **tables["method"]}, "train": tables["train"],
                               "data": {**tables["data"], "model": "gpt"}}))
        rc, _, err = run_cli(["train", "--config", alone, "--out", tmp_path / name, "--device", "cpu",
                              "--no-progress"], capsys)
        assert rc == 0, err
        job = tmp_path / "many" / name
        want, got = losses(tmp_path / name), losses(job)
        assert len(got) == len(want) == summaries[name]["steps"]
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
        evals = [[r["eval"]["loss"] for r in log(d) if "eval" in r] for d in (job, tmp_path / name)]
        assert evals[0] == pytest.approx(evals[1], rel=1e-5) and (name != "b" or len(evals[0]) == 2)
        # the files of a minift train run: the same adapter keys, and minift eval reads them
        mine, theirs = (load_file(d / "adapter" / "model.safetensors") for d in (job, tmp_path / name))
        assert set(mine) == set(theirs)
        for k in mine:
            torch.testing.assert_close(mine[k], theirs[k], rtol=1e-4, atol=1e-5)
        assert (job / "adapter" / "adapter_config.json").is_file() and (job / "last" / "state.json").is_file()
        assert json.loads((job / "summary.json").read_text()) == summaries[name]
    rc, out, err = run_cli(["eval", "--adapter", tmp_path / "many" / "b" / "adapter", "--data", files / "pc.jsonl",
                            "--device", "cpu", "--no-progress"], capsys)
    assert rc == 0, err


def test_a_llama_base_trains_each_job_as_minift_train_does(tmp_path, capsys):
    llama_dir(tmp_path)  # tmp_path/llama and tmp_path/lm.txt
    jobs = {"x": {"method": {"r": 2}, "train": {"lr": 1e-2, "steps": 2, "batch_size": 2, "seed": 1}},
            "y": {"method": {"r": 4, "targets": ["q_proj", "k_proj", "gate_proj"]},  # another seed: another RNG
                  "train": {"lr": 2e-2, "steps": 3, "batch_size": 3, "seed": 5}}}
    data = {"model": "llama", "train": "lm.txt", "task": "causal-lm", "max_len": 8}
    run_many(tmp_path, {"data": data}, jobs, capsys)
    y = jobs["y"]
    (tmp_path / "y.toml").write_text(toml({"method": {"name": "lora", **y["method"]}, "train": y["train"],
                                           "data": data}))
    rc, _, err = run_cli(["train", "--config", tmp_path / "y.toml", "--out", tmp_path / "y", "--device", "cpu",
                          "--no-progress"], capsys)
    assert rc == 0, err
    assert losses(tmp_path / "many" / "y") == pytest.approx(losses(tmp_path / "y"), rel=1e-5, abs=1e-6)
    assert len(losses(tmp_path / "many" / "y")) == 3 and len(losses(tmp_path / "many" / "x")) == 2


def test_ctrl_c_then_resume_continues_every_job_exactly(files, tmp_path, capsys, monkeypatch):
    cfg = jobs_toml(files)
    base = ["train-many", "--config", cfg, "--no-progress"]
    assert run_cli([*base, "--out", tmp_path / "a"], capsys)[0] == 0
    real, calls = many._job_losses, []

    def interrupted(model, batch, sizes):
        calls.append(1)
        if len(calls) == 4:  # Ctrl-C in the middle of step 4: job b has done its 3 steps and stopped
            raise KeyboardInterrupt
        return real(model, batch, sizes)

    monkeypatch.setattr(many, "_job_losses", interrupted)
    rc, _, err = run_cli([*base, "--out", tmp_path / "b"], capsys)
    assert rc == 130 and "--resume" in err and "a at step 3" in err and "b at step" not in err, err
    assert json.loads((tmp_path / "b" / "b" / "last" / "state.json").read_text())["step"] == 3
    assert not (tmp_path / "b" / "a" / "adapter").exists()
    rc, _, err = run_cli([*base, "--out", tmp_path / "b"], capsys)  # a checkpoint: --resume or --overwrite
    assert rc == 2 and "job 1 (a)" in err and "--resume" in err
    before = {p: p.read_bytes() for p in (tmp_path / "b").rglob("*") if p.is_file()}
    changed = jobs_toml(files, _bad(train={"lr": 1e-3}))  # a resume must keep the settings of every job
    rc, _, err = run_cli(["train-many", "--config", changed, "--out", tmp_path / "b", "--resume"], capsys)
    assert rc == 2 and "job 2 (b): --resume: --lr differs" in err, err
    assert {p: p.read_bytes() for p in (tmp_path / "b").rglob("*") if p.is_file()} == before  # nothing changed
    jobs_toml(files)
    monkeypatch.setattr(many, "_job_losses", real)
    rc, _, err = run_cli([*base, "--out", tmp_path / "b", "--resume"], capsys)
    assert rc == 0, err
    for name in JOBS:
        want, got = log(tmp_path / "a" / name), log(tmp_path / "b" / name)
        assert [r["step"] for r in got] == [r["step"] for r in want]
        assert losses(tmp_path / "b" / name) == pytest.approx(losses(tmp_path / "a" / name), rel=1e-6, abs=1e-7)


def test_jobs_resume_from_checkpoints_of_different_steps(files, tmp_path, capsys, monkeypatch):
    """A crash between two jobs' checkpoint writes leaves them at different steps: each resumes its own."""
    cfg = jobs_toml(files, {**JOBS, "c": {**JOBS["c"], "train": {**JOBS["c"]["train"], "save_every": 2}}})
    base = ["train-many", "--config", cfg, "--no-progress"]
    assert run_cli([*base, "--out", tmp_path / "a"], capsys)[0] == 0
    real, calls, c = many._job_losses, [], tmp_path / "b" / "c"

    def interrupted(model, batch, sizes):
        calls.append(1)
        if len(calls) == 3:  # step 3 begins: job c's checkpoint of step 2 is on disk
            shutil.copytree(c / "last", tmp_path / "c_step2")
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(model, batch, sizes)

    monkeypatch.setattr(many, "_job_losses", interrupted)
    assert run_cli([*base, "--out", tmp_path / "b"], capsys)[0] == 130
    shutil.rmtree(c / "last")
    shutil.copytree(tmp_path / "c_step2", c / "last")  # c as if the crash came before its step-3 checkpoint
    monkeypatch.setattr(many, "_job_losses", real)
    rc, _, err = run_cli([*base, "--out", tmp_path / "b", "--resume"], capsys)
    assert rc == 0 and "a (6 steps, resuming after 3)" in err and "c (8 steps, resuming after 2)" in err, err
    for name in JOBS:
        assert [r["step"] for r in log(tmp_path / "b" / name)] == [r["step"] for r in log(tmp_path / "a" / name)]
        assert losses(tmp_path / "b" / name) == pytest.approx(losses(tmp_path / "a" / name), rel=1e-6, abs=1e-7)


def test_ctrl_c_during_an_evaluation_runs_it_again_on_resume(files, tmp_path, capsys, monkeypatch):
    cfg = jobs_toml(files)
    base = ["train-many", "--config", cfg, "--no-progress"]
    assert run_cli([*base, "--out", tmp_path / "a"], capsys)[0] == 0
    real = many_run.evaluate

    def interrupted(*a, **kw):
        raise KeyboardInterrupt  # the first evaluation (job b after step 2)

    monkeypatch.setattr(many_run, "evaluate", interrupted)
    assert run_cli([*base, "--out", tmp_path / "b"], capsys)[0] == 130
    assert json.loads((tmp_path / "b" / "b" / "last" / "state.json").read_text())["eval_pending"] is True
    monkeypatch.setattr(many_run, "evaluate", real)
    assert run_cli([*base, "--out", tmp_path / "b", "--resume"], capsys)[0] == 0
    for name in JOBS:
        want, got = log(tmp_path / "a" / name), log(tmp_path / "b" / name)
        assert [sorted(r) for r in got] == [sorted(r) for r in want]
        assert losses(tmp_path / "b" / name) == pytest.approx(losses(tmp_path / "a" / name), rel=1e-6, abs=1e-7)


def _bad(**change) -> dict:
    """JOBS with job b's tables changed: change = {"train": {"lr": ...}}."""
    out = json.loads(json.dumps(JOBS))
    for table, kv in change.items():
        for k, v in kv.items():
            out["b"].setdefault(table, {})[k] = v
    return out


@pytest.mark.parametrize("jobs, needle", [
    (_bad(method={"dropout": 1.5}), "dropout must be in [0, 1), got 1.5"),
    (_bad(method={"name": "dora"}), "trains plain LoRA adapters only"),
    (_bad(method={"r": "two"}), "[job.method] r must be an integer"),
    (_bad(method={"rr": 2}), "unknown key 'rr' in [job.method]"),
    (_bad(method={"targets": ["qq_proj"]}), "'qq_proj' matches no"),
    (_bad(method={"r": 64}), "rank r=64 does not fit"),
    (_bad(train={"grad_accum": 2}), "[job.train] grad_accum = 2"),
    (_bad(train={"compile": True}), "[job.train] compile = true"),
    (_bad(train={"activation_budget": 0.8}), "[job.train] activation_budget = 0.8: train-many does not compile"),
    (_bad(train={"recompute_act": False}), "[job.train] recompute_act = false: train-many does not compile"),
    (_bad(train={"device": "cpu"}), "[job.train] device is shared by every job"),
    (_bad(train={"fast": False}), "[job.train] fast is shared by every job"),
    (_bad(train={"lr": -1.0}), "lr must be > 0"),
    (_bad(train={"metric": "accuracy"}), "[job.train] metric = 'accuracy' is not reported"),
    (_bad(data={"task": "classification"}), "does not mix with job 1's 'causal-lm'"),
    (_bad(method={"modules_to_save": ["ln_f"]}), "train-many trains no module in full"),
    (_bad(data={"train": "nope.txt"}), "[job.data] train: no file nope.txt"),
    (_bad(data={"model": "gpt"}), "[job.data] model is shared"),
])
def test_a_bad_job_exits_2_with_one_line_before_anything_is_written(jobs, needle, files, tmp_path, capsys):
    cfg = jobs_toml(files, jobs)
    rc, out, err = run_cli(["train-many", "--config", cfg, "--out", tmp_path / "o", "--no-progress"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert needle in err and "job 2 (" in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("text, needle", [
    ('model = "gpt"\n', "no [[job]] table"),
    ('modell = "gpt"\n[[job]]\n', "unknown top-level key 'modell'"),
    ('model = "gpt"\n[[job]]\nname = "a-b"\n', "job 1 (a-b): name must be a plain identifier"),
    ('model = "gpt"\n' + '[[job]]\nname = "a"\n[job.data]\ntrain = "lm.txt"\ntask = "causal-lm"\n' * 2,
     "job 2 (a): name 'a' is taken by job 1"),
    ('model = "gpt"\n[[job]]\n[job.data]\ntrain = "lm.txt"\n', "job 1 (job1): [data] task must be one of"),
    ('[[job]]\n[job.data]\ntrain = "lm.txt"\ntask = "causal-lm"\n', "no [data] model"),
    ('model = "gpt"\n[train]\nsteps = 0\n[[job]]\n[job.data]\ntrain = "lm.txt"\ntask = "causal-lm"\n',
     "steps must be >= 1"),
])
def test_bad_files_exit_2_with_one_line(text, needle, files, tmp_path, capsys):
    (files / "bad.toml").write_text(text)
    rc, _, err = run_cli(["train-many", "--config", files / "bad.toml", "--out", tmp_path / "o"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and needle in err, err


def test_real_process_exit_code_and_no_traceback(files, tmp_path):
    cfg = jobs_toml(files, _bad(method={"name": "dora"}))
    r = subprocess.run([sys.executable, "-m", "minift", "train-many", "--config", str(cfg), "--out", str(tmp_path)],
                       capture_output=True, text=True, cwd=Path(__file__).parent.parent.parent, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_fast_is_one_top_level_switch(files, tmp_path, capsys):
    cfg = jobs_toml(files)
    cfg.write_text("fast = false\n" + cfg.read_text())  # the reference path on CUDA; nothing changes on the CPU
    rc, _, err = run_cli(["train-many", "--config", cfg, "--out", tmp_path / "o", "--no-progress"], capsys)
    assert rc == 0 and "speed: reference path (eager)" in err, err


def test_classification_jobs_train_their_own_heads_as_minift_train_does(tmp_path, capsys, monkeypatch):
    from conftest import tokenizer_json
    from minift.models.bert import Bert, BertConfig
    (tmp_path / "bert").mkdir()
    n = tokenizer_json(tmp_path / "bert", ["[PAD]", "[UNK]", "[CLS]", "[SEP]"], bert=True)
    torch.manual_seed(0)
    Bert(BertConfig(vocab_size=n, max_position_embeddings=32, n_layer=2, n_head=2, n_embd=16, n_inner=32,
                    dropout=0.0)).save_pretrained(tmp_path / "bert")
    words = WORDS[:9]
    two = [{"text": f"the movie was {w} and {v}", "label": "pos" if i % 2 else "neg"}
           for i, w in enumerate(words) for v in ("very", "not")]
    three = [{"text": f"{v} {w} {w}", "label": "abc"[i % 3]} for i, w in enumerate(words) for v in ("a", "the")]
    for name, rows in (("two", two), ("three", three)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "three_dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in three[:5]))
    # two tasks (2 and 3 labels), two seeds; job "s" shares job "p"'s seed and label count
    jobs = {"p": {"method": {"r": 2}, "train": {"lr": 1e-2, "steps": 4, "batch_size": 4, "seed": 1},
                  "data": {"train": "two.jsonl"}},
            "t": {"method": {"r": 4, "targets": ["q_proj", "up_proj"]},
                  "train": {"lr": 2e-2, "steps": 3, "batch_size": 3, "seed": 5, "eval_every": 2,
                            "metric": "accuracy", "higher_is_better": True},
                  "data": {"train": "three.jsonl", "dev": "three_dev.jsonl"}},
            "s": {"method": {"r": 1, "alpha": 4}, "train": {"lr": 5e-3, "steps": 2, "batch_size": 2, "seed": 1},
                  "data": {"train": "two.jsonl"}}}
    data = {"model": "bert", "task": "classification", "max_len": 12}
    run_many(tmp_path, {"data": data, "train": {"log_every": 1}}, jobs, capsys)
    for name, tables in jobs.items():
        (tmp_path / f"{name}.toml").write_text(toml({"method": {"name": "lora", **tables["method"]},
                                                     "train": {**tables["train"], "log_every": 1},
                                                     "data": {**data, **tables["data"]}}))
        rc, _, err = run_cli(["train", "--config", tmp_path / f"{name}.toml", "--out", tmp_path / name,
                              "--device", "cpu", "--no-progress"], capsys)
        assert rc == 0, err
        job = tmp_path / "many" / name
        assert losses(job) == pytest.approx(losses(tmp_path / name), rel=1e-5, abs=1e-6)
        assert len(losses(job)) == tables["train"]["steps"]
        evals = [[r["eval"] for r in log(d) if "eval" in r] for d in (job, tmp_path / name)]
        assert [e["accuracy"] for e in evals[0]] == [e["accuracy"] for e in evals[1]]
        mine, theirs = (load_file(d / "adapter" / "model.safetensors") for d in (job, tmp_path / name))
        assert set(mine) == set(theirs) and any("classifier" in k for k in mine)
        for k in mine:
            torch.testing.assert_close(mine[k], theirs[k], rtol=1e-4, atol=1e-5)
        run = [json.loads((d / "run.json").read_text()) for d in (job, tmp_path / name)]
        assert run[0]["label2id"] == run[1]["label2id"] and len(run[0]["label2id"]) == (3 if name == "t" else 2)
    jobs["t"]["method"]["targets"] = ["q_proj", "classifier"]  # as minift train: refused, exit 2, nothing written
    with pytest.raises(AssertionError, match=r"job 2 \(t\): \[job.method\] targets: the classification head"):
        run_many(tmp_path, {"data": data}, jobs, capsys, out="bad")
    assert not (tmp_path / "bad").exists()
    rc, out, err = run_cli(["eval", "--adapter", tmp_path / "many" / "t" / "adapter", "--data",
                            tmp_path / "three_dev.jsonl", "--device", "cpu", "--no-progress"], capsys)
    assert rc == 0 and "accuracy" in out, err
    # the recipes' model name, as minift train reads it ("minilm": fetched, here the tiny BERT)
    from minift.training import fetch
    monkeypatch.setattr(fetch, "fetch_minilm", lambda *a, **k: tmp_path / "bert")
    run_many(tmp_path, {"data": {**data, "model": "minilm"}, "train": {"log_every": 1}}, {"p": jobs["p"]}, capsys,
             out="named")
    assert losses(tmp_path / "named" / "p") == losses(tmp_path / "many" / "p")
    # serving: the three adapters (two tasks, their own heads) onto one base, by name
    from minift.adapters import load_adapter
    from minift.adapters.multi import load_adapters
    from minift.methods.common import freeze_all
    from minift.methods.multi_lora import mixed_batch, set_active
    from minift.models.bert import BertClassifier
    base = BertClassifier.from_pretrained(tmp_path / "bert", num_labels=2).eval()
    freeze_all(base)
    assert load_adapters(base, {n: tmp_path / "many" / n / "adapter" for n in jobs}) == list(jobs)
    ids = torch.randint(4, n, (4, 9), generator=torch.Generator().manual_seed(0))
    alone = {}
    for name in jobs:
        single = BertClassifier.from_pretrained(tmp_path / "bert", num_labels=3 if name == "t" else 2).eval()
        load_adapter(single, tmp_path / "many" / name / "adapter")
        with torch.no_grad():
            alone[name] = single(ids).logits
        set_active(base, name)
        with torch.no_grad():
            torch.testing.assert_close(base(ids).logits, alone[name], rtol=1e-5, atol=1e-6)
    rows = ["t", "p", "s", "t"]
    with torch.no_grad(), mixed_batch(base, rows):
        mixed = base(ids).logits  # (4, 3): the two-label heads' rows padded with -inf
    for i, name in enumerate(rows):
        k = alone[name].shape[-1]
        torch.testing.assert_close(mixed[i, :k], alone[name][i], rtol=1e-5, atol=1e-6)
        assert torch.isinf(mixed[i, k:]).all()
