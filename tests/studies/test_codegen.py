"""The code generation case: corpus split, tokenizer, pretrained directory, smoke case, CLI errors."""
import json
import shutil
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from minift.studies import codegen
from minift.studies import codegen_case
from minift.cli import build_parser, main
from minift.training.data import load_tokenizer
from minift.models.gpt import GPT
from minift.models.llama import Llama

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SMALL_MODULES = ("bisect", "heapq", "colorsys", "keyword", "textwrap", "fnmatch", "glob", "shlex", "copy",
                 "abc", "stat", "queue", "sched", "graphlib")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A small real corpus: the stdlib's json package and 14 small modules."""
    root = tmp_path_factory.mktemp("corpus")
    shutil.copytree(STDLIB / "json", root / "json", ignore=shutil.ignore_patterns("__pycache__"))
    for m in SMALL_MODULES:
        shutil.copy(STDLIB / f"{m}.py", root / f"{m}.py")
    return root


@pytest.fixture(scope="module")
def smoke(corpus, tmp_path_factory) -> Path:
    """The whole smoke case through the CLI: it pretrains into OUT/pretrained, then adapts."""
    out = tmp_path_factory.mktemp("case")
    rc = main(["codegen-case", "--smoke", "--corpus", str(corpus), "--held-out", "json", "--out", str(out),
               "--device", "cpu", "--no-progress"])
    assert rc == 0
    return out


def _write(path: Path, text: str = "x = 1\n") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_corpus_groups_by_top_level_package_and_skips(tmp_path):
    for rel in ("pkg/__init__.py", "pkg/sub/mod.py", "single.py", "pkg/tests/t.py", "test/x.py", "tests.py",
                "site-packages/y/z.py", "idlelib/a.py", "lib2to3/b.py", "pkg/__pycache__/c.py", "notes.txt"):
        _write(tmp_path / rel)
    (tmp_path / "latin.py").write_bytes("s = 'caf\xe9'\n".encode("latin-1"))  # not UTF-8
    groups = codegen.stdlib_corpus(tmp_path)
    assert {k: [p.relative_to(tmp_path).as_posix() for p in v] for k, v in groups.items()} == {
        "pkg": ["pkg/__init__.py", "pkg/sub/mod.py"], "single": ["single.py"]}


def test_split_never_leaks_held_out_files():
    groups = codegen.stdlib_corpus()
    assert "json" in groups and "test" not in groups and "idlelib" not in groups
    s = codegen.split_corpus(groups, ("json",), seed=3)
    held = set(groups["json"])
    assert held.isdisjoint(s.pretrain) and "json" not in s.pretrain_groups
    assert set(s.adapt_train) | set(s.adapt_eval) == held and not set(s.adapt_train) & set(s.adapt_eval)
    assert s.adapt_train and s.adapt_eval
    assert len(s.pretrain) == sum(len(v) for k, v in groups.items() if k != "json")
    assert codegen.split_corpus(groups, ("json",), seed=3) == s  # seeded
    assert all(p.relative_to(STDLIB).parts[0] != "json" for p in s.pretrain)


def test_split_errors(tmp_path):
    _write(tmp_path / "a.py")
    _write(tmp_path / "b/__init__.py")
    groups = codegen.stdlib_corpus(tmp_path)
    with pytest.raises(ValueError, match="'nosuch' is not in the corpus"):
        codegen.split_corpus(groups, ("nosuch",))
    with pytest.raises(ValueError, match="need 2 or more"):
        codegen.split_corpus(groups, ("a",))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        codegen.stdlib_corpus(tmp_path / "missing")


