"""benchmarks/preset_run_dir.py: a random GPT of a bench preset with a tokenizer over its whole
vocabulary and a text of its words, which `minift train` trains on at bench's shape."""
import json
import subprocess
import sys
from pathlib import Path

from tokenizers import Tokenizer

from minift.cli import main

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "preset_run_dir.py"


def test_a_tiny_preset_trains_at_the_bench_shape(tmp_path, capsys):
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--preset", "tiny-gpt", "--tokens", "600"],
                   check=True, capture_output=True)
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    tok = Tokenizer.from_file(str(tmp_path / "model" / "tokenizer.json"))
    assert config["vocab_size"] == tok.get_vocab_size() == 256  # every id of the preset is a word
    assert tok.encode("w0 w254 <|endoftext|>").ids == [0, 254, 255]
    words = (tmp_path / "train.txt").read_text().split()
    assert len(words) == 600 and set(words) <= {f"w{i}" for i in range(255)}
    assert main(["train", "--model", str(tmp_path / "model"), "--train", str(tmp_path / "train.txt"), "--task",
                 "causal-lm", "--method", "lora", "--max-len", "64", "--batch-size", "2", "--steps", "2",
                 "--device", "cpu", "--no-progress", "--out", str(tmp_path / "run")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 2


def test_a_preset_that_is_not_a_gpt_is_refused(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--preset", "tiny-bert"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--preset 'tiny-bert' is not a GPT preset; choose from" in r.stderr
