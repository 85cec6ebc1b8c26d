"""benchmarks/loop_ablation.py: each variant is `minift train` in its own process with one change
to the loop, and the table compares their steady steps."""
import json
import subprocess
import sys
from pathlib import Path

import torch

from conftest import benchmark_script, tiny_lm_dir
from minift.training import loop

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "loop_ablation.py"


def _module():
    return benchmark_script("loop_ablation")


def test_every_variant_runs_and_changes_what_it_says(tmp_path, monkeypatch):
    d = tiny_lm_dir(tmp_path)
    train = ["--model", str(d / "gpt"), "--train", str(d / "lm.txt"), "--task", "causal-lm", "--method", "lora",
             "--steps", "6", "--batch-size", "2", "--max-len", "16", "--no-progress", "--device", "cpu"]
    r = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "a"), "--", *train],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "a" / "ablation.md").read_text()
    results = {v: json.loads((tmp_path / "a" / f"{v}.json").read_text()) for v in _module().VARIANTS}
    assert all(res["steps"] == 6 and res["steady_step_ms"] > 0 for res in results.values()), results
    assert all(f"| {v} |" in md for v in results)
    # the same data, seed and order: clipping and the parameter groups change the numbers, the rest do not
    assert results["no-rng"]["final_loss"] == results["no-readback"]["final_loss"] == results["baseline"]["final_loss"]
    mod = _module()  # the patches themselves, in this process (undone by monkeypatch)
    from minift.fast import adamw as fast_adamw
    for name, obj in (("make_optimizer", loop), ("rng_state", loop), ("chosen", fast_adamw)):
        monkeypatch.setattr(obj, name, getattr(obj, name))
    mod.patch("no-clip", [])
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 10.0)
    opt = torch.optim.AdamW([p], lr=0.1)
    fast_adamw.chosen(opt, True)(1.0)
    assert torch.equal(p.grad, torch.full((3,), 10.0)) and opt.state[p]["step"] == 1  # stepped, unclipped
    mod.patch("one-group", [])
    m = torch.nn.Linear(2, 2)
    assert len(loop.make_optimizer(m, loop.TrainConfig(lr=1e-3, steps=1)).param_groups) == 1
    mod.patch("no-rng", [])
    assert loop.rng_state() is loop.rng_state()
    assert mod.patch("no-readback", ["--x"])[-2:] == ["--log-every", "1000000000"]
