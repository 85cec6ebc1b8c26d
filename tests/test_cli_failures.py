"""Bad input to `minift`, class by class, and damaged runs resumed.

Every row builds one bad input in a copy of a good model / run directory (tiny models, temp
dirs), runs the CLI in-process and checks what a user sees: exit code 2 (130 for Ctrl-C),
exactly one line on stderr that names the offending file (or flag), no traceback, and that an
earlier checkpoint in --out is byte for byte what it was. ``test_each_written_file_damaged_then_resume``
truncates and corrupts every file `minift train` writes, then resumes.
"""
import importlib
import importlib.util
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import (WORDS, empty, garbage, hf_bert, hf_gpt2, json_list, not_json, not_utf8, text_file,
                      tokenizer_json, truncate)
from minift.cli import main

POS, NEG = ["good", "great", "fun"], ["bad", "awful", "dull"]
LORA = ("--method", "lora", "--targets", "q_proj,v_proj")


# ---------------------------------------------------------------------------- fixtures and helpers



def _jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny HF BERT and GPT-2 (with tokenizer.json), classification data, and one completed
    2-step LoRA run in ``run`` (never modified: every test damages a copy)."""
    d = tmp_path_factory.mktemp("failures")
    e = SimpleNamespace(bert=d / "bert", gpt=d / "gpt", train=d / "train.jsonl", train2=d / "train2.jsonl",
                        dev=d / "dev.jsonl", lm=d / "lm.txt", run=d / "run")
    e.bert.mkdir(), e.gpt.mkdir()
    hf_bert(e.bert)
    tokenizer_json(e.bert, ["[PAD]", "[UNK]", "[CLS]", "[SEP]"], bert=True)
    hf_gpt2(e.gpt)
    tokenizer_json(e.gpt, ["<|endoftext|>"], bert=False)
    rows = [{"text": f"the movie was {w} and {v}", "label": "pos" if w in POS else "neg"}
            for w in POS + NEG for v in ("very", "not")]
    e.train.write_text(_jsonl(rows + rows[:4]))  # 16 lines
    e.train2.write_text(_jsonl([{"text": f"a film is {w}", "label": "pos" if w in POS else "neg"}
                                for w in POS + NEG] * 2))
    e.dev.write_text(_jsonl(rows[:4]))
    e.lm.write_text(" ".join(WORDS * 6))
    rc = main([str(a) for a in train_argv(e, e.run)])
    assert rc == 0, "the good run failed"
    return e


def train_argv(e, out, *extra, model=None, train=None, method=LORA, steps=2):
    """`minift train` on the BERT classification task, as the completed run ``e.run`` was made."""
    return ["train", "--model", model or e.bert, "--train", train or e.train, "--dev", e.dev, *method,
            "--steps", steps, "--batch-size", 4, "--out", out, "--no-progress", "--device", "cpu", *extra]


def gpt_argv(e, out, *extra, model=None, steps=1):
    return ["train", "--model", model or e.gpt, "--train", e.lm, "--task", "causal-lm", *LORA, "--max-len", 16,
            "--steps", steps, "--batch-size", 4, "--out", out, "--no-progress", "--device", "cpu", *extra]


def eval_argv(e, adapter, *extra):
    return ["eval", "--adapter", adapter, "--data", e.dev, "--device", "cpu", *extra]


@pytest.fixture
def cli(capsys):
    """run(argv) -> (exit code, non-empty stderr lines, stdout); argparse's SystemExit included."""
    def run(argv):
        capsys.readouterr()
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as ex:  # argparse exits instead of returning
            rc = ex.code if isinstance(ex.code, int) else 0 if ex.code is None else 1
        out, err = capsys.readouterr()
        return rc, [line for line in err.splitlines() if line.strip()], out
    return run