def test_tokenizer_round_trips_and_ends_with_eot(corpus, tmp_path):
    files = sorted(corpus.rglob("*.py"))
    tok = codegen.train_tokenizer(files, 400, tmp_path)
    assert tok.get_vocab_size() == 400 and tok.token_to_id(codegen.EOT) == 399
    tok = load_tokenizer(tmp_path)
    text = (corpus / "json" / "decoder.py").read_text() + "\n\tdef f(x):  # caf\u00e9 \u2192 \u03bb\n        return x\n"
    enc = tok.encode(text, add_special_tokens=False)
    assert tok.decode(enc.ids) == text
    cuts = codegen.line_cuts(text, enc.offsets)
    assert len(cuts) > 100
    for s, k, line in cuts:  # each next-line context is a token prefix that decodes to the text before the line
        start = enc.offsets[k][0]
        assert tok.decode(enc.ids[:k]) == text[:start] and text[start:s].endswith("\n")
        assert text[s:].startswith(line) and line.strip()
    assert any(line.endswith("\u03bb") for _, _, line in cuts)


def test_pretrained_dir_loads_in_minift_and_transformers(smoke):
    d = smoke / "pretrained"
    assert {"config.json", "model.safetensors", "tokenizer.json", "corpus.json"} <= {p.name for p in d.iterdir()}
    rec = json.loads((d / "corpus.json").read_text())
    assert rec["held_out"] == ["json"] and "json" not in rec["pretrain_packages"]
    model = GPT.from_pretrained(d).eval()
    assert model.config.vocab_size == load_tokenizer(d).get_vocab_size()
    ids = torch.tensor([load_tokenizer(d).encode("def f(x):\n    return x + 1\n").ids])
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2LMHeadModel.from_pretrained(d).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, atol=1e-5, rtol=1e-5)


def test_smoke_case_table_has_every_method_and_the_rank_pattern(smoke):
    res = json.loads((smoke / "codegen-smoke.json").read_text())
    assert [r["method"] for r in res["rows"]] == ["pretrained", "adalora", "lora", "full"]
    for r in res["rows"]:
        assert 0 <= r["exact_match"] <= 1 and 0 <= r["rouge_l"] <= 1 and r["perplexity"] > 1
    rows = {r["method"]: r for r in res["rows"]}
    assert rows["full"]["trainable"] == rows["full"]["params"] > rows["lora"]["trainable"] > 0
    assert rows["adalora"]["steps"] == 30 and "scaled" in res["meta"]["adalora"]
    ranks = res["rank_pattern"]
    assert len(ranks) == 2 * len(codegen_case.TARGETS)  # 2 layers x 6 targets
    assert sum(map(sum, ranks.values())) == 8 * len(ranks)  # the final budget: target_r 8 on average
    md = (smoke / "codegen-smoke.md").read_text()
    assert "device: cpu" in md and "| adalora |" in md and "| layer | q_proj" in md


def test_case_on_a_pretrained_dir_adapts_to_what_it_held_out(smoke, capsys):
    out = smoke / "lora-only"
    assert main(["codegen-case", "--smoke", "--pretrained", str(smoke / "pretrained"), "--methods", "lora",
                 "--steps", "3", "--out", str(out), "--name", "t", "--no-progress"]) == 0
    res = json.loads((out / "t.json").read_text())
    assert [r["method"] for r in res["rows"]] == ["pretrained", "lora"] and res["meta"]["held_out"] == "json"
    assert res["rank_pattern"] is None and not (out / "pretrained").exists()


