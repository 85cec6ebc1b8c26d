#!/usr/bin/env bash
# A second H100 call for issue 9: prefix tuning on the zero-query flash path under CUDA graphs with
# full fine-tuning and PEFT eager beside it; compiled LoRA without CUDA graphs (a valid peak, and the
# merged forward on/off); every method eager on GPT-2 medium; BERT-base LoRA against full, with PEFT.
set -u
out=${1:-benchmarks/results}
mkdir -p "$out"
source "$(dirname "$0")/gpu_lib.sh"  # go SECONDS NAME COMMAND...
go 170 graphs python3 -m minift bench --out "$out" --model gpt2-medium --methods prefix,full \
  --compile --compile-mode reduce-overhead --name bench-gpt2-medium-graphs-prefix-h100
go 60 peft-eager python3 benchmarks/peft_baseline.py --out "$out" --model gpt2-medium --methods prefix,prompt \
  --name peft-gpt2-medium-prefix-h100
go 170 compile python3 -m minift bench --out "$out" --model gpt2-medium --methods lora --compile \
  --name bench-gpt2-medium-compile-lora-h100
go 100 compile-merged python3 -m minift bench --out "$out" --model gpt2-medium --methods lora --compile \
  --lora-merged-forward --name bench-gpt2-medium-compile-lora-merged-h100
go 70 eager python3 -m minift bench --out "$out" --model gpt2-medium --methods full,lora,adalora,prefix,prompt \
  --name bench-gpt2-medium-h100
go 30 eager-merged python3 -m minift bench --out "$out" --model gpt2-medium --methods lora --lora-merged-forward \
  --name bench-gpt2-medium-merged-h100
go 45 bert python3 -m minift bench --out "$out" --model bert-base --batch 32 --seq-len 128 \
  --lora-targets q_proj,v_proj --methods full,lora,prefix --name bench-bert-base-h100
go 30 bert-merged python3 -m minift bench --out "$out" --model bert-base --batch 32 --seq-len 128 \
  --lora-targets q_proj,v_proj --methods lora --lora-merged-forward --name bench-bert-base-merged-h100
go 45 peft-bert python3 benchmarks/peft_baseline.py --out "$out" --model bert-base --batch 32 --seq-len 128 \
  --methods full,lora,prefix --lora-targets q_proj,v_proj --name peft-bert-base-h100
