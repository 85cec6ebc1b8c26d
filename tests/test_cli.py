"""`minift train` / `minift eval` end to end on tiny models and data; bad input -> exit 2, one line."""
import importlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import WORDS, tokenizer_json
from minift.cli import main
from minift.methods.registry import METHODS
from minift.models.bert import Bert, BertConfig
from minift.models.gpt import GPT, GPTConfig

POS, NEG = ["good", "great", "fun"], ["bad", "awful", "dull"]




@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    bert_dir, gpt_dir = d / "bert", d / "gpt"
    bert_dir.mkdir(), gpt_dir.mkdir()
    n = tokenizer_json(bert_dir, ["[PAD]", "[UNK]", "[CLS]", "[SEP]"], bert=True)
    torch.manual_seed(0)
    Bert(BertConfig(vocab_size=n, max_position_embeddings=32, n_layer=2, n_head=2, n_embd=16, n_inner=32,
                    dropout=0.0)).save_pretrained(bert_dir)
    n = tokenizer_json(gpt_dir, ["<|endoftext|>"], bert=False)
    GPT(GPTConfig(vocab_size=n, block_size=32, n_layer=2, n_head=2, n_embd=16)).save_pretrained(gpt_dir)
    rows = [{"text": f"the movie was {w} and {v}", "label": "pos" if w in POS else "neg"}
            for w in POS + NEG for v in ("very", "not")]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    (d / "lm.txt").write_text(" ".join(WORDS * 6))
    pc = [{"prompt": f"the film was {w}", "completion": " good" if w in POS else " bad"} for w in POS + NEG]
    (d / "pc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pc))
    (d / "bad.jsonl").write_text('{"text": "good", "label": "pos"}\n{"text": "bad", "label": \n')
    (d / "nolabel.jsonl").write_text('{"text": "good", "label": "pos"}\n{"text": "bad"}\n')
    return d


SHORT = ["--steps", "3", "--batch-size", "4", "--no-progress", "--lr", "1e-2"]
FAST = [*SHORT, "--compile", "false"]  # on CUDA: no compiling per test (the default path has its own test)
METHOD_FLAGS = {"full": [], "lora": ["--r", "2", "--targets", "q_proj,v_proj"], "dora": ["--r", "2"],
                "adalora": ["--init-r", "4", "--target-r", "2", "--tinit", "1", "--tfinal", "1", "--delta-t", "1"],
                "prefix": ["--num-virtual-tokens", "3"], "prompt": ["--num-virtual-tokens", "3"],
                "freeze": ["--strategy", "bottom_up"], "bitfit": []}


def run_cli(argv, capsys):
    """``minift ARGV`` in this process: (exit code, stdout, stderr). A ``train`` that chooses neither
    the device nor the compile setting runs on the CPU: on a GPU machine minift train's default
    compiles under CUDA graphs, and torch crashes on a second model graphed in one process (each
    CUDA default-path test runs its own process instead)."""
    argv = [str(a) for a in argv]
    if argv[:1] == ["train"] and "--device" not in argv and "--compile" not in argv:
        argv += ["--device", "cpu"]
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("method", [m for m, spec in METHODS.items() if spec.trained])
def test_train_then_eval_classification(method, files, tmp_path, capsys):
    if method not in METHOD_FLAGS:
        pytest.fail(f"add CLI flags for the new method {method!r} to METHOD_FLAGS")
    out = tmp_path / "out"
    rc, stdout, err = run_cli(["train", "--model", files / "bert", "--train", files / "train.jsonl",
                               "--dev", files / "dev.jsonl", "--task", "classification", "--method", method,
                               "--out", out, *FAST, *METHOD_FLAGS[method]], capsys)
    assert rc == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["steps"] == 3 and 0.0 <= summary["eval"]["accuracy"] <= 1.0
    assert (out / "adapter" / "model.safetensors").is_file() and (out / "last" / "state.json").is_file()
    assert len((out / "metrics.jsonl").read_text().splitlines()) >= 3
    if method in ("lora", "dora", "adalora", "prefix", "prompt"):  # the adapter file, PEFT's layout
        assert (out / "adapter" / "adapter_config.json").is_file(), err
    rc, stdout, err = run_cli(["eval", "--model", files / "bert", "--adapter", out / "adapter",
                               "--data", files / "dev.jsonl"], capsys)
    assert rc == 0, err
    metrics = json.loads(stdout)
    # eval rebuilds the same model: its dev loss is the one training logged at its last step
    assert metrics["loss"] == pytest.approx(summary["eval"]["loss"], rel=1e-5)
    assert metrics["examples"] == 4 and "macro_f1" in metrics


def test_eval_predictions_reproduce_its_metrics_with_scikit_learn(files, tmp_path, capsys):
    from sklearn.metrics import accuracy_score, f1_score
    out = tmp_path / "out"
    rc, _, err = run_cli(["train", "--model", files / "bert", "--train", files / "train.jsonl", "--method", "lora",
                          "--out", out, *FAST, *METHOD_FLAGS["lora"]], capsys)
    assert rc == 0, err
    preds = tmp_path / "preds.jsonl"
    rc, stdout, err = run_cli(["eval", "--adapter", out / "adapter", "--data", files / "train.jsonl",
                               "--predictions", preds, "--no-progress"], capsys)
    assert rc == 0, err
    metrics = json.loads(stdout)
    records = [json.loads(line) for line in preds.read_text().splitlines()]
    rows = [json.loads(line) for line in (files / "train.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == list(range(len(rows)))
    assert [r["gold"] for r in records] == [r["label"] for r in rows]  # ids are positions in --data
    assert all(0.0 <= r["score"] <= 1.0 and r["pred"] in ("pos", "neg") for r in records)
    gold, pred = [r["gold"] for r in records], [r["pred"] for r in records]
    assert metrics["accuracy"] == accuracy_score(gold, pred)
    assert metrics["macro_f1"] == pytest.approx(f1_score(gold, pred, average="macro"), abs=1e-12)
    rc, _, err = run_cli(["eval", "--adapter", out / "adapter", "--data", files / "train.jsonl",
                          "--predictions", tmp_path / "no" / "p.jsonl"], capsys)
    assert rc == 2 and "directory" in err and "does not exist" in err


def test_compiled_training_with_merged_lora_matches_eager(files, tmp_path, capsys):
    """--compile true and --merged-forward change how the step runs, not what it computes: the
    logged losses equal the eager exact-path run's (fp32, CPU)."""
    base = ["train", "--model", files / "gpt", "--train", files / "lm.txt", "--task", "causal-lm", "--method",
            "lora", "--targets", "q_proj,v_proj,up_proj,down_proj", "--max-len", "16", "--device", "cpu", *FAST]
    losses = []
    for name, extra in (("eager", []), ("fast", ["--merged-forward", "--compile", "true"])):
        rc, stdout, err = run_cli([*base, "--out", tmp_path / name, *extra], capsys)
        assert rc == 0, err
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        losses.append([json.loads(x)["loss"] for x in lines if "loss" in json.loads(x)])
    assert len(losses[0]) >= 3
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    assert json.loads((tmp_path / "fast" / "run.json").read_text())["options"]["merged_forward"] is True


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the default fast path is CUDA's")
@pytest.mark.parametrize("method, task, data, mlps", [("lora", "causal-lm", "lm.txt", 2),
                                                      ("full", "causal-lm", "lm.txt", 0),
                                                      ("prefix", "prompt-completion", "pc.jsonl", 0),
                                                      ("lora", "classification", "train.jsonl", 2)])
def test_the_cuda_default_path_matches_eager(method, task, data, mlps, files, tmp_path, capsys):
    """On CUDA, minift train with no speed flags compiles the step (under CUDA graphs, batches
    padded where lengths vary) with minift.fast on, LoRA on down_proj recomputing the MLP's
    activation: its losses follow the eager run's (--fast false --compile false), both bf16
    autocast. Each run is its own process, as a user's is: torch crashes when a second model is
    compiled under CUDA graphs in one process (docs/speed.md)."""
    model = files / ("bert" if task == "classification" else "gpt")
    targets = ["--targets", "q_proj,v_proj,up_proj,down_proj"] if mlps else []
    base = ["train", "--model", model, "--train", files / data, "--task", task, "--method", method,
            "--max-len", "16", "--device", "cuda", *SHORT, *METHOD_FLAGS[method], *targets]
    losses = []
    for name, extra in (("default", []), ("eager", ["--fast", "false", "--compile", "false"])):
        r = subprocess.run([sys.executable, "-m", "minift", *map(str, [*base, "--out", tmp_path / name, *extra])],
                           capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent.parent)
        rc, err = r.returncode, r.stderr
        assert rc == 0, err
        assert ("torch.compile" in err) == (name == "default"), err
        assert ("frozen base in bf16" in err) == (name == "default" and method != "full"), err  # fast.frozen
        assert (f"MLP activation recomputed: {mlps} MLPs" in err) == (name == "default" and mlps > 0), err
        lines = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        losses.append([x["loss"] for x in lines if "loss" in x])
    assert len(losses[0]) == 3
    assert losses[0] == pytest.approx(losses[1], rel=2e-2)


def test_gpt_tasks_and_full_model_export(files, tmp_path, capsys):
    rc, stdout, err = run_cli(["train", "--model", files / "gpt", "--train", files / "lm.txt", "--task",
                               "causal-lm", "--method", "lora", "--targets", "q_proj,v_proj", "--max-len", "16",
                               "--out", tmp_path / "lm", *FAST], capsys)
    assert rc == 0, err
    assert (tmp_path / "lm" / "adapter" / "adapter_config.json").is_file()  # PEFT layout as well
    rc, stdout, err = run_cli(["train", "--model", files / "gpt", "--train", files / "pc.jsonl", "--dev",
                               files / "pc.jsonl", "--task", "prompt-completion", "--method", "full",
                               "--out", tmp_path / "pc", *FAST], capsys)
    assert rc == 0, err
    assert json.loads(stdout.splitlines()[-1])["eval"]["perplexity"] > 1.0
    reloaded = GPT.from_pretrained(tmp_path / "pc" / "model")  # full fine-tuning: an HF-format dir
    assert (tmp_path / "pc" / "model" / "tokenizer.json").is_file() and reloaded.config.n_layer == 2


def test_config_file_recipe_and_resume(files, tmp_path, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'[method]\nname = "lora"\nr = 2\ntargets = ["q_proj"]\n\n[train]\nsteps = 2\nlr = 1e-2\n'
                   f'batch_size = 4\n\n[data]\nmodel = "{files / "bert"}"\ntrain = "{files / "train.jsonl"}"\n'
                   f'task = "classification"\n')
    out = tmp_path / "out"
    rc, _, err = run_cli(["train", "--config", cfg, "--out", out, "--no-progress"], capsys)
    assert rc == 0, err
    run = json.loads((out / "run.json").read_text())
    assert run["options"]["r"] == 2 and run["options"]["targets"] == ["q_proj"] and run["train"]["steps"] == 2
    # flags override the file; --resume continues from the checkpoint at step 2
    rc, stdout, err = run_cli(["train", "--config", cfg, "--out", out, "--steps", "4", "--resume",
                               "--no-progress"], capsys)
    assert rc == 0, err
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert (out / "loss.png").is_file() == (importlib.util.find_spec("matplotlib") is not None)
    # a recipe supplies method + training options; the data comes from the flags
    rc, _, err = run_cli(["train", "--recipe", "sentiment-lora", "--model", files / "bert", "--train",
                          files / "train.jsonl", "--out", tmp_path / "r", "--steps", "1", "--no-progress"], capsys)
    assert rc == 0, err
    run = json.loads((tmp_path / "r" / "run.json").read_text())
    assert run["options"]["r"] == 16 and run["train"]["lr"] == 2e-4


@pytest.mark.parametrize("case, argv, needle", [
    ("invalid json", ["--train", "{d}/bad.jsonl", "--method", "lora"], "bad.jsonl:2"),
    ("missing field", ["--train", "{d}/nolabel.jsonl", "--method", "lora"], "missing field 'label'"),
    ("unknown method", ["--train", "{d}/train.jsonl", "--method", "lorax"], "unknown method 'lorax'"),
    ("unknown target", ["--train", "{d}/train.jsonl", "--method", "lora", "--targets", "qq_proj"], "qq_proj"),
    ("option of another method", ["--train", "{d}/train.jsonl", "--method", "full", "--r", "4"], "--r"),
    ("missing model dir", ["--model", "{d}/nope", "--train", "{d}/train.jsonl", "--method", "lora"], "nope"),
    ("bad toml", ["--train", "{d}/train.jsonl", "--method", "lora", "--config", "{d}/train.jsonl"], "TOML"),
    ("merged forward with dropout", ["--train", "{d}/train.jsonl", "--method", "lora", "--merged-forward",
                                     "--dropout", "0.1"], "--merged-forward needs --dropout 0"),
    ("merged forward for dora", ["--train", "{d}/train.jsonl", "--method", "dora", "--merged-forward"],
     "--merged-forward does not apply"),
    ("merged forward with --dora", ["--train", "{d}/train.jsonl", "--method", "lora", "--dora", "--merged-forward"],
     "--merged-forward covers plain LoRA only"),
])
def test_bad_input_exits_2_with_one_line(case, argv, needle, files, tmp_path, capsys):
    argv = [a.format(d=files) for a in argv]
    if "--model" not in argv:
        argv = ["--model", str(files / "bert")] + argv
    rc, _, err = run_cli(["train", *argv, "--out", tmp_path / "o", "--steps", "1", "--no-progress"], capsys)
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and needle in err and "Traceback" not in err, err


def test_real_process_exit_code_and_no_traceback(files, tmp_path):
    r = subprocess.run([sys.executable, "-m", "minift", "train", "--model", str(files / "nope"), "--train",
                        str(files / "train.jsonl"), "--method", "lora", "--out", str(tmp_path)],
                       capture_output=True, text=True, cwd=Path(__file__).parent.parent, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_ctrl_c_saves_and_resume_matches_an_uninterrupted_run(files, tmp_path, capsys, monkeypatch):
    train_module = importlib.import_module("minift.training.loop")  # the module, not minift.training.loop the function
    base = ["train", "--model", files / "bert", "--train", files / "train.jsonl", "--method", "lora",
            "--r", "2", "--dropout", "0.1", "--steps", "5", "--batch-size", "4", "--lr", "1e-2", "--no-progress"]
    assert run_cli([*base, "--out", tmp_path / "a"], capsys)[0] == 0
    real, calls = train_module.model_forward, []

    def interrupted(model, batch):
        calls.append(1)
        if len(calls) == 3:  # Ctrl-C in the middle of step 3
            raise KeyboardInterrupt
        return real(model, batch)

    monkeypatch.setattr(train_module, "model_forward", interrupted)
    rc, _, err = run_cli([*base, "--out", tmp_path / "b"], capsys)
    assert rc == 130 and "--resume" in err and (tmp_path / "b" / "last" / "state.json").is_file()
    monkeypatch.setattr(train_module, "model_forward", real)
    assert run_cli([*base, "--out", tmp_path / "b", "--resume"], capsys)[0] == 0

    def losses(d):
        return [json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert losses(tmp_path / "b") == losses(tmp_path / "a") and len(losses(tmp_path / "a")) == 5


def _train_args(files, out, *extra):
    return ["train", "--model", files / "bert", "--train", files / "train.jsonl", "--method", "bitfit",
            "--out", out, "--steps", "2", "--batch-size", "4", "--no-progress", *extra]


def test_an_out_with_a_checkpoint_needs_resume_or_overwrite(files, tmp_path, capsys):
    out = tmp_path / "o"
    assert run_cli(_train_args(files, out), capsys)[0] == 0
    state = (out / "last" / "state.json").read_text()
    rc, _, err = run_cli(_train_args(files, out), capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "already holds a checkpoint" in err and "--resume" in err and "--overwrite" in err
    assert (out / "last" / "state.json").read_text() == state  # untouched
    rc, _, err = run_cli(_train_args(files, out, "--resume", "--overwrite"), capsys)
    assert rc == 2 and "not both" in err
    # --overwrite starts again: a fresh metrics.jsonl, not the old run's lines plus the new
    rc, _, err = run_cli(_train_args(files, out, "--overwrite", "--steps", "1"), capsys)
    assert rc == 0, err
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1] and json.loads((out / "last" / "state.json").read_text())["step"] == 1


@pytest.mark.parametrize("device, needle", [("nope", "device 'nope' is unknown"),
                                            ("cuda:99", "cuda:99")])
def test_bad_device_is_exit_2_before_loading(device, needle, files, tmp_path, capsys):
    rc, _, err = run_cli(_train_args(files, tmp_path / "o", "--device", device), capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "o").exists()
    rc, _, err = run_cli(["eval", "--adapter", tmp_path / "none", "--data", files / "train.jsonl",
                          "--device", device], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and needle in err, err


@pytest.mark.parametrize("toml, needle", [
    ("[train]\nsteps = 2.5\n", "[train] steps must be an integer, got 2.5"),
    ("[train]\nshuffle = \"false\"\n", "[train] shuffle must be true or false, got 'false'"),
    ("[train]\nlr = \"abc\"\n", "[train] lr must be a number, got 'abc'"),
    ("[train]\nbatch_size = true\n", "[train] batch_size must be an integer, got True"),
    ("[method]\nr = 2.0\n", "[method] r must be an integer, got 2.0"),
    ("[method]\ntargets = \"q_proj\"\n", "[method] targets must be a list of strings"),
    ("[data]\nmax_len = \"64\"\n", "[data] max_len must be an integer"),
    ("steps = 3\n", "key 'steps' is outside any table"),
])
def test_toml_values_are_type_checked(toml, needle, files, tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text(toml)
    rc, _, err = run_cli(_train_args(files, tmp_path / "o", "--config", cfg), capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert str(cfg) in err and needle in err, err


def test_toml_accepts_an_int_for_a_float(files, tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[train]\nlr = 1\nwarmup = 0\n")
    from minift.training.settings import read_toml
    assert read_toml(cfg)["train"] == {"lr": 1, "warmup": 0}


def test_probe_recipe_points_to_minift_probe(files, tmp_path, capsys):
    rc, _, err = run_cli(["train", "--recipe", "sentiment-probe", "--model", files / "bert", "--train",
                          files / "train.jsonl", "--out", tmp_path / "o"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "minift probe" in err, err


def test_recommend_names_the_file_and_the_missing_key(files, tmp_path):
    import shutil
    from minift.studies.advisor import config_from_dir
    d = tmp_path / "m"
    shutil.copytree(files / "bert", d)
    raw = json.loads((d / "config.json").read_text())
    key = next(k for k in ("num_hidden_layers", "hidden_size") if k in raw)
    (d / "config.json").write_text(json.dumps({k: v for k, v in raw.items() if k != key}))
    with pytest.raises(ValueError, match=f"{d}/config.json has no '{key}' key"):
        config_from_dir(d)


@pytest.mark.parametrize("minutes", ["-1", "0", "nan"])
def test_pretrain_minutes_must_be_positive(minutes, tmp_path, capsys):
    from minift.studies.codegen import PretrainConfig
    rc, _, err = run_cli(["pretrain", "--out", tmp_path / "p", "--minutes", minutes, "--device", "cpu"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "--minutes must be > 0" in err, err
    with pytest.raises(ValueError, match="minutes must be > 0"):
        PretrainConfig(minutes=float(minutes))