def check_clean(rc, err, fragment, expect_rc=2):
    """Exit ``expect_rc``, one line on stderr, no traceback, and ``fragment`` (a string / path, a
    regex, or a tuple of them: any one) in that line."""
    text = "\n".join(err)
    why = f"exit code {rc}; stderr ({len(err)} lines):\n{text}"
    assert rc == expect_rc, f"expected exit code {expect_rc}, got {why}"
    assert "Traceback" not in text and err, why
    frags = fragment if isinstance(fragment, tuple) else (fragment,)
    found = any(f.search(err[-1]) if isinstance(f, re.Pattern) else str(f) in err[-1] for f in frags)
    assert found, f"none of {[getattr(f, 'pattern', str(f)) for f in frags]} in the error line: {err[-1]}"
    assert len(err) == 1, f"the error is right, but expected exactly one line on stderr, got {why}"


def snapshot(d: Path) -> dict[str, bytes]:
    """The bytes of every file under ``d`` by relative path ({} when ``d`` does not exist)."""
    d = Path(d)
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()} if d.is_dir() else {}


def copy_run(e, dst: Path) -> Path:
    shutil.copytree(e.run, dst)
    return dst


# damage: each takes a path and leaves a broken file there


def edit_json(**changes):
    """A damage that rewrites a JSON object: a value of ``...`` deletes the key."""
    def damage(p: Path) -> None:
        doc = json.loads(p.read_text())
        for k, v in changes.items():
            if v is ...:
                del doc[k]
            else:
                doc[k] = v
        p.write_text(json.dumps(doc))
    damage.__name__ = "edit_json(" + ", ".join(f"{k}={'<deleted>' if v is ... else repr(v)}"
                                               for k, v in changes.items()) + ")"
    return damage


def drop_tensor(pattern: str):
    def damage(p: Path) -> None:
        from safetensors.torch import load_file, save_file
        sd = load_file(str(p))
        key = next(k for k in sorted(sd) if pattern in k)
        del sd[key]
        save_file(sd, str(p))
    return damage


def int64_tensor(pattern: str):
    def damage(p: Path) -> None:
        from safetensors.torch import load_file, save_file
        sd = load_file(str(p))
        key = next(k for k in sorted(sd) if pattern in k)
        sd[key] = (sd[key] * 100).to(torch.int64)
        save_file(sd, str(p))
    return damage


# ---------------------------------------------------------------------------- the model directory

