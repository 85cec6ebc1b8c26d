"""A compiled step's AOTAutograd cache entry is written by one process and loaded by the next
(``speed.compile_context`` lets that cache take minift's custom autograd Functions), and the loaded
graph trains exactly as the freshly compiled one; a changed LoRA scale is a different graph."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# For each LoRA scale given: a LoRA GPT with minift.fast (the merged forward's and the fused loss's
# autograd Functions in the graph), compiled, trained two steps; prints the losses and AOTAutograd's
# cache counters of that run (torch.compile's in-memory state reset between runs).
RUN = r"""
import json, sys
import torch
import torch._dynamo
import torch._dynamo.utils as dynamo_utils
from minift import fast
from minift.methods.registry import build_method
from minift.models.gpt import GPT, GPTConfig
from minift.training.config import TrainConfig
from minift.training.loop import train

for alpha in sys.argv[1:]:
    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32, dropout=0.0))
    build_method(model, "lora", {"r": 2, "alpha": float(alpha), "targets": ["q_proj", "v_proj"]})
    fast.enable(model, merged_lora=True)
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x}
            for x in (torch.randint(0, 97, (2, 12), generator=g) for _ in range(2))]
    res = train(model, data, TrainConfig(steps=2, batch_size=2, lr=1e-2, device="cpu", progress=False,
                                         plot=False, compile=True))
    print(json.dumps({"losses": res.losses, "aot": dict(dynamo_utils.counters["aot_autograd"])}))
"""

# settings of the environment that would turn a cache off (or the custom-Function setting either way)
CACHE_SWITCHES = ("TORCHINDUCTOR_AUTOGRAD_CACHE_ALLOW_CUSTOM_AUTOGRAD", "TORCHINDUCTOR_FORCE_DISABLE_CACHES",
                  "TORCHINDUCTOR_FX_GRAPH_CACHE", "TORCHINDUCTOR_AUTOGRAD_CACHE")


def _run(cache, *alphas):
    env = {k: v for k, v in os.environ.items() if k not in CACHE_SWITCHES}
    env["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    r = subprocess.run([sys.executable, "-c", RUN, *map(str, alphas)], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(line) for line in r.stdout.strip().splitlines()[-len(alphas):]]


def test_a_later_process_loads_the_compiled_step_and_trains_the_same(tmp_path):
    import torch._functorch.config as functorch_config
    if not hasattr(functorch_config, "autograd_cache_allow_custom_autograd_functions"):
        pytest.skip("this torch has no AOTAutograd cache for custom autograd Functions")
    [first] = _run(tmp_path, 4.0)
    assert first["aot"].get("autograd_cache_saved", 0) >= 1 and "autograd_cache_bypass" not in first["aot"]
    again, other = _run(tmp_path, 4.0, 8.0)  # the same graph, then another LoRA scale
    assert again["aot"].get("autograd_cache_hit", 0) >= 1 and "autograd_cache_miss" not in again["aot"]
    assert again["losses"] == first["losses"]  # bit for bit
    assert other["aot"].get("autograd_cache_miss", 0) >= 1  # not the cached graph
    assert other["losses"][0] == first["losses"][0] and other["losses"][1] != first["losses"][1]
