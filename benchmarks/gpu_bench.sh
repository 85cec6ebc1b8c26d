#!/usr/bin/env bash
# All GPU benchmark runs of one session, on one card, in one go, most wanted first (each
# `minift bench` saves after every method, so a run cut off by a time limit keeps what finished).
# Results go under $1 (default benchmarks/results). Usage on a CUDA machine: bash benchmarks/gpu_bench.sh OUTDIR
set -u
out=${1:-benchmarks/results}
mkdir -p "$out"
b() { echo "== minift bench $*" >&2; python3 -m minift bench --out "$out" "$@" > /dev/null || echo "FAILED: $*" >&2; }
p() { echo "== peft $*" >&2; python3 benchmarks/peft_baseline.py --out "$out" "$@" > /dev/null || echo "FAILED: peft $*" >&2; }
# The advisor's memory estimate against the measured peak (GPT-2 small and medium, B=8, T=1024)
python3 benchmarks/advisor_check.py --out "$out" > /dev/null || echo "FAILED: advisor_check" >&2
# GPT-2 medium, B=8, T=1024: every method, and PEFT eager side by side
b --model gpt2-medium --name bench-gpt2-medium
p --model gpt2-medium --name peft-gpt2-medium
# BERT-base classification, B=32, T=128, LoRA on query/value as PEFT's usual setup
b --model bert-base --batch 32 --seq-len 128 --lora-targets q_proj,v_proj --name bench-bert-base
p --model bert-base --batch 32 --seq-len 128 --lora-targets q_proj,v_proj --methods full,lora,prefix --name peft-bert-base
# torch.compile, minift (PEFT compiled and CUDA graphs: gpu_compile.sh and gpu_targets.sh, their own calls)
b --model gpt2-medium --methods full,lora --compile --name bench-gpt2-medium-compile-minift
# GPT-2 small and large: every method (minift only)
b --model gpt2 --name bench-gpt2
b --model gpt2-large --methods full,lora,adalora,prefix,prompt,freeze,bitfit --name bench-gpt2-large
# One flag at a time on GPT-2 medium (full and LoRA)
b --model gpt2-medium --methods full,lora --no-frozen-bf16 --name ablation-fp32-frozen-base
b --model gpt2-medium --methods full,lora --plain-ce --name ablation-plain-ce
b --model gpt2-medium --methods full,lora --checkpointing --name ablation-checkpointing
