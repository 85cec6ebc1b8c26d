#!/usr/bin/env bash
# One H100 call for issue 9's GPT-2 medium targets, minift and PEFT in the same run:
# minift under torch.compile + CUDA graphs (one process per method), LoRA through the merged
# forward; PEFT eager (full, LoRA, prefix, prompt) and compiled (LoRA). Each command has its own
# time limit so one slow compile cannot take the others with it.
set -u
out=${1:-benchmarks/results}
mkdir -p "$out"
source "$(dirname "$0")/gpu_lib.sh"  # go SECONDS NAME COMMAND...
go 330 graphs python3 -m minift bench --out "$out" --model gpt2-medium --methods lora,full,prefix,prompt \
  --compile --compile-mode reduce-overhead --lora-merged-forward --name bench-gpt2-medium-graphs-h100
go 130 peft-compile python3 benchmarks/peft_baseline.py --out "$out" --model gpt2-medium --methods lora --compile \
  --name peft-gpt2-medium-compile-h100
go 90 peft-eager python3 benchmarks/peft_baseline.py --out "$out" --model gpt2-medium \
  --methods full,prefix,prompt --name peft-gpt2-medium-h100
go 130 peft-graphs python3 benchmarks/peft_baseline.py --out "$out" --model gpt2-medium --methods lora --compile \
  --compile-mode reduce-overhead --no-eager --name peft-gpt2-medium-graphs-h100
