"""benchmarks/train_vs_bench.py: each round's train / bench ratio from a real `minift train`
summary line and a `minift bench` JSON, and the rounds' median, lowest and highest."""
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "train_vs_bench.py"


def _write(d: Path, method: str, r: int, train_ms: float | None, bench_each: list[float]):
    log = "minift train: ... ; speed: eager\n" + (json.dumps({"steps": 300, "steady_step_ms": train_ms,
                                                                "steady_tokens_per_s": 1.0}) if train_ms else "")
    (d / f"train-{method}-r{r}.log").write_text(log + "\n")
    (d / f"bench-{method}-r{r}.json").write_text(json.dumps({"rows": [{"extra": {"step_ms_each": bench_each}}]}))


def test_rounds_and_their_spread(tmp_path):
    for r, t in enumerate((4.4, 4.0, 5.0), start=1):
        _write(tmp_path, "full", r, t, [3.9, 4.1])
    _write(tmp_path, "lora", 1, None, [3.0])  # a failed run: no summary line
    _write(tmp_path, "lora", 2, 3.0, [])
    (tmp_path / "bench-lora-r2.json").write_text(json.dumps({"rows": []}))  # bench cut before its row
    (tmp_path / "train-full-r1.json").write_text("{}")  # not a pair's file: ignored
    out = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True, check=True).stdout
    assert "| full | 1 | 4.40 | 4.00 | 1.100x |" in out and "| full | 3 | 5.00 | 4.00 | 1.250x |" in out
    assert "| full | 3 | 1.100x | 1.000x | 1.250x |" in out  # median, lowest, highest
    assert "| lora | 2 | 3.00 | missing | - |" in out
    assert "| lora | 1 | missing | 3.00 | - |" in out and "| lora |" not in out.split("\n\n")[1]


def test_a_folder_without_pairs_is_refused(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and f"no train-M-rR.log or bench-M-rR.json in {tmp_path}" in r.stderr
