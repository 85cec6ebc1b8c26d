#!/usr/bin/env bash
# A third H100 call for issue 9: LoRA (merged forward) and full fine-tuning under CUDA graphs with
# compiled PEFT LoRA beside them; BERT-base full against merged-forward LoRA in one table; the loss
# chunk's effect on eager LoRA; compiled LoRA without CUDA graphs (a peak that counts only the step).
set -u
out=${1:-benchmarks/results}
mkdir -p "$out"
source "$(dirname "$0")/gpu_lib.sh"  # go SECONDS NAME COMMAND...
go 180 graphs python3 -m minift bench --out "$out" --model gpt2-medium --methods lora,full \
  --compile --compile-mode reduce-overhead --lora-merged-forward --name bench-gpt2-medium-graphs-lora-h100
go 110 peft-compile python3 benchmarks/peft_baseline.py --out "$out" --model gpt2-medium --methods lora --compile \
  --no-eager --name peft-gpt2-medium-compile-lora-h100
go 40 bert python3 -m minift bench --out "$out" --model bert-base --batch 32 --seq-len 128 \
  --lora-targets q_proj,v_proj --methods full,lora --lora-merged-forward --name bench-bert-base-merged-h100
go 30 chunk-1024 python3 -m minift bench --out "$out" --model gpt2-medium --methods lora --lora-merged-forward \
  --name bench-gpt2-medium-chunk1024-h100
go 30 chunk-4096 python3 -m minift bench --out "$out" --model gpt2-medium --methods lora --lora-merged-forward \
  --loss-chunk 4096 --name bench-gpt2-medium-chunk4096-h100
go 130 compile-merged python3 -m minift bench --out "$out" --model gpt2-medium --methods lora --compile \
  --lora-merged-forward --name bench-gpt2-medium-compile-lora-merged-h100