def test_llama_pretrain_and_case_smoke(corpus, tmp_path, capsys):
    """`pretrain --smoke --arch llama`, then the case on that directory: a Llama config.json that
    minift and transformers load alike, and every method adapting Llama's seven projections."""
    d, out = tmp_path / "llama", tmp_path / "case"
    assert main(["pretrain", "--smoke", "--arch", "llama", "--corpus", str(corpus), "--held-out", "json",
                 "--out", str(d), "--device", "cpu", "--no-progress"]) == 0
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["num_key_value_heads"] * 2 == cfg["num_attention_heads"] and cfg["tie_word_embeddings"]
    assert json.loads((d / "corpus.json").read_text())["arch"] == "llama"
    model = Llama.from_pretrained(d).eval()
    ids = torch.tensor([load_tokenizer(d).encode("def f(x):\n    return x + 1\n").ids])
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM.from_pretrained(d).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, atol=1e-5, rtol=1e-5)
    assert main(["codegen-case", "--smoke", "--pretrained", str(d), "--out", str(out), "--device", "cpu",
                 "--no-progress"]) == 0
    res = json.loads((out / "codegen-smoke.json").read_text())
    assert [r["method"] for r in res["rows"]] == ["pretrained", "adalora", "lora", "full"]
    assert res["meta"]["targets"] == ", ".join(codegen_case.LLAMA_TARGETS) and "Llama" in res["meta"]["pretrained"]
    rows = {r["method"]: r for r in res["rows"]}
    assert rows["full"]["trainable"] == rows["full"]["params"] > rows["lora"]["trainable"] > 0
    assert len(res["rank_pattern"]) == 2 * len(codegen_case.LLAMA_TARGETS)  # 2 layers x 7 targets
    md = (out / "codegen-smoke.md").read_text()
    assert "| adalora |" in md and "| layer | q_proj | k_proj | v_proj | o_proj | gate_proj |" in md


def test_pretrain_unknown_arch_is_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--arch", "foo"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "invalid choice: 'foo'" in err


def test_studies_write_under_runs_in_the_working_directory_by_default():
    """Without --out, results go to ./runs (which git ignores), never into the package's own files."""
    parse = build_parser().parse_args
    assert parse(["codegen-case", "--smoke"]).out == "runs/codegen-case"
    assert parse(["pretrain", "--smoke"]).out == "runs/pretrain"
    assert parse(["bench"]).out == "runs/bench"


def test_smoke_case_without_out_names_only_the_files_it_wrote(corpus, tmp_path, monkeypatch, capsys):
    """`minift codegen-case --smoke` as the README gives it (no --out), without matplotlib: it writes
    under runs/codegen-case, names its JSON and Markdown and no PNG, and leaves no earlier PNG."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    out = tmp_path / "runs" / "codegen-case"
    out.mkdir(parents=True)
    (out / "codegen-smoke-ranks.png").write_bytes(b"an earlier run's plot")
    assert main(["codegen-case", "--smoke", "--corpus", str(corpus), "--held-out", "json", "--methods", "adalora",
                 "--steps", "3", "--device", "cpu", "--no-progress"]) == 0
    wrote = [line for line in capsys.readouterr().err.splitlines() if line.startswith("wrote ")]
    assert wrote == ["wrote runs/codegen-case/codegen-smoke.json, runs/codegen-case/codegen-smoke.md"]
    assert sorted(p.name for p in out.iterdir()) == ["codegen-smoke.json", "codegen-smoke.md", "pretrained"]
    assert json.loads((out / "codegen-smoke.json").read_text())["rank_pattern"]  # a PNG would have had ranks


def test_case_refuses_a_model_that_saw_the_package(smoke, capsys):
    rc = main(["codegen-case", "--smoke", "--pretrained", str(smoke / "pretrained"), "--held-out", "heapq",
               "--out", str(smoke / "again")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "was pretrained on heapq" in err


@pytest.mark.parametrize("argv, message", [
    (["pretrain", "--corpus", "/nonexistent/corpus", "--out", "OUT"], "no such directory"),
    (["pretrain", "--corpus", "CORPUS", "--held-out", "nosuch", "--out", "OUT", "--smoke"],
     "'nosuch' is not in the corpus"),
    (["codegen-case", "--corpus", "/nonexistent/corpus", "--out", "OUT", "--smoke"], "no such directory"),
    (["codegen-case", "--pretrained", "/nonexistent/model", "--out", "OUT"], "no such directory"),
])
def test_cli_bad_input_is_one_line_exit_2(argv, message, corpus, tmp_path, capsys):
    argv = [str(corpus) if a == "CORPUS" else str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err
