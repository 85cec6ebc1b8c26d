#!/usr/bin/env bash
# All GPU benchmark runs of one session, on one card, in one go. Results go under $1
# (default benchmarks/results). Usage on a CUDA machine: bash benchmarks/gpu_bench.sh OUTDIR
set -u
out=${1:-benchmarks/results}
mkdir -p "$out"
b() { echo "== minift bench $*" >&2; python3 -m minift bench --out "$out" "$@" > /dev/null || echo "FAILED: $*" >&2; }
# GPT-2 medium, B=8, T=1024: every method, and PEFT eager side by side
b --model gpt2-medium --name bench-gpt2-medium
python3 benchmarks/peft_baseline.py --model gpt2-medium --out "$out" --name peft-gpt2-medium > /dev/null
# BERT-base classification, B=32, T=128, LoRA on query/value as PEFT's usual setup
b --model bert-base --batch 32 --seq-len 128 --lora-targets q_proj,v_proj --name bench-bert-base
python3 benchmarks/peft_baseline.py --model bert-base --batch 32 --seq-len 128 --lora-targets q_proj,v_proj \
  --methods full,lora,prefix --out "$out" --name peft-bert-base > /dev/null
# GPT-2 small and large: every method (minift only)
b --model gpt2 --name bench-gpt2
b --model gpt2-large --methods full,lora,adalora,prefix,prompt,freeze,bitfit --name bench-gpt2-large
# One flag at a time on GPT-2 medium (full and LoRA)
b --model gpt2-medium --methods full,lora --no-frozen-bf16 --name ablation-fp32-frozen-base
b --model gpt2-medium --methods full,lora --plain-ce --name ablation-plain-ce
b --model gpt2-medium --methods full,lora --checkpointing --name ablation-checkpointing
# The advisor's memory estimate against the measured peak (GPT-2 small and medium, B=8, T=1024)
python3 benchmarks/advisor_check.py --out "$out" > /dev/null || echo "FAILED: advisor_check" >&2
