"""Check that a `minift pretrain` directory loads in transformers with the same logits as in minift.

    python benchmarks/codegen_roundtrip.py runs/codegen-pretrained OUT/codegen-roundtrip.json

A GPT-2 directory loads as GPT2LMHeadModel, a Llama one (`pretrain --arch llama`) as LlamaForCausalLM.

Runs on CPU in fp32 on a few held-out lines of code; writes the max |logit difference|.
"""
import json
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from minift.training.data import load_tokenizer  # noqa: E402
from minift.models.gpt import GPT  # noqa: E402
from minift.models.llama import Llama  # noqa: E402

d, out = Path(sys.argv[1]), Path(sys.argv[2])
tok = load_tokenizer(d)
text = "import asyncio\n\nasync def main():\n    await asyncio.sleep(1)\n    return [x * 2 for x in range(10)]\n"
llama = json.loads((d / "config.json").read_text())["model_type"] == "llama"
ours = (Llama if llama else GPT).from_pretrained(d).eval()
ids = torch.tensor([tok.encode(text).ids[:ours.config.max_position_embeddings if llama else ours.config.block_size]])
hf = (transformers.LlamaForCausalLM if llama else transformers.GPT2LMHeadModel).from_pretrained(d).eval()
with torch.no_grad():
    a, b = ours(ids).logits, hf(ids).logits
diff = (a - b).abs().max().item()
rec = {"dir": str(d), "model_type": "llama" if llama else "gpt2", "tokens": ids.shape[1], "vocab": a.shape[-1], "max_abs_logit_diff": diff,
       "transformers": transformers.__version__, "torch": torch.__version__, "match_atol_1e-4": diff < 1e-4}
out.write_text(json.dumps(rec, indent=1) + "\n")
print(json.dumps(rec))
sys.exit(0 if diff < 1e-4 else 1)
