"""`minift compare` end to end on a tiny random BERT and tiny data, through the CLI's main()."""
import json
import random

import pytest
import torch

from minift.studies import compare
from minift.cli import main
from minift.methods.registry import METHODS, parse_method
from minift.training.recipes import available_recipes, compare_settings, load_recipe, recipe_options
from minift.models.bert import Bert, BertConfig

WORDS = {"positive": ["good", "great", "fine", "lovely", "superb", "fun"],
         "negative": ["bad", "awful", "dull", "boring", "poor", "weak"]}
FILLER = ["the", "movie", "was", "a", "plot", "and", "very", "film"]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _rows(n, seed):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = ("positive", "negative")[i % 2]
        words = rng.sample(FILLER, 3) + [rng.choice(WORDS[label])] + rng.sample(FILLER, 2)
        out.append({"text": " ".join(words), "label": label})
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    d = tmp_path_factory.mktemp("compare")
    model_dir = d / "model"
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {w: i for i, w in enumerate(specials + FILLER + sum(WORDS.values(), []))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    torch.manual_seed(0)
    Bert(BertConfig(vocab_size=len(vocab), max_position_embeddings=64, n_layer=2, n_head=4, n_embd=32,
                    n_inner=64)).save_pretrained(model_dir)
    tok.save(str(model_dir / "tokenizer.json"))
    data = {s: _write(d / f"{s}.jsonl", _rows(n, i)) for i, (s, n) in enumerate([("train", 24), ("dev", 8),
                                                                                 ("test", 8)])}
    return d, str(model_dir), data


def _args(setup, *extra, methods=None, out=None):
    d, model_dir, data = setup
    args = ["compare", "--model", model_dir, "--train", data["train"], "--dev", data["dev"], "--test", data["test"],
            "--steps", "3", "--batch-size", "4", "--max-len", "16", "--device", "cpu", "--out", str(out or d / "out"),
            "--name", "t", "--no-progress", "--in-process"]
    if methods:
        args += ["--methods", methods]
    return args + list(extra)


def _table(text: str) -> list[list[str]]:
    """The printed table's rows split into columns (two or more spaces separate them)."""
    import re
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("method "))
    rows = []
    for ln in lines[start + 2:]:
        if not ln.strip() or ln.startswith(("budget:", "memory:")):
            break
        rows.append(re.split(r"\s{2,}", ln.strip()))
    return rows


