#!/usr/bin/env bash
# Issue 9 on the H200 lent on 2026-11-28 (code after the review fixes and the compiled
# merged-forward memory fix). Stage "a": the GPT-2 medium LoRA and full fine-tuning targets, minift
# under torch.compile (+ CUDA graphs) with compiled PEFT in the same call. Stage "b": every method
# eager, minift and PEFT side by side, GPT-2 medium and BERT-base. Stage "c" (after the fused loss
# stopped reading the target count back to the host mid-step): AdaLoRA against LoRA eager, LoRA
# under CUDA graphs with compiled PEFT again, prefix and prompt under CUDA graphs.
# Stage "d": the advisor's memory check, then LoRA under CUDA graphs with compiled PEFT in one call
# again (stage c's PEFT compile ran out of time), and PEFT prefix/prompt eager.
# Stage "e": the fused-AdamW and flash-attention flags' effects, eager, one call.
# Stage "f" (2026-12-01, after the DoRA memory fixes): the LoRA GEMM-shape study, an eager
# kernel profile of merged-forward LoRA, and the advisor's memory check again (DoRA rows).
# Stage "g": the Triton rebuild of W0 + sBA (minift.fast.kernels) checked on CUDA, the GEMM-shape study
# again, then LoRA under CUDA graphs and compiled PEFT in one call.
# Stage "h" (2026-12-01, a new timing: the host queues the timed steps and synchronizes once; the
# rebuild kernel's tile 64 x 64): kernel and timing tests, LoRA under CUDA graphs and compiled PEFT
# in one call, then LoRA again timed the old way (--sync-each-step) for the timing's effect.
# Stage "i": the tests again (call h's log did not come back), compiled PEFT timed the old way,
# the tile sweep again, and the elementwise rebuild under CUDA graphs (A/B against call h's kernel).
# Stage "k": compiled PEFT and LoRA under CUDA graphs, each timed both ways, alternating in one
# process (benchmarks/timing_check.py), then the addmm rebuild under CUDA graphs.
# Stage "l": the elementwise rebuild again, now only where torch.compile traces (call i's ran it
# eagerly inside the backward's operator too), and full fine-tuning under CUDA graphs.
# Stage "m": every method eager, minift and PEFT, with the new timing (stage b's first half again).
# Stage "n": the prefix/prompt target in one call: PEFT eager, then minift under CUDA graphs.
# Usage: gpu_h200.sh OUT_DIR a|b|c|d|e|f|g|h|i|k|l|m|n
set -u
out=${1:-benchmarks/results}
stage=${2:-a}
mkdir -p "$out"
source "$(dirname "$0")/gpu_lib.sh"  # go SECONDS NAME COMMAND...
if [ "$stage" = a ]; then
  go 250 graphs python3 -m minift bench --out "$out" --model gpt2-medium --methods lora,full \
    --compile --compile-mode reduce-overhead --lora-merged-forward --name bench-gpt2-medium-graphs-h200
  go 130 peft-compile python3 benchmarks/peft_baseline.py --out "$out" --model gpt2-medium --methods lora \
    --compile --no-eager --name peft-gpt2-medium-compile-h200
  go 120 compile-lora python3 -m minift bench --out "$out" --model gpt2-medium --methods lora --compile \
    --lora-merged-forward --name bench-gpt2-medium-compile-lora-h200
elif [ "$stage" = c ]; then
  go 60 adalora python3 -m minift bench --out "$out" --model gpt2-medium --methods lora,adalora \
    --name bench-gpt2-medium-adalora-h200
  go 150 graphs-lora python3 -m minift bench --out "$out" --model gpt2-medium --methods lora \
    --compile --compile-mode reduce-overhead --lora-merged-forward --name bench-gpt2-medium-graphs-lora-nosync-h200
  go 140 peft-compile python3 benchmarks/peft_baseline.py --out "$out" --model gpt2-medium --methods lora \
    --compile --no-eager --name peft-gpt2-medium-compile-c-h200
  go 220 graphs-prompt python3 -m minift bench --out "$out" --model gpt2-medium --methods prompt,prefix \
    --compile --compile-mode reduce-overhead --name bench-gpt2-medium-graphs-prompt-h200
