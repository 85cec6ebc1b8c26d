"""benchmarks/trace_train.py: `minift train` under torch.profiler for the steps asked, with every
garbage collection recorded, and the loop left as it was."""
import gzip
import json
import sys

import pytest

from conftest import benchmark_script, tiny_lm_dir
from minift.training import loop



def _run(monkeypatch, argv):
    mod = benchmark_script("trace_train")
    monkeypatch.setattr(sys, "argv", ["trace_train.py", *argv])
    mod.main()


def test_traces_the_steps_asked_and_restores_the_loop(tmp_path, monkeypatch):
    d = tiny_lm_dir(tmp_path)
    update = loop._Run.update
    train = ["--model", str(d / "gpt"), "--train", str(d / "lm.txt"), "--task", "causal-lm", "--method", "lora",
             "--steps", "8", "--batch-size", "2", "--max-len", "16", "--no-progress", "--out", str(tmp_path / "run")]
    _run(monkeypatch, ["--out", str(tmp_path / "t"), "--from-step", "4", "--steps", "3", "--", *train])
    assert loop._Run.update is update
    md = (tmp_path / "t" / "trace.md").read_text()
    assert "optimizer steps 4-6 profiled" in md
    step_row = next(line for line in md.splitlines() if "ProfilerStep*" in line)
    assert step_row.split()[-1] == "3"  # three profiled steps, no more
    assert "| 0 |" in md and "| 2 |" in md and "during steps 4-8" in md  # the collections table, by generation
    assert isinstance(json.loads((tmp_path / "t" / "gc.json").read_text()), list)
    assert json.loads(gzip.open(tmp_path / "t" / "trace.json.gz").read())["traceEvents"]
    with pytest.raises(SystemExit, match="fewer than the 10 to profile"):
        _run(monkeypatch, ["--out", str(tmp_path / "u"), "--from-step", "8", "--steps", "3", "--", *train,
                           "--overwrite"])
    assert loop._Run.update is update
