#!/usr/bin/env bash
# A short H100 call: the advisor check, the eager GPT-2 medium rows the targets need with PEFT beside
# them, minift and PEFT compiled LoRA in the same run, and a profile of minift's compiled LoRA step.
set -u
out=${1:-benchmarks/results}
mkdir -p "$out"
python3 benchmarks/advisor_check.py --out "$out" > /dev/null || echo "FAILED: advisor_check" >&2
python3 -m minift bench --out "$out" --model gpt2-medium --methods full,lora,adalora,prefix,prompt \
  --name bench-gpt2-medium-h100 > /dev/null || echo "FAILED: bench" >&2
python3 benchmarks/peft_baseline.py --out "$out" --model gpt2-medium --methods full,lora,prefix,prompt \
  --name peft-gpt2-medium-h100 > /dev/null || echo "FAILED: peft" >&2
python3 -m minift bench --out "$out" --model gpt2-medium --methods full,lora --compile \
  --name bench-gpt2-medium-compile-minift-h100 > /dev/null || echo "FAILED: compile" >&2
python3 benchmarks/peft_baseline.py --out "$out" --model gpt2-medium --methods lora --compile \
  --name peft-gpt2-medium-compile-h100 > /dev/null || echo "FAILED: peft compile" >&2
python3 benchmarks/profile_step.py --model gpt2-medium --method lora --compile > "$out/profile-lora-compiled-gpt2-medium-h100.txt" \
  || echo "FAILED: profile" >&2