elif [ "$stage" = d ]; then
  go 60 advisor python3 benchmarks/advisor_check.py --out "$out"
  go 150 graphs-lora python3 -m minift bench --out "$out" --model gpt2-medium --methods lora \
    --compile --compile-mode reduce-overhead --lora-merged-forward --name bench-gpt2-medium-graphs-lora-d-h200
  go 200 peft-compile python3 benchmarks/peft_baseline.py --out "$out" --model gpt2-medium --methods lora \
    --compile --no-eager --name peft-gpt2-medium-compile-d-h200
  go 60 peft-eager python3 benchmarks/peft_baseline.py --out "$out" --model gpt2-medium --methods prefix,prompt \
    --name peft-gpt2-medium-prompt-d-h200
elif [ "$stage" = e ]; then
  go 70 flags-default python3 -m minift bench --out "$out" --model gpt2-medium --methods full,lora \
    --name bench-gpt2-medium-flags-h200
  go 40 flags-foreach python3 -m minift bench --out "$out" --model gpt2-medium --methods full --no-fused-adamw \
    --name bench-gpt2-medium-foreach-adamw-h200
  go 60 flags-math python3 -m minift bench --out "$out" --model gpt2-medium --methods full,lora --sdpa-math \
    --name bench-gpt2-medium-sdpa-math-h200
elif [ "$stage" = b ]; then
  go 150 eager python3 -m minift bench --out "$out" --model gpt2-medium \
    --methods full,lora,dora,adalora,prefix,prompt,freeze,bitfit,probe --name bench-gpt2-medium-h200
  go 60 eager-merged python3 -m minift bench --out "$out" --model gpt2-medium --methods lora \
    --lora-merged-forward --name bench-gpt2-medium-merged-h200
  go 150 peft-eager python3 benchmarks/peft_baseline.py --out "$out" --model gpt2-medium \
    --methods full,lora,adalora,prefix,prompt --name peft-gpt2-medium-h200
  go 60 bert python3 -m minift bench --out "$out" --model bert-base --batch 32 --seq-len 128 \
    --lora-targets q_proj,v_proj --methods full,lora,prefix --lora-merged-forward --name bench-bert-base-h200
  go 90 peft-bert python3 benchmarks/peft_baseline.py --out "$out" --model bert-base --batch 32 --seq-len 128 \
    --lora-targets q_proj,v_proj --methods full,lora,prefix --name peft-bert-base-h200
elif [ "$stage" = f ]; then
  go 60 gemm-shapes python3 benchmarks/lora_gemm_shapes.py --out "$out"
  go 60 profile-lora python3 benchmarks/profile_step.py --model gpt2-medium --method lora --lora-merged-forward \
    --rows 40
  go 60 profile-prompt python3 benchmarks/profile_step.py --model gpt2-medium --method prompt --rows 25
  go 90 advisor python3 benchmarks/advisor_check.py --out "$out"
  go 60 dora python3 -m minift bench --out "$out" --model gpt2-medium --methods lora,dora \
    --name bench-gpt2-medium-dora-f-h200
elif [ "$stage" = g ]; then
  go 90 kernel-tests python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py
  go 60 gemm-shapes python3 benchmarks/lora_gemm_shapes.py --out "$out"
  go 150 graphs-lora python3 -m minift bench --out "$out" --model gpt2-medium --methods lora \
    --compile --compile-mode reduce-overhead --lora-merged-forward --name bench-gpt2-medium-graphs-lora-g-h200
  go 200 peft-compile python3 benchmarks/peft_baseline.py --out "$out" --model gpt2-medium --methods lora \
    --compile --no-eager --name peft-gpt2-medium-compile-g-h200
