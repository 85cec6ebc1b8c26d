#!/usr/bin/env bash
# torch.compile runs (slow to build, so a separate call): minift and PEFT, GPT-2 medium, B=8, T=1024.
set -u
out=${1:-benchmarks/results}
mkdir -p "$out"
python3 -m minift bench --out "$out" --model gpt2-medium --methods full,lora --compile \
  --name bench-gpt2-medium-compile > /dev/null || echo "FAILED: compile" >&2
python3 benchmarks/peft_baseline.py --model gpt2-medium --methods full,lora --compile --out "$out" \
  --name peft-gpt2-medium-compile > /dev/null || echo "FAILED: peft compile" >&2
