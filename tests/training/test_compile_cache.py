"""A compiled step's AOTAutograd cache entry is written by one process and loaded by the next
(``speed.compile_context`` lets that cache take minift's custom autograd Functions), and the loaded
graph trains exactly as the freshly compiled one; a changed LoRA scale is a different graph."""
import json
import os
import subprocess
import sys

import pytest

# A LoRA GPT with minift.fast (the merged forward's and the fused loss's autograd Functions in the
# graph), compiled, trained two steps; prints the losses and AOTAutograd's cache counters.
RUN = r"""
import json, sys
import torch
import torch._dynamo.utils as dynamo_utils
from minift import fast
from minift.methods.registry import build_method
from minift.models.gpt import GPT, GPTConfig
from minift.training.config import TrainConfig
from minift.training.loop import train

torch.manual_seed(0)
model = GPT(GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32, dropout=0.0))
build_method(model, "lora", {"r": 2, "alpha": float(sys.argv[1]), "targets": ["q_proj", "v_proj"]})
fast.enable(model, merged_lora=True)
g = torch.Generator().manual_seed(1)
data = [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x}
        for x in (torch.randint(0, 97, (2, 12), generator=g) for _ in range(2))]
res = train(model, data, TrainConfig(steps=2, batch_size=2, lr=1e-2, device="cpu", progress=False, plot=False,
                                     compile=True))
print(json.dumps({"losses": res.losses, "aot": dict(dynamo_utils.counters["aot_autograd"])}))
"""


def _run(cache, alpha):
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    env.pop("TORCHINDUCTOR_AUTOGRAD_CACHE_ALLOW_CUSTOM_AUTOGRAD", None)  # the setting comes from minift
    r = subprocess.run([sys.executable, "-c", RUN, str(alpha)], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_a_later_process_loads_the_compiled_step_and_trains_the_same(tmp_path):
    import torch._functorch.config as functorch_config
    if not hasattr(functorch_config, "autograd_cache_allow_custom_autograd_functions"):
        pytest.skip("this torch has no AOTAutograd cache for custom autograd Functions")
    first = _run(tmp_path, 4.0)
    assert first["aot"].get("autograd_cache_saved", 0) >= 1 and "autograd_cache_bypass" not in first["aot"]
    again = _run(tmp_path, 4.0)
    assert again["aot"].get("autograd_cache_hit", 0) >= 1 and "autograd_cache_miss" not in again["aot"]
    assert again["losses"] == first["losses"]  # bit for bit
    other = _run(tmp_path, 8.0)  # another LoRA scale: not the cached graph
    assert other["aot"].get("autograd_cache_miss", 0) >= 1
    assert other["losses"][0] == first["losses"][0] and other["losses"][1] != first["losses"][1]