elif [ "$stage" = h ]; then
  go 80 tests python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py \
    tests/test_bench.py::test_window_timing_measures_gpu_work_and_host_stalls
  go 140 graphs-lora python3 -m minift bench --out "$out" --model gpt2-medium --methods lora \
    --compile --compile-mode reduce-overhead --lora-merged-forward --name bench-gpt2-medium-graphs-lora-h-h200
  go 210 peft-compile python3 benchmarks/peft_baseline.py --out "$out" --model gpt2-medium --methods lora \
    --compile --no-eager --name peft-gpt2-medium-compile-h-h200
  go 140 graphs-lora-sync python3 -m minift bench --out "$out" --model gpt2-medium --methods lora \
    --compile --compile-mode reduce-overhead --lora-merged-forward --sync-each-step \
    --name bench-gpt2-medium-graphs-lora-sync-h-h200
elif [ "$stage" = i ]; then
  go 80 tests python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py \
    tests/test_bench.py::test_window_timing_measures_gpu_work_and_host_stalls
  go 210 peft-compile-sync python3 benchmarks/peft_baseline.py --out "$out" --model gpt2-medium --methods lora \
    --compile --no-eager --sync-each-step --name peft-gpt2-medium-compile-sync-i-h200
  go 60 gemm-shapes python3 benchmarks/lora_gemm_shapes.py --out "$out" --sweep
  go 140 rebuild-elementwise python3 benchmarks/rebuild_ab.py elementwise --out "$out" --model gpt2-medium \
    --methods lora --compile --compile-mode reduce-overhead --lora-merged-forward --no-isolate \
    --name bench-gpt2-medium-graphs-lora-elementwise-i-h200
elif [ "$stage" = k ]; then
  go 220 timing-peft python3 benchmarks/timing_check.py peft-compile-k-h200 peft "$out" --out "$out" --model gpt2-medium \
    --methods lora --compile --no-eager --name peft-gpt2-medium-compile-k-h200
  go 140 timing-lora python3 benchmarks/timing_check.py lora-graphs-k-h200 minift "$out" --out "$out" --model gpt2-medium \
    --methods lora --compile --compile-mode reduce-overhead --lora-merged-forward --no-isolate \
    --name bench-gpt2-medium-graphs-lora-k-h200
  go 130 rebuild-addmm python3 benchmarks/rebuild_ab.py addmm --out "$out" --model gpt2-medium \
    --methods lora --compile --compile-mode reduce-overhead --lora-merged-forward --no-isolate \
    --name bench-gpt2-medium-graphs-lora-addmm-k-h200
elif [ "$stage" = l ]; then
  go 140 rebuild-elementwise python3 benchmarks/rebuild_ab.py elementwise --out "$out" --model gpt2-medium \
    --methods lora --compile --compile-mode reduce-overhead --lora-merged-forward --no-isolate \
    --name bench-gpt2-medium-graphs-lora-elementwise-l-h200
  go 200 graphs-full python3 -m minift bench --out "$out" --model gpt2-medium --methods full \
    --compile --compile-mode reduce-overhead --name bench-gpt2-medium-graphs-full-l-h200
elif [ "$stage" = m ]; then
  go 160 eager python3 -m minift bench --out "$out" --model gpt2-medium \
    --methods full,lora,dora,adalora,prefix,prompt,freeze,bitfit,probe --name bench-gpt2-medium-m-h200
  go 170 peft-eager python3 benchmarks/peft_baseline.py --out "$out" --model gpt2-medium \
    --methods full,lora,adalora,prefix,prompt --name peft-gpt2-medium-m-h200
elif [ "$stage" = n ]; then
  go 60 peft-eager python3 benchmarks/peft_baseline.py --out "$out" --model gpt2-medium --methods prefix,prompt \
    --name peft-gpt2-medium-prompt-n-h200
  go 230 graphs-prompt python3 -m minift bench --out "$out" --model gpt2-medium --methods prompt,prefix \
    --compile --compile-mode reduce-overhead --name bench-gpt2-medium-graphs-prompt-n-h200
else
  echo "unknown stage '$stage': use a, b, c, d, e, f, g, h, i, k, l, m or n" >&2
  exit 2
fi