def test_every_method_end_to_end(setup, capsys):
    d = setup[0]
    assert main(_args(setup)) == 0
    out = capsys.readouterr().out
    header = next(ln for ln in out.splitlines() if ln.startswith("method "))
    assert [c for c in (h.strip() for h in header.split("  ")) if c] == list(compare.COLUMNS)
    rows = _table(out)
    assert [r[0] for r in rows] == list(METHODS)
    col = {c: i for i, c in enumerate(compare.COLUMNS)}
    for r in rows:
        assert len(r) >= len(compare.COLUMNS) - 1  # the note may be empty
        assert int(r[col["trainable"]].replace(",", "")) > 0
        pct = r[col["% of all"]]
        assert pct.endswith("%") and 0 < float(pct[:-1]) <= 100
        for c in ("dev acc", "dev F1", "test acc", "test F1"):
            assert 0.0 <= float(r[col[c]]) <= 100.0
    full, lora, probe = rows[0], rows[1], rows[-1]
    assert float(full[col["% of all"]][:-1]) == 100.0  # full fine-tuning trains everything
    assert int(lora[col["trainable"]].replace(",", "")) < int(full[col["trainable"]].replace(",", ""))
    assert float(lora[col["lr"]]) == 1e-3 and probe[col["lr"]] == "-"  # the recipe's [compare] lr; no lr to probe
    assert probe[-1].startswith("layer ")  # the best layer by dev accuracy is named
    assert "AdaLoRA init_r=24 -> target_r=16" in out and "matches LoRA r=16" in out

    saved = json.loads((d / "out" / "t.json").read_text())
    assert [r["method"] for r in saved["rows"]] == list(METHODS)
    assert saved["meta"]["steps"] == 3 and saved["meta"]["examples"] == {"train": 24, "dev": 8, "test": 8}
    assert all(r["steps"] == 3 for r in saved["rows"] if r["method"] != "probe")
    assert all(r["peak_mib"] > 0 and r["wall_s"] > 0 for r in saved["rows"])
    md = (d / "out" / "t.md").read_text()
    assert "| method | trainable |" in md and all(f"| {m} |" in md for m in METHODS)
    pytest.importorskip("matplotlib")
    assert (d / "out" / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_worker_process_reports_its_own_row(setup, tmp_path, capsys):
    args = [a for a in _args(setup, methods="bitfit", out=tmp_path) if a != "--in-process"]
    assert main(args) == 0
    rows = _table(capsys.readouterr().out)
    assert [r[0] for r in rows] == ["bitfit"]
    saved = json.loads((tmp_path / "t.json").read_text())
    assert saved["meta"]["memory"].startswith("peak RSS of a fresh worker")


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    return err[0]


def test_unknown_method_is_exit_2(setup, capsys):
    assert main(_args(setup, methods="lora,qlora")) == 2
    line = _one_error_line(capsys)
    assert "unknown method 'qlora'" in line and "full, lora" in line


def test_labels_differing_between_splits_are_exit_2(setup, tmp_path, capsys):
    d, model_dir, data = setup
    only_pos = _write(tmp_path / "dev.jsonl", [r for r in _rows(8, 1) if r["label"] == "positive"])
    assert main(_args(setup, methods="lora") + ["--dev", only_pos]) == 2
    line = _one_error_line(capsys)
    assert "labels differ between splits" in line and "negative" in line

    extra = _write(tmp_path / "test.jsonl", _rows(8, 2) + [{"text": "so so", "label": "neutral"}])
    assert main(_args(setup, methods="lora") + ["--test", extra]) == 2
    line = _one_error_line(capsys)
    assert "'neutral'" in line and "not seen in training" in line


def test_partial_data_and_unknown_recipe_are_errors(setup, capsys):
    d, model_dir, data = setup
    assert main(["compare", "--model", model_dir, "--train", data["train"], "--methods", "lora"]) == 2
    assert "give all three of --train, --dev and --test" in _one_error_line(capsys)
    with pytest.raises(ValueError, match="unknown recipe 'nope'; available: .*sentiment-lora"):
        load_recipe("nope")


def test_recipes_parse_and_lora_recipe_is_the_classic_setup():
    names = available_recipes()
    assert {f"sentiment-{m}" for m in METHODS} <= set(names)
    r = load_recipe("sentiment-lora")
    assert r["method"] == {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.1, "targets": ["q_proj", "v_proj"],
                           "modules_to_save": ["classifier"]}
    assert {k: r["train"][k] for k in ("epochs", "batch_size", "lr", "warmup", "weight_decay")} == \
        {"epochs": 5, "batch_size": 8, "lr": 2e-4, "warmup": 0.1, "weight_decay": 0.01}
    c = parse_method("adalora", recipe_options(load_recipe("sentiment-adalora")), total_steps=200).config
    assert c.total_step == 200 and c.tinit == 20 and c.tfinal == 40 and c.delta_t == 10


def test_compare_settings_lay_the_compare_table_over_the_recipe():
    r = {"method": {"name": "prompt", "num_virtual_tokens": 20, "modules_to_save": ["classifier"]},
         "train": {"lr": 3e-2}, "compare": {"lr": 1e-1, "num_virtual_tokens": 4}}
    assert compare_settings(r) == (1e-1, {"num_virtual_tokens": 4, "modules_to_save": ["classifier"]})
    assert compare_settings({"method": {"name": "lora", "r": 8}, "train": {"lr": 1e-3}}) == (1e-3, {"r": 8})
    r["compare"]["full"] = {"num_virtual_tokens": 20}  # compare --full lays [compare.full] over [compare]
    assert compare_settings(r, full=True) == (1e-1, {"num_virtual_tokens": 20, "modules_to_save": ["classifier"]})
    assert compare_settings(r) == (1e-1, {"num_virtual_tokens": 4, "modules_to_save": ["classifier"]})
    assert compare_settings(load_recipe("sentiment-adalora"), full=True)[0] == 5e-3
    for name in available_recipes():  # what compare trains with parses, for every shipped recipe
        recipe = load_recipe(name)
        for full in (False, True):
            lr, options = compare_settings(recipe, full=full)
            assert (lr is None) if recipe["method"]["name"] == "probe" else lr > 0
            parse_method(recipe["method"]["name"], options, total_steps=100)


def test_full_runs_with_the_compare_full_table(setup, tmp_path, capsys):
    """--full reaches each run: prompt tuning trains 20 virtual tokens there, 4 on the short budget
    (sentiment-prompt.toml's [compare] and [compare.full] tables)."""
    tokens = {}
    for mode, extra in (("short", []), ("full", ["--full", "--seeds", "1"])):
        assert main(_args(setup, *extra, methods="prompt", out=tmp_path / mode)) == 0
        rows = json.loads((tmp_path / mode / "t.json").read_text())["rows"]
        tokens[mode] = rows[0]["extra"]["options"]["num_virtual_tokens"]
    capsys.readouterr()
    assert tokens == {"short": 4, "full": 20}


def _narrow_bert(setup, tmp_path):
    """The setup's model, but 16 wide: AdaLoRA's init_r=24 does not fit."""
    import shutil
    d, model_dir, data = setup
    narrow = tmp_path / "narrow"
    vocab = json.loads((setup[0] / "model" / "tokenizer.json").read_text())["model"]["vocab"]
    torch.manual_seed(0)
    Bert(BertConfig(vocab_size=len(vocab), max_position_embeddings=64, n_layer=1, n_head=2, n_embd=16,
                    n_inner=32)).save_pretrained(narrow)
    shutil.copy(setup[0] / "model" / "tokenizer.json", narrow / "tokenizer.json")
    return str(narrow)


def test_a_non_bert_model_is_one_line_exit_2(setup, tmp_path, capsys):
    import shutil
    gpt = tmp_path / "gpt"
    shutil.copytree(setup[1], gpt)
    cfg = json.loads((gpt / "config.json").read_text())
    (gpt / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    args = [a for a in _args(setup, methods="bitfit", out=tmp_path / "out") if a != "--in-process"]
    args[args.index("--model") + 1] = str(gpt)
    assert main(args) == 2
    line = _one_error_line(capsys)
    assert "gpt2" in line and "BERT" in line
    assert not (tmp_path / "out" / "t.json").exists()


@pytest.mark.parametrize("in_process", [False, True])
def test_a_failing_method_is_exit_2_and_keeps_the_finished_rows(setup, tmp_path, capsys, in_process):
    args = _args(setup, methods="bitfit,adalora", out=tmp_path / "out")
    if not in_process:
        args = [a for a in args if a != "--in-process"]
    args[args.index("--model") + 1] = _narrow_bert(setup, tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [ln for ln in err.splitlines() if ln.startswith("minift compare:")]
    assert len(errors) == 1 and errors[0] == err.strip().splitlines()[-1]
    assert "error: method adalora:" in errors[0] and "finished runs are saved" in errors[0]
    saved = json.loads((tmp_path / "out" / "t.json").read_text())
    assert [r["method"] for r in saved["rows"]] == ["bitfit"]
    assert saved["meta"]["partial"].startswith("1 of 2 runs done")
    assert "| bitfit |" in (tmp_path / "out" / "t.md").read_text()


# ---------------------------------------------------------------------------- seeds, intervals, predictions

def test_seeds_change_the_runs_and_nothing_else(setup, tmp_path, capsys):
    """Two run seeds: the same data (subset and evaluation sets), other initial adapters and data
    order; the first seed's run is the one a single-seed comparison makes, bit for bit."""
    assert main(_args(setup, "--seeds", "2", methods="full,lora", out=tmp_path / "two")) == 0
    out = capsys.readouterr().out
    assert main(_args(setup, methods="full,lora", out=tmp_path / "one")) == 0
    capsys.readouterr()
    two = json.loads((tmp_path / "two" / "t.json").read_text())
    one = json.loads((tmp_path / "one" / "t.json").read_text())
    assert [(r["method"], r["seed"]) for r in two["rows"]] == [("full", 0), ("full", 1), ("lora", 0), ("lora", 1)]
    assert two["meta"]["seeds"] == [0, 1] and two["meta"]["examples"] == one["meta"]["examples"]
    for r1 in one["rows"]:  # seed 0 of the two-seed run == the one-seed run
        r2 = next(r for r in two["rows"] if r["method"] == r1["method"] and r["seed"] == 0)
        assert r2["extra"]["final_loss"] == r1["extra"]["final_loss"]
        assert (r2["dev_acc"], r2["test_acc"]) == (r1["dev_acc"], r1["test_acc"])
    lora = [r for r in two["rows"] if r["method"] == "lora"]
    assert lora[0]["extra"]["final_loss"] != lora[1]["extra"]["final_loss"]  # the seed does change the run
    preds = [json.loads(ln) for ln in (tmp_path / "two" / "t-predictions.jsonl").read_text().splitlines()]
    gold = {(p["split"], p["id"]): p["gold"] for p in preds if p["method"] == "full" and p["seed"] == 0}
    assert all(gold[(p["split"], p["id"])] == p["gold"] for p in preds)  # the same examples for every run
    assert "±" in out and "method - full" in out  # intervals, and the paired differences to full


def test_saved_predictions_reproduce_the_reported_metrics_with_scikit_learn(setup, tmp_path, capsys):
    from sklearn.metrics import accuracy_score, f1_score
    assert main(_args(setup, "--seeds", "2", methods="lora,prompt,probe", out=tmp_path)) == 0
    capsys.readouterr()
    saved = json.loads((tmp_path / "t.json").read_text())
    preds = [json.loads(ln) for ln in (tmp_path / "t-predictions.jsonl").read_text().splitlines()]
    assert {p["gold"] for p in preds} <= {"positive", "negative"}
    for r in saved["rows"]:
        for split in ("dev", "test"):
            ps = sorted((p for p in preds if (p["method"], p["seed"], p["split"]) == (r["method"], r["seed"], split)),
                        key=lambda p: p["id"])
            assert [p["id"] for p in ps] == list(range(8))
            gold, pred = [p["gold"] for p in ps], [p["pred"] for p in ps]
            assert r[f"{split}_acc"] == accuracy_score(gold, pred)
            assert r[f"{split}_f1"] == pytest.approx(f1_score(gold, pred, average="macro", zero_division=0),
                                                     abs=1e-12)


def test_the_summary_is_the_t_interval_of_the_seeds_and_the_paired_differences(setup, tmp_path, capsys):
    from scipy import stats
    assert main(_args(setup, "--seeds", "3", "--reference", "lora", methods="lora,bitfit", out=tmp_path)) == 0
    capsys.readouterr()
    saved = json.loads((tmp_path / "t.json").read_text())
    rows = {(r["method"], r["seed"]): r for r in saved["rows"]}
    for s in saved["summary"]:
        acc = [rows[(s["method"], seed)]["test_acc"] for seed in (0, 1, 2)]
        mean = sum(acc) / 3
        sd = (sum((a - mean) ** 2 for a in acc) / 2) ** 0.5
        assert s["test_acc"]["mean"] == pytest.approx(mean, abs=1e-12)
        assert s["test_acc"]["ci95"] == pytest.approx(stats.t.ppf(0.975, 2) * sd / 3 ** 0.5, abs=1e-9)
    bitfit = next(s for s in saved["summary"] if s["method"] == "bitfit")
    d = [rows[("bitfit", k)]["test_acc"] - rows[("lora", k)]["test_acc"] for k in (0, 1, 2)]
    got = bitfit["diff_to_reference"]["test_acc"]
    assert got["mean"] == pytest.approx(sum(d) / 3, abs=1e-12)
    half = stats.t.ppf(0.975, 2) * stats.tstd(d) / 3 ** 0.5 if len(set(d)) > 1 else 0.0
    assert got["ci95"] == pytest.approx(half, abs=1e-9)
    assert got["significant"] == (abs(got["mean"]) > got["ci95"])
    assert next(s for s in saved["summary"] if s["method"] == "lora")["diff_to_reference"] == {}


def test_bad_seeds_and_reference_are_one_line_errors(setup, tmp_path, capsys):
    assert main(_args(setup, "--seeds", "0", methods="lora", out=tmp_path)) == 2
    assert "seeds must be >= 1, got 0" in capsys.readouterr().err
    assert main(_args(setup, "--reference", "full", methods="lora", out=tmp_path)) == 2
    assert "reference method 'full' is not among the methods run (lora)" in capsys.readouterr().err


def test_runs_at_once_give_the_rows_of_runs_one_at_a_time(setup, tmp_path, capsys):
    """--jobs 2: each run in its own worker process, two at a time; the rows (in the table's order)
    are those of the sequential comparison, only the timing note differs."""
    par = [a for a in _args(setup, "--seeds", "2", "--jobs", "2", methods="lora,bitfit", out=tmp_path / "par")
           if a != "--in-process"]
    assert main(par) == 0
    assert main(_args(setup, "--seeds", "2", methods="lora,bitfit", out=tmp_path / "seq")) == 0
    capsys.readouterr()
    par, seq = (json.loads((tmp_path / d / "t.json").read_text()) for d in ("par", "seq"))
    assert [(r["method"], r["seed"]) for r in par["rows"]] == [(r["method"], r["seed"]) for r in seq["rows"]]
    for a, b in zip(par["rows"], seq["rows"]):
        assert a["extra"]["final_loss"] == pytest.approx(b["extra"]["final_loss"], abs=1e-6)
        assert (a["dev_acc"], a["test_acc"]) == (b["dev_acc"], b["test_acc"])
    assert par["meta"]["jobs"] == 2 and "2 runs sharing the device" in par["meta"]["timing"]
    assert main(_args(setup, "--jobs", "2", methods="lora", out=tmp_path)) == 2  # with --in-process
    assert "drop --in-process" in capsys.readouterr().err


def test_a_failing_run_with_jobs_starts_no_other_run(setup, tmp_path, capsys, monkeypatch):
    """--jobs 2: when a run fails, the queued runs are cancelled (not run and thrown away)."""
    real, started = compare._run_isolated, []

    def counted(cfg, method, seed):
        started.append((method, seed))
        return real(cfg, method, seed)

    monkeypatch.setattr(compare, "_run_isolated", counted)
    args = [a for a in _args(setup, "--seeds", "3", "--jobs", "2", methods="adalora,bitfit", out=tmp_path / "out")
            if a != "--in-process"]
    args[args.index("--model") + 1] = _narrow_bert(setup, tmp_path)
    assert main(args) == 2
    assert "method adalora:" in capsys.readouterr().err
    assert len(started) <= 3 and ("bitfit", 2) not in started, started


def test_together_trains_loras_seeds_at_once_as_separate_runs(setup, tmp_path, capsys, monkeypatch):
    """--together: LoRA's seeds are jobs of one train-many run on one base. Without dropout (here the
    base's and the recipe's are set to 0) each seed's run is its separate run: the same final loss
    and scores; a worker process gives what an in-process run does; the rows share the run's timing."""
    d, _, _ = setup
    nodrop = d / "nodrop"
    if not nodrop.exists():  # the same base with dropout 0
        cfgj = json.loads((d / "model" / "config.json").read_text())
        nodrop.mkdir()
        for f in ("model.safetensors", "tokenizer.json"):
            (nodrop / f).write_bytes((d / "model" / f).read_bytes())
        drop_keys = [k for k in cfgj if "dropout" in k]
        (nodrop / "config.json").write_text(json.dumps({**cfgj, **{k: 0.0 for k in drop_keys}}))
    real = compare.load_recipe

    def no_dropout(name):
        r = real(name)
        return {**r, "method": {**r["method"], "dropout": 0.0}} if name == "sentiment-lora" else r
    monkeypatch.setattr(compare, "load_recipe", no_dropout)
    from minift.studies import compare_many
    monkeypatch.setattr(compare_many, "load_recipe", no_dropout)
    args = lambda out, *extra: [a if a != str(d / "model") else str(nodrop)  # noqa: E731
                                for a in _args(setup, "--seeds", "2", *extra, methods="lora", out=tmp_path / out)]
    assert main(args("apart")) == 0
    assert main(args("together", "--together")) == 0
    capsys.readouterr()
    apart, together = (json.loads((tmp_path / o / "t.json").read_text()) for o in ("apart", "together"))
    assert [(r["method"], r["seed"]) for r in together["rows"]] == [("lora", 0), ("lora", 1)]
    for a, t in zip(apart["rows"], together["rows"]):
        assert t["extra"]["final_loss"] == pytest.approx(a["extra"]["final_loss"], rel=1e-5)
        assert (t["dev_acc"], t["test_acc"], t["trainable"], t["total"]) == \
            (a["dev_acc"], a["test_acc"], a["trainable"], a["total"])
        assert t["extra"]["together"] == [0, 1] and "trained together" in t["note"]
    assert together["rows"][0]["wall_s"] == together["rows"][1]["wall_s"] and together["meta"]["together"]
    assert apart["meta"]["together"] is None
    worker = [a for a in args("worker", "--together") if a != "--in-process"]
    monkeypatch.undo()  # a worker process reads the recipe as it is: compare it with an in-process run of that
    worker = [a if a != str(nodrop) else str(d / "model") for a in worker]
    assert main(worker) == 0
    assert main([a if a != str(nodrop) else str(d / "model") for a in args("inproc", "--together")]) == 0
    capsys.readouterr()
    w, i = (json.loads((tmp_path / o / "t.json").read_text()) for o in ("worker", "inproc"))
    assert [r["extra"]["final_loss"] for r in w["rows"]] == pytest.approx([r["extra"]["final_loss"] for r in i["rows"]],
                                                                          rel=1e-6)
    assert main(_args(setup, "--together", methods="full", out=tmp_path)) == 2
    assert "lora is not among the methods run" in capsys.readouterr().err
    assert main([a for a in _args(setup, "--together", "--jobs", "2", methods="lora", out=tmp_path)
                 if a != "--in-process"]) == 2
    assert "give --jobs 1" in capsys.readouterr().err