WIDTH = {"bert": "hidden_size", "gpt": "n_embd"}  # the config key of the hidden width, per model
MODEL_DAMAGE = [
    ("weights-random-bytes", "model.safetensors", garbage),
    ("weights-truncated", "model.safetensors", truncate),
    ("weights-empty", "model.safetensors", empty),
    ("weights-text-file", "model.safetensors", text_file),
    ("config-not-json", "config.json", not_json),
    ("config-json-list", "config.json", json_list),
    ("config-not-utf8", "config.json", not_utf8),
    ("config-missing-width", "config.json", "missing"),
    ("config-width-string", "config.json", "big"),
]
MODES = ["train", "resume", "eval", "gpt-train"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name, file, damage", MODEL_DAMAGE, ids=[r[0] for r in MODEL_DAMAGE])
def test_bad_model_dir(name, file, damage, mode, env, cli, tmp_path):
    kind = "gpt" if mode == "gpt-train" else "bert"
    model = tmp_path / "model"
    shutil.copytree(env.gpt if kind == "gpt" else env.bert, model)
    out = tmp_path / "out"
    if mode == "resume":  # a good checkpoint of this model first; then the model is damaged
        rc, err, _ = cli(train_argv(env, out, model=model, steps=1))
        assert rc == 0, err
    if damage == "missing":
        damage = edit_json(**{WIDTH[kind]: ...})
    elif damage == "big":
        damage = edit_json(**{WIDTH[kind]: "big"})
    damage(model / file)
    before = snapshot(out / "last")
    if mode == "eval":
        rc, err, _ = cli(eval_argv(env, env.run / "adapter", "--model", model))
    elif mode == "gpt-train":
        rc, err, _ = cli(gpt_argv(env, out, model=model))
    else:
        rc, err, _ = cli(train_argv(env, out, *(["--resume"] if mode == "resume" else []), model=model,
                                    steps=2 if mode == "resume" else 1))
    check_clean(rc, err, model / file)
    assert snapshot(out / "last") == before  # nothing trained; an earlier checkpoint untouched


# ---------------------------------------------------------------------------- the adapter directory

ADAPTER_DAMAGE = [
    ("weights-random-bytes", "model.safetensors", garbage),
    ("weights-truncated", "model.safetensors", truncate),
    ("weights-empty", "model.safetensors", empty),
    ("weights-lora-B-missing", "model.safetensors", drop_tensor("lora_B")),
    ("weights-int64-tensor", "model.safetensors", int64_tensor("lora_A")),
    ("run-json-not-json", "run.json", not_json),
    ("run-json-list", "run.json", json_list),
    ("run-json-not-utf8", "run.json", not_utf8),
    ("run-json-no-method", "run.json", edit_json(method=...)),
    ("run-json-max-len-string", "run.json", edit_json(max_len="64")),
    ("run-json-options-list", "run.json", edit_json(options=[])),
]


@pytest.mark.parametrize("name, file, damage", ADAPTER_DAMAGE, ids=[r[0] for r in ADAPTER_DAMAGE])
def test_bad_adapter_dir(name, file, damage, env, cli, tmp_path):
    run = copy_run(env, tmp_path / "run")
    damage(run / "adapter" / file)
    before = snapshot(run)
    rc, err, _ = cli(eval_argv(env, run / "adapter"))
    check_clean(rc, err, run / "adapter" / file)
    assert snapshot(run) == before  # eval writes nothing


# ---------------------------------------------------------------------------- the checkpoint, resumed

RESUME_DAMAGE = [(f"{f}-{d.__name__}", f, d) for f in ("model.safetensors", "optimizer.safetensors",
                                                        "rng.safetensors")
                 for d in (garbage, truncate, empty)]
RESUME_DAMAGE += [(f"{f}-{d.__name__}", f, d) for f in ("state.json", "optimizer.json")
                  for d in (not_json, truncate, empty, json_list, not_utf8)]
RESUME_DAMAGE += [
    ("state.json-no-step", "state.json", edit_json(step=...)),
    ("state.json-step-string", "state.json", edit_json(step="2")),
    ("state.json-losses-number", "state.json", edit_json(losses=0.5)),
    ("state.json-no-rng", "state.json", edit_json(rng=...)),
    ("optimizer.json-no-param-groups", "optimizer.json", edit_json(param_groups=...)),
    ("optimizer.json-param-groups-object", "optimizer.json", edit_json(param_groups={})),
]


@pytest.mark.parametrize("name, file, damage", RESUME_DAMAGE, ids=[r[0] for r in RESUME_DAMAGE])
def test_resume_from_a_damaged_checkpoint(name, file, damage, env, cli, tmp_path):
    run = copy_run(env, tmp_path / "run")
    damage(run / "last" / file)
    before = snapshot(run / "last")
    rc, err, _ = cli(train_argv(env, run, "--resume", steps=3))
    check_clean(rc, err, run / "last" / file)
    assert snapshot(run / "last") == before


# every file a completed `minift train --dev` run writes under --out
WRITTEN = ["metrics.jsonl", "run.json", "last/model.safetensors", "last/optimizer.safetensors",
           "last/optimizer.json", "last/rng.safetensors", "last/state.json", "adapter/model.safetensors",
           "adapter/run.json", "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
           "best/model.safetensors"]
if importlib.util.find_spec("matplotlib") is not None:
    WRITTEN.append("loss.png")


def test_the_written_files_are_all_covered(env):
    """The table below covers every file the run wrote: a new one must be added to WRITTEN."""
    assert sorted(snapshot(env.run)) == sorted(WRITTEN)


@pytest.mark.parametrize("damage", [truncate, garbage], ids=["truncated", "garbage"])
@pytest.mark.parametrize("rel", WRITTEN)
def test_each_written_file_damaged_then_resume(rel, damage, env, cli, tmp_path):
    """Resuming with one file damaged either works (the file is not needed to resume) or is
    refused cleanly, naming the file, with last/ untouched; never a crash. last/* is needed:
    a run that silently started over without it would not be a resume."""
    run = copy_run(env, tmp_path / "run")
    damage(run / rel)
    before = snapshot(run / "last")
    rc, err, _ = cli(train_argv(env, run, "--resume", steps=3))
    if rc == 0 and not rel.startswith("last/"):
        assert json.loads((run / "last" / "state.json").read_text())["step"] == 3
        rc, err, _ = cli(eval_argv(env, run / "adapter"))  # the adapter written at the end loads
        assert rc == 0, err
    else:
        check_clean(rc, err, run / rel)
        assert snapshot(run / "last") == before


def test_metrics_with_a_half_written_last_line_resumes(env, cli, tmp_path):
    run = copy_run(env, tmp_path / "run")
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    broken = lines[-1][:len(lines[-1]) // 2]  # a crash while writing the last line: no newline
    (run / "metrics.jsonl").write_text("".join(lines[:-1]) + broken)
    rc, err, _ = cli(train_argv(env, run, "--resume", steps=3))
    assert rc == 0, err
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert broken not in (run / "metrics.jsonl").read_text().replace(lines[-1], "")


# ---------------------------------------------------------------------------- --config TOML

TOML_CASES = [
    ("not-utf8", b"\xff\xfe[train]\nsteps = 1\n"),
    ("warmup-inf", b"[train]\nwarmup = inf\n"),
    ("lr-nan", b"[train]\nlr = nan\n"),
    ("lr-inf", b"[train]\nlr = inf\n"),
    ("invalid-toml", b"[train\nsteps = 1\n"),
]


@pytest.mark.parametrize("name, content", TOML_CASES, ids=[c[0] for c in TOML_CASES])
def test_bad_config_toml(name, content, env, cli, tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_bytes(content)
    out = tmp_path / "out"
    rc, err, _ = cli(train_argv(env, out, "--config", cfg, steps=1))
    check_clean(rc, err, cfg)
    assert not (out / "last").exists()


# ---------------------------------------------------------------------------- data

def test_deeply_nested_jsonl_line(env, cli, tmp_path):
    data = tmp_path / "deep.jsonl"
    data.write_text(env.train.read_text().splitlines(keepends=True)[0] * 2 + "[" * 100_000 + "\n")
    out = tmp_path / "out"
    rc, err, _ = cli(train_argv(env, out, train=data, steps=1))
    check_clean(rc, err, data)
    assert re.search(r"(:3\b|line 3\b)", err[0]), err[0]
    assert not (out / "last").exists()


# ---------------------------------------------------------------------------- flags

@pytest.mark.parametrize("flags, fragment", [
    (["--lr", "inf"], "lr"), (["--lr", "nan"], "lr"), (["--lr", "-1"], "lr"),
    (["--warmup", "inf"], "warmup"), (["--weight-decay", "nan"], "weight"),
    (["--metric", "foo"], "foo"), (["--metric", "perplexity"], "perplexity"),
    (["--activation-budget", "1.5"], "activation_budget must be in (0, 1]"),
    (["--activation-budget", "0.8"], "activation_budget 0.8 applies to a compiled run"),
], ids=["lr-inf", "lr-nan", "lr-negative", "warmup-inf", "weight-decay-nan", "metric-unknown",
        "metric-of-another-task", "activation-budget-out-of-range", "activation-budget-eager"])
def test_bad_training_flag_fails_before_training(flags, fragment, env, cli, tmp_path):
    out = tmp_path / "out"
    rc, err, _ = cli(train_argv(env, out, *flags))
    check_clean(rc, err, fragment)
    assert not (out / "last").exists()
    logged = (out / "metrics.jsonl").read_text() if (out / "metrics.jsonl").is_file() else ""
    assert '"step"' not in logged  # nothing trained


def test_eval_max_len_0(env, cli):
    rc, err, _ = cli(eval_argv(env, env.run / "adapter", "--max-len", "0"))
    check_clean(rc, err, ("--max-len", "max_len"))


def test_eval_batch_size_0(env, cli):
    rc, err, _ = cli(eval_argv(env, env.run / "adapter", "--batch-size", "0"))
    check_clean(rc, err, ("--batch-size", "batch_size"))


def test_out_is_a_regular_file(env, cli, tmp_path):
    out = tmp_path / "notes.txt"
    out.write_text("my notes\n")
    rc, err, _ = cli(train_argv(env, out, steps=1))
    check_clean(rc, err, out)
    assert out.read_text() == "my notes\n"


@pytest.mark.parametrize("argv, fragment", [
    (["train", "--steps", "abc"], "abc"),
    (["train", "--device"], "--device"),
    (["eval", "--data", "x.jsonl"], "--adapter"),
    (["nosuchcmd"], "nosuchcmd"),
    ([], "command"),
], ids=["train-steps-abc", "train-device-no-value", "eval-no-adapter", "unknown-command", "no-command"])
def test_argparse_errors_are_one_line(argv, fragment, cli):
    rc, err, _ = cli(argv)
    check_clean(rc, err, fragment)
    assert "--help" in err[0], err[0]


def test_out_with_a_users_files_is_refused(env, cli, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes\n")
    (out / "metrics.jsonl").write_text('{"my": "own metrics"}\n')
    before = snapshot(out)
    rc, err, _ = cli(train_argv(env, out, steps=1))
    check_clean(rc, err, out)
    assert snapshot(out) == before


# ---------------------------------------------------------------------------- --resume with other settings

@pytest.mark.parametrize("kw, extra, fragment", [
    (dict(train="train2"), [], ("--train", "train2.jsonl")),
    (dict(method=("--method", "bitfit")), [], ("--method", "bitfit")),
    ({}, ["--r", "4"], re.compile(r"(--r\b|'r'|\br\b|rank)")),
    ({}, ["--targets", "q_proj"], ("--targets", "targets")),
], ids=["other-train-file", "other-method", "other-rank", "other-targets"])
def test_resume_with_other_settings_is_refused(kw, extra, fragment, env, cli, tmp_path):
    run = copy_run(env, tmp_path / "run")
    if kw.get("train"):
        kw = dict(kw, train=env.train2)
    before = snapshot(run / "last"), (run / "run.json").read_bytes()
    rc, err, _ = cli(train_argv(env, run, "--resume", *extra, steps=3, **kw))  # a later flag wins
    check_clean(rc, err, fragment)
    assert (snapshot(run / "last"), (run / "run.json").read_bytes()) == before


def test_resume_with_more_steps_works(env, cli, tmp_path):
    run = copy_run(env, tmp_path / "run")
    rc, err, _ = cli(train_argv(env, run, "--resume", steps=3))
    assert rc == 0, err
    assert json.loads((run / "last" / "state.json").read_text())["step"] == 3
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == [1, 2, 3]


# ---------------------------------------------------------------------------- --targets classifier

@pytest.mark.parametrize("method", [
    ("--method", "lora", "--targets", "classifier"),
    ("--method", "lora", "--targets", "classifier", "--modules-to-save", "classifier"),
    ("--method", "lora", "--targets", "q_proj,classifier", "--modules-to-save", "classifier"),
], ids=["targets-classifier", "targets-and-save-classifier", "targets-q-and-classifier-saved"])
def test_lora_on_the_classifier(method, env, cli, tmp_path):
    """Refused up front (exit 2, one line), or trained and saved so that eval reproduces the
    training's last dev loss; never a crash."""
    out = tmp_path / "out"
    rc, err, stdout = cli(train_argv(env, out, method=method))
    if rc == 2:
        check_clean(rc, err, "classifier")
        assert not (out / "last").exists()
        return
    assert rc == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    rc, err, stdout = cli(eval_argv(env, out / "adapter"))
    assert rc == 0, err
    assert json.loads(stdout)["loss"] == pytest.approx(summary["eval"]["loss"], rel=1e-5)


# ---------------------------------------------------------------------------- Ctrl-C and failures mid-run

@pytest.mark.parametrize("target", ["minift.training.run.load_model", "minift.training.data.load_tokenizer"])
@pytest.mark.parametrize("command", ["train", "resume", "eval"])
def test_ctrl_c_during_start_up(target, command, env, cli, tmp_path, monkeypatch):
    run = copy_run(env, tmp_path / "run")
    before = snapshot(run)

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    module, name = target.rsplit(".", 1)
    monkeypatch.setattr(importlib.import_module(module), name, interrupt)
    argv = {"train": train_argv(env, tmp_path / "fresh"), "resume": train_argv(env, run, "--resume", steps=3),
            "eval": eval_argv(env, run / "adapter")}[command]
    rc, err, _ = cli(argv)
    check_clean(rc, err, "interrupt", expect_rc=130)
    assert snapshot(run) == before
    assert not (tmp_path / "fresh" / "last").exists()


def _resume_after_failure(env, cli, out, steps):
    from minift.training.checkpoint import latest_checkpoint
    ckpt = latest_checkpoint(out)
    assert ckpt is not None and (ckpt / "state.json").is_file(), "no loadable checkpoint after the failure"
    assert json.loads((ckpt / "state.json").read_text())["step"] >= 1
    rc, err, _ = cli(train_argv(env, out, "--resume", "--eval-every", 1, steps=steps))
    assert rc == 0, err
    assert json.loads((out / "last" / "state.json").read_text())["step"] == steps
    assert (out / "adapter" / "model.safetensors").is_file()


def test_failing_evaluation_after_a_step_leaves_a_checkpoint(env, cli, tmp_path, monkeypatch):
    run_module = importlib.import_module("minift.training.run")
    real, calls = run_module.evaluate, []

    def evaluate(*a, **k):
        calls.append(1)
        if len(calls) == 2:  # the evaluation after step 2 of 3
            raise ValueError("evaluation failed (test)")
        return real(*a, **k)

    monkeypatch.setattr(run_module, "evaluate", evaluate)
    out = tmp_path / "out"
    rc, err, _ = cli(train_argv(env, out, "--eval-every", 1, steps=3))
    assert len(calls) == 2 and rc in (1, 2) and "Traceback" not in "\n".join(err), (rc, err)
    monkeypatch.setattr(run_module, "evaluate", real)
    _resume_after_failure(env, cli, out, steps=3)


def test_failing_final_save_leaves_a_checkpoint(env, cli, tmp_path, monkeypatch):
    def fail(*a, **k):
        raise ValueError("cannot save the adapter (test)")

    monkeypatch.setattr(importlib.import_module("minift.adapters"), "save_adapter", fail)
    monkeypatch.setattr(importlib.import_module("minift.training.run"), "save_adapter", fail, raising=False)
    out = tmp_path / "out"
    rc, err, _ = cli(train_argv(env, out, "--eval-every", 1, steps=2))
    assert rc in (1, 2) and "Traceback" not in "\n".join(err), (rc, err)
    monkeypatch.undo()
    _resume_after_failure(env, cli, out, steps=2)


# ---------------------------------------------------------------------------- library: prefix / prompt

@pytest.mark.parametrize("kind", ["prefix", "prompt"])
def test_direct_call_with_prefix_or_prompt_is_never_the_base_model(kind, tiny_gpt):
    """model(ids) on a GPT with a prefix / soft prompt attached either refuses (pointing to
    model_forward) or computes what model_forward computes: never silently the base model."""
    from minift.training.forward import model_forward
    from minift.methods import prefix, prompt
    ids = torch.randint(1, 97, (2, 7), generator=torch.Generator().manual_seed(0))
    T = ids.shape[1]
    with torch.no_grad():
        base = tiny_gpt(ids).logits
    if kind == "prefix":
        prefix.apply(tiny_gpt, prefix.PrefixConfig(4))
        module = tiny_gpt.prefix_encoder
    else:
        prompt.apply(tiny_gpt, prompt.PromptConfig(4))
        module = tiny_gpt.soft_prompt
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.5)  # large enough to change the logits a lot
        # no labels: with targets GPT computes only the loss, not the logits
        ref = model_forward(tiny_gpt, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}).logits
        assert not torch.allclose(ref[:, -T:], base, atol=1e-4)  # the method does change the output
        try:
            direct = tiny_gpt(ids).logits
        except Exception as e:  # noqa: BLE001 - any refusal is fine if it says what to call
            assert "model_forward" in str(e), f"{type(e).__name__}: {e}"
            return
    if direct.shape != ref.shape:  # soft prompt: the virtual positions may be left out
        ref = ref[:, -direct.shape[1]:]
    assert not torch.allclose(direct, base, atol=1e-4), "model(ids) silently ignored the " + kind
    torch.testing.assert_close(direct, ref, rtol=1e-5, atol=1e-5)
