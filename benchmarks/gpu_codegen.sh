#!/usr/bin/env bash
# The code generation case (issue 11) on one CUDA card. Results go under $1 (default
# benchmarks/results): codegen-cuda.{json,md} and codegen-cuda-ranks.png, each naming the device.
#
#   bash benchmarks/gpu_codegen.sh OUT            # both stages (~12 minutes in all)
#   bash benchmarks/gpu_codegen.sh OUT pretrain   # stage 1, ~8 minutes: tokenizer + ~23M GPT, 6.5 min of training
#   bash benchmarks/gpu_codegen.sh OUT all 4.5    # both stages in one 10-minute command, 4.5 min of pretraining
#   bash benchmarks/gpu_codegen.sh OUT case       # stage 2, ~4 minutes: AdaLoRA, LoRA, full on asyncio, 2000 steps each
#
# Under a 10-minute limit per command, run the two stages as two commands on the same machine:
# the pretrained model stays in runs/codegen-pretrained (git-ignored, so it survives between calls).
# It is pretrained on the standard library minus asyncio; the case adapts to asyncio.
set -eu
out=${1:-benchmarks/results}
stage=${2:-all}
minutes=${3:-6.5}   # pretraining minutes (4.5 fits both stages in one 10-minute command)
model=runs/codegen-pretrained
mkdir -p "$out"
if [ "$stage" = all ] || [ "$stage" = pretrain ]; then
  python3 -m minift pretrain --corpus stdlib --held-out asyncio --out "$model" --minutes "$minutes" --device cuda --no-progress
  cp "$model/corpus.json" "$out/codegen-pretrain-corpus.json"  # the split and the pretraining record
  python3 benchmarks/codegen_roundtrip.py "$model" "$out/codegen-roundtrip.json"  # transformers loads it, same logits
fi
if [ "$stage" = all ] || [ "$stage" = case ]; then
  python3 -m minift codegen-case --pretrained "$model" --out "$out" --device cuda --no-progress
fi
