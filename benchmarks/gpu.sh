#!/usr/bin/env bash
# Every GPU measurement minift's docs cite, as named stages of one script.
#
#   benchmarks/gpu.sh [--out DIR] [--tag NAME] [--tree DIR] [--dry-run] STAGE [STAGE ...]
#
# Results go to --out (default: $OUT when set, else runs/gpu, which git ignores); copy the ones
# the docs cite into benchmarks/results/ and commit them. File names end in the device tag
# (h200, h100, ... from nvidia-smi; --tag overrides it). Every command has its own time limit
# (SIGINT: `minift bench` saves after each method, so a run cut short keeps what finished) and
# logs to OUT/<name>.log; a failure is reported on stderr and the next command runs. env.txt
# (device, driver, versions, commit) is written first. --tree runs another checkout's minift
# and scripts (an A/B of two commits: the same stage twice, with --tag telling them apart).
# --dry-run prints the commands instead of running them. On a lent machine whose calls bring back a
# bounded number of files (minift's device tool), pack OUT into one archive after the stages
# (`tar czf r.tgz -C "$OUT" r`), and keep run folders with checkpoints out of it.
#
# Stages (GPT-2 medium config, batch 8 x 1024, bf16 autocast, unless named otherwise):
#   tests          tests-core + tests-training: the whole test suite on the GPU, in two commands (the whole
#                  suite takes longer than one 10-minute device command)
#     tests-core   every test but tests/training                        test-suite-gpu-core.log
#     tests-training  tests/training                                    test-suite-gpu-training.log
#   tests-parallel the whole suite as four pytest processes at once (folders split four ways; one command)
#                  test-suite-gpu-{cli,fast,studies,training}.log
#   tests-changed  the test files of what changed since the last whole-suite GPU run   test-files-gpu.log
#   bench-eager    every method, eager; LoRA through the merged forward  bench-gpt2-medium-eager[-merged]-TAG
#   bench-best     best-lora + best-full + best-prompt (up to ~10 min; run the parts separately
#                  under a 10-minute command limit)
#     best-lora    LoRA, merged forward, torch.compile + CUDA graphs, 5 windows of 10 steps
#                  (benchmarks/timing_check.py)                        bench-gpt2-medium-graphs-lora-TAG
#     best-full    full fine-tuning under CUDA graphs (MFU)             bench-gpt2-medium-graphs-full-TAG
#     best-prompt  prompt and prefix tuning under CUDA graphs           bench-gpt2-medium-graphs-prompt-TAG
#   peft           peft-eager + peft-compile: the peer, transformers + peft (benchmarks/peft_baseline.py)
#     peft-eager   full, LoRA, AdaLoRA, prefix, prompt, eager           peft-gpt2-medium-eager-TAG
#     peft-compile LoRA under torch.compile, 5 windows of 10 steps      peft-gpt2-medium-compile-TAG
#   adalora        LoRA and AdaLoRA eager in one process (the step ratio) bench-gpt2-medium-adalora-TAG
#   bert           BERT-base, batch 32 x 128, LoRA on q,v: minift and PEFT  bench-bert-base-TAG, peft-bert-base-TAG
#   llama          llama-minift + llama-peft: TinyLlama-1.1B's shape (llama-1b), batch 8 x 1024, LoRA on all
#                  seven projections (gate_proj too); ~7 min expected, limits adding up to 13.5 min (run the two
#                  parts as two commands where a command may take 10 minutes at most)
#     llama-minift llama-eager + llama-best                            (~4 min expected, limits 8 min)
#     llama-eager  every method eager (BitFit skipped: no biases)      bench-llama-1b-eager-TAG
#     llama-best   LoRA (merged forward, 5 windows of 10 steps) and full fine-tuning under CUDA graphs
#                  bench-llama-1b-graphs-{lora,full}-TAG, timing-check-llama-lora-graphs-TAG.json
#     llama-peft   the peer: full, LoRA, AdaLoRA, prefix, prompt eager, then LoRA under torch.compile
#                  (5 windows)  (~3 min expected, limits 5.5 min)  peft-llama-1b-{eager,compile}-TAG
#   flag-default   full and LoRA eager, no flags (the first row of `flags`)
#   flags          one optimization off (or on) at a time, full and LoRA eager  bench-gpt2-medium-flag-*-TAG
#   advisor-check  the memory estimator against max_memory_allocated    advisor_check.{md,json}
#   gemm-shapes    LoRA's GEMMs one by one, the rebuild kernel's tiles   lora-gemm-shapes.json
#   profile        top CUDA kernels of an eager step: merged LoRA, prompt  profile-*-TAG.log
#   rebuild-ab     LoRA under CUDA graphs with W0 + sBA rebuilt three ways: the Triton kernel, addmm,
#                  elementwise for inductor (benchmarks/rebuild_ab.py)  bench-gpt2-medium-rebuild-*-TAG
#   compare-full   `minift compare --full`: MiniLM-L6 on movie-review sentiment  compare-full-TAG
#                  (needs weights/ from the `prep` stage, carried to the GPU machine)
#   codegen        codegen-pretrain then codegen-case (MINUTES of pretraining, default 4.0)
#     codegen-pretrain  tokenizer + ~23M GPT on the standard library minus asyncio  codegen-pretrain-corpus.json,
#                  codegen-roundtrip.json (transformers loads it: same logits)
#     codegen-case AdaLoRA, LoRA, full adapted to asyncio             codegen-cuda.{md,json}, -ranks.png
#   codegen-llama  codegen-pretrain-llama then codegen-case-llama: the same on a ~23M Llama (pretrain --arch
#                  llama, to runs/codegen-pretrained-llama)  codegen-pretrain-llama-corpus.json,
#                  codegen-roundtrip-llama.json, codegen-cuda-llama.{md,json}, -ranks.png
#   targets        bench-best, peft, adalora: the headline ratios, minift and the peer on one card
#   default-path   train (minift train's default on CUDA), then the bf16-base peer eager (full, LoRA)
#                  and compiled (LoRA): issue 21's rows      (~8 min with compiling)
#   train          `minift train` itself, full and LoRA r=8 on all six projections, 60 steps, on a
#                  GPT-2-medium-shaped random model (benchmarks/ab_setup.py, built once in
#                  runs/train-model by this checkout); $TRAIN_ARGS is added to both commands
#                  (e.g. "--compile false"); checkpoints and adapters are deleted after each run
#                                                          train-{full,lora}-TAG/, train-speed-TAG.md
#   issue21-one    the rows of issue 21's table, GPT-2 medium, minift against the bf16-base peer, compiled and
#                  eager, LoRA on six and on five projections: every compiled configuration compiled at once
#                  (untimed), then the rows one at a time (~11 min on an H200; run again with the same --out on
#                  the same machine, it runs only the rows not yet written)   one/*.json, one/issue21.md
#   issue21-warm   issue21-one's first phase alone: compiles every compiled configuration of its table
#                  (untimed), filling this machine's torch.compile caches for a later issue21-one
#   issue21        issue21-gpt2 + issue21-peer + issue21-cls + issue21-bert: issue 21's rows, minift and the
#                  bf16-base peer (limits 9.6 + 6 + 6.3 + 4.3 min, set for compiling on a cold card: run the parts as
#                  commands back to back on one held card)
#     issue21-gpt2 GPT-2 medium 8 x 1024, full and LoRA r=8 on all six projections: `minift bench` with no
#                  speed flag (minift train's plan; MFU against the matmul rate measured in the run), then a
#                  profile of one default-path LoRA and full step (top CUDA kernels, host time per step)
#                  bench-gpt2-medium-default-TAG, issue21-profile-{lora,full}-TAG.log
#     issue21-profiles (in issue21-gpt2) the profile of one default-path LoRA and full step alone
#     issue21-peer the peer on the same shapes: eager (full, LoRA) and compiled (LoRA, 5 windows)
#                  peft-gpt2-medium-eager-TAG, peft-gpt2-medium-compile-TAG
#     issue21-cls  (weights/ from `prep` carried) `minift train` default on MiniLM-L6 sentiment, --recipe
#                  sentiment-{full,lora} (LoRA at bench's r 8), 300 steps, and its summary lines
#                  issue21-train-{full,lora}-TAG.log, issue21-train-TAG.md; bench at the runs' shapes and
#                  dropout: LoRA on q,v 8 x 79, full 16 x 79, without and with the runs' clipping
#                  (--max-grad-norm 1.0)   bench-minilm-{lora,full}[-clip]-TAG
#     issue21-trace (not in issue21) issue21-cls's two train runs under benchmarks/trace_train.py: torch.profiler
#                  over steps 100-109 (host ops by self CPU time, CUDA kernels) and Python's garbage collections
#                  issue21-trace-{full,lora}-TAG/trace.md, gc.json, trace.json.gz
#     issue21-ablation (not in issue21) issue21-cls's two train runs under benchmarks/loop_ablation.py: each
#                  with one piece of the loop's host work taken out (clipping, the second AdamW group, the
#                  RNG snapshot, the loss read-back), 5 processes each (limits 2 x 4.7 min)
#                  issue21-ablation-{full,lora}-TAG/ablation.md
#     issue21-pairs (not in issue21) issue21-cls's train runs and their bench rows (clipping at 1.0, 100 timed
#                  steps) in alternation, three rounds (limits 320 s a round; about 100 s a round on an H200)
#                  pairs/train-vs-bench.md
#     issue21-pairs-gpt2 (not in issue21) the same at bench's GPT-2 medium shape, LoRA (all six projections) and
#                  full, one round, and bench's LoRA with the whole frozen base in fp32 (about 10.5 min
#                  on a cold compile cache; PAIRS_METHODS="full" or "lora" runs one method's part, about 5 min;
#                  PAIRS_FP32=0 leaves out the fp32-base row)
#                  pairs-gpt2/train-vs-bench.md
#     issue21-bert bench default full and LoRA on q,v, MiniLM 16 x 128 and BERT-base 32 x 128
#                  bench-{minilm,bert-base}-default-TAG
#   act-budget     LoRA's default step (compiled, CUDA graphs) under torch.compile's activation memory budget
#                  1.0, 0.8, 0.6 (bench --activation-budget): peak memory against step time (limits 8.5 min)
#                  bench-gpt2-medium-lora-budget{1.0,0.8,0.6}-TAG
#   compile-cache  LoRA's first step cold, from Inductor's caches alone, and from AOTAutograd's too
#                  (benchmarks/aot_cache_counters.py, three processes; CACHE_MODEL, default gpt2)
#                  compile-cache-{cold,inductor,warm}-TAG
#   act-recompute  LoRA (all six projections) with and without the MLP's activation recomputed in down_proj's
#                  merged backward (bench --[no-]lora-recompute-act, fast.mlp), default then eager (limits 8.7 min;
#                  ACT_MODES="default" or "eager" runs one half)   bench-gpt2-medium-act-{default,eager}-{off,on}-TAG
#   qkv-ab         LoRA (all six projections) with q, k and v's LoRA factors stacked (fast.qkv) and without
#                  (benchmarks/qkv_ab.py): bench's default, off/on twice, then eager off/on (limits 12.7 min)
#                                                    bench-gpt2-medium-qkv-{default-{off,on}-rN,eager-{off,on}}-TAG
#   factor-ab      LoRA (all six projections) with and without the factor kernel (bench --lora-factor-kernel:
#                  the backward's g B and g^T (A x) in one Triton pass, fast.kernels.lora_factor_grads), eager
#                  (merged forward) then default (compiled, CUDA graphs); its tests are in tests-changed
#                  (limits 8.7 min; FACTOR_MODES="eager" or "default" runs one half)
#                                                    bench-gpt2-medium-factor-{eager,default}-{off,on}-TAG
#   many           many-forward + many-train: many LoRA adapters on one GPT-2-medium-shaped base
#                  (benchmarks/many_adapters.py; limits 5 + 7 min: two commands)
#     many-forward 8 adapters x 4 rows x 1024: mixed batch (reference, fast) against a loop over the
#                  adapters and PEFT's adapter_names, forward and greedy decoding   many-adapters.json
#     many-train   8 LoRA jobs of batch 2 x 1024: train_many against one after another, peak memory against
#                  the budget   many-train/many-adapters.json
#   prep           (CPU, with network; not on the GPU machine) weights/minilm-fp16 and
#                  weights/cache/sentiment for compare-full
#
# Run the pairs whose ratio a doc reports (bench-best with peft, bench-eager with peft-eager) on
# the same machine: each lent machine is a fresh one, and numbers compare within a machine.
set -u
here=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-}
tag=
tree=$here
dry=0
stages=()
source "$here/benchmarks/stages.sh"  # parse_stage_args, out_dir, go
script_option() {
  case $1 in
    --tag) tag=$2 ;;
    --tree) tree=$(cd "$2" && pwd) ;;
    *) return 1 ;;
  esac
}
parse_stage_args "$@"
if [ ${#stages[@]} -eq 0 ]; then
  echo "usage: benchmarks/gpu.sh [--out DIR] [--tag NAME] [--tree DIR] [--dry-run] STAGE [STAGE ...] (see --help)" >&2
  exit 2
fi
out_dir "$here/runs/gpu"
cd "$tree"  # `python3 -m minift` and benchmarks/*.py run this checkout's code
if [ -z "$tag" ]; then
  tag=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | sed -E 's/^NVIDIA //; s/ .*//' \
        | tr '[:upper:]' '[:lower:]')
  tag=${tag:-gpu}
fi
M="python3 -m minift"
G2M="--model gpt2-medium"
L1B="--model llama-1b --batch 8 --seq-len 1024"
GRAPHS="--compile --compile-mode reduce-overhead"

env_txt() {
  [ "$dry" = 1 ] && return 0
  { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
    python3 -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__)"
    # the installed versions, without importing the packages (importing transformers takes seconds)
    python3 -c "from importlib.metadata import version as v
print('transformers', v('transformers'), '| peft', v('peft'))" 2>/dev/null || echo "transformers/peft: not installed"
    git -C "$tree" log -1 --format='commit %H %s' 2>/dev/null || echo "commit: unknown (no .git here)"
    # a copied working tree may carry an older .git: say how far the files measured differ from it
    echo "tracked files differing from that commit: $(git -C "$tree" status --porcelain --untracked-files=no 2>/dev/null | wc -l)"
    echo "tree $tree | tag $tag | $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  } > "$out/env.txt"
}

# minift train's arguments for issue 21's MiniLM sentiment pair, method $1 (full or lora): the recipe as
# it is, but LoRA at bench's r 8, alpha 16 (the same method on both sides), 300 steps on CUDA
minilm_run() {
  local -A extra=([full]="" [lora]="--r 8 --alpha 16")
  echo --recipe "sentiment-$1" --model weights/minilm-fp16 ${extra[$1]} --steps 300 --device cuda --no-progress
}

stage() {
  case $1 in
  tests)
    stage tests-core; stage tests-training ;;
  tests-core)
    go 560 test-suite-gpu-core python3 -m pytest -q -p no:cacheprovider -rfEs --ignore=tests/training ;;
  tests-training)
    go 560 test-suite-gpu-training python3 -m pytest -q -p no:cacheprovider -rfEs tests/training ;;
  tests-parallel)
    # the whole suite as four pytest processes at once, one per group of folders (one card, 16 host cores)
    local -A shard=([cli]="tests/test_cli.py tests/test_cli_failures.py tests/test_metrics.py tests/adapters"
      [fast]="tests/fast tests/methods tests/models" [studies]="tests/studies" [training]="tests/training")
    local k
    for k in "${!shard[@]}"; do
      go 540 "test-suite-gpu-$k" python3 -m pytest -q -p no:cacheprovider -rfEs ${shard[$k]} &
    done
    wait ;;
  tests-changed)
    # the tests of what changed since the last whole-suite run on a GPU (edit the list as that changes)
    # (fast.qkv on with the merged forward: its tests, the CLI's default-path test)
    go 400 test-files-gpu python3 -m pytest -q -p no:cacheprovider -rfEs tests/fast/test_qkv.py \
      tests/fast/test_lora.py tests/fast/test_mlp.py tests/test_cli.py -k "qkv or lora or mlp or cuda" ;;
  bench-eager)
    go 200 bench-eager $M bench --out "$out" $G2M --methods full,lora,dora,adalora,prefix,prompt,freeze,bitfit,probe \
      --speed eager --name bench-gpt2-medium-eager-$tag
    go 70 bench-eager-merged $M bench --out "$out" $G2M --methods lora --lora-merged-forward --speed eager \
      --name bench-gpt2-medium-eager-merged-$tag ;;
  best-lora)
    go 170 best-lora python3 benchmarks/timing_check.py lora-graphs-$tag minift "$out" --out "$out" $G2M \
      --methods lora $GRAPHS --lora-merged-forward --no-isolate --name bench-gpt2-medium-graphs-lora-$tag ;;
  best-full)
    go 200 best-full $M bench --out "$out" $G2M --methods full $GRAPHS --name bench-gpt2-medium-graphs-full-$tag ;;
  best-prompt)
    go 230 best-prompt $M bench --out "$out" $G2M --methods prompt,prefix $GRAPHS \
      --name bench-gpt2-medium-graphs-prompt-$tag ;;
  bench-best)
    stage best-lora; stage best-full; stage best-prompt ;;
  peft-eager)
    go 200 peft-eager python3 benchmarks/peft_baseline.py --out "$out" $G2M --methods full,lora,adalora,prefix,prompt \
      --name peft-gpt2-medium-eager-$tag ;;
  peft-compile)
    go 240 peft-compile python3 benchmarks/timing_check.py peft-compile-$tag peft "$out" --out "$out" $G2M \
      --methods lora --compile --no-eager --name peft-gpt2-medium-compile-$tag ;;
  peft)
    stage peft-eager; stage peft-compile ;;
  adalora)
    go 90 adalora $M bench --out "$out" $G2M --methods lora,adalora --speed eager --name bench-gpt2-medium-adalora-$tag ;;
  bert)
    local bert="--model bert-base --batch 32 --seq-len 128 --lora-targets q_proj,v_proj --methods full,lora,prefix"
    go 90 bert $M bench --out "$out" $bert --lora-merged-forward --speed eager --name bench-bert-base-$tag
    go 120 peft-bert python3 benchmarks/peft_baseline.py --out "$out" $bert --name peft-bert-base-$tag ;;
  llama-eager)
    go 150 llama-eager $M bench --out "$out" $L1B --methods full,lora,dora,adalora,prefix,prompt,freeze,bitfit,probe \
      --speed eager --name bench-llama-1b-eager-$tag ;;
  llama-best)
    go 180 llama-best-lora python3 benchmarks/timing_check.py llama-lora-graphs-$tag minift "$out" --out "$out" $L1B \
      --methods lora $GRAPHS --lora-merged-forward --no-isolate --name bench-llama-1b-graphs-lora-$tag
    go 150 llama-best-full $M bench --out "$out" $L1B --methods full $GRAPHS --name bench-llama-1b-graphs-full-$tag ;;
  llama-peft)
    go 150 llama-peft-eager python3 benchmarks/peft_baseline.py --out "$out" $L1B \
      --methods full,lora,adalora,prefix,prompt --name peft-llama-1b-eager-$tag
    go 180 llama-peft-compile python3 benchmarks/timing_check.py llama-peft-compile-$tag peft "$out" --out "$out" $L1B \
      --methods lora --compile --no-eager --name peft-llama-1b-compile-$tag ;;
  llama-minift)
    stage llama-eager; stage llama-best ;;
  llama)
    stage llama-minift; stage llama-peft ;;
  flag-default)
    go 70 flag-default $M bench --out "$out" $G2M --methods full,lora --speed eager --name bench-gpt2-medium-flag-default-$tag ;;
  flags)
    local f
    stage flag-default
    for f in no-fused-adamw sdpa-math checkpointing plain-ce no-frozen-bf16; do
      go 80 "flag-$f" $M bench --out "$out" $G2M --methods full,lora --speed eager "--$f" --name "bench-gpt2-medium-flag-$f-$tag"
    done ;;
  advisor-check)
    go 120 advisor-check python3 benchmarks/advisor_check.py --out "$out" ;;
  gemm-shapes)
    go 90 gemm-shapes python3 benchmarks/lora_gemm_shapes.py --out "$out" --sweep --layouts ;;
  profile)
    go 90 "profile-lora-merged-eager-$tag" python3 benchmarks/profile_step.py $G2M --method lora --lora-merged-forward \
      --speed eager --rows 40
    go 90 "profile-prompt-eager-$tag" python3 benchmarks/profile_step.py $G2M --method prompt --speed eager --rows 25 ;;
  rebuild-ab)
    local v
    for v in kernel addmm elementwise; do
      go 170 "rebuild-$v" python3 benchmarks/rebuild_ab.py $v --out "$out" $G2M --methods lora $GRAPHS \
        --lora-merged-forward --no-isolate --name "bench-gpt2-medium-rebuild-$v-$tag"
    done ;;
  compare-full)
    go 580 compare-full env MINIFT_CACHE="${MINIFT_CACHE:-$tree/weights/cache}" $M compare --full \
      --model weights/minilm-fp16 --device cuda --no-progress --out "$out" --name compare-full-$tag ;;
  codegen-pretrain)
    go 420 codegen-pretrain $M pretrain --corpus stdlib --held-out asyncio --out runs/codegen-pretrained \
      --minutes "${MINUTES:-4.0}" --device cuda --no-progress
    go 60 codegen-corpus cp runs/codegen-pretrained/corpus.json "$out/codegen-pretrain-corpus.json"
    go 120 codegen-roundtrip python3 benchmarks/codegen_roundtrip.py runs/codegen-pretrained \
      "$out/codegen-roundtrip.json" ;;
  codegen-case)
    go 480 codegen-case $M codegen-case --pretrained runs/codegen-pretrained --out "$out" --device cuda --no-progress ;;
  codegen)
    stage codegen-pretrain; stage codegen-case ;;
  codegen-pretrain-llama)
    go 420 codegen-pretrain-llama $M pretrain --arch llama --corpus stdlib --held-out asyncio \
      --out runs/codegen-pretrained-llama --minutes "${MINUTES:-4.0}" --device cuda --no-progress
    go 60 codegen-corpus-llama cp runs/codegen-pretrained-llama/corpus.json "$out/codegen-pretrain-llama-corpus.json"
    go 120 codegen-roundtrip-llama python3 benchmarks/codegen_roundtrip.py runs/codegen-pretrained-llama \
      "$out/codegen-roundtrip-llama.json" ;;
  codegen-case-llama)
    go 480 codegen-case-llama $M codegen-case --pretrained runs/codegen-pretrained-llama --out "$out" \
      --name codegen-cuda-llama --device cuda --no-progress ;;
  codegen-llama)
    stage codegen-pretrain-llama; stage codegen-case-llama ;;
  train)
    local d=$here/runs/train-model m extra
    [ -f "$d/corpus.txt" ] || go 300 train-setup python3 "$here/benchmarks/ab_setup.py" "$d"
    for m in full lora; do
      extra=; [ $m = lora ] && extra="--r 8 --targets q_proj,k_proj,v_proj,o_proj,up_proj,down_proj"
      go 240 "train-$m-$tag" $M train --model "$d" --train "$d/corpus.txt" --task causal-lm --method $m $extra \
        --steps 60 --batch-size 8 --max-len 1024 --device cuda --no-progress --overwrite --out "$out/train-$m-$tag" \
        ${TRAIN_ARGS:-}
      [ "$dry" = 1 ] || rm -rf "$out/train-$m-$tag/last" "$out/train-$m-$tag/adapter" "$out/train-$m-$tag/model"
    done
    [ "$dry" = 1 ] || python3 "$here/benchmarks/train_speed.py" "$out/train-full-$tag" "$out/train-lora-$tag" \
      > "$out/train-speed-$tag.md" ;;
  targets)
    stage bench-best; stage peft; stage adalora ;;
  default-path)
    stage train
    go 120 peft-default-eager python3 benchmarks/peft_baseline.py --out "$out" $G2M --methods full,lora \
      --name peft-gpt2-medium-eager-$tag
    stage peft-compile ;;
  issue21-gpt2)
    go 300 issue21-bench-gpt2 $M bench --out "$out" $G2M --methods full,lora --name bench-gpt2-medium-default-$tag
    stage issue21-profiles ;;
  issue21-profiles)
    go 150 "issue21-profile-lora-$tag" python3 benchmarks/profile_step.py $G2M --method lora --rows 30
    go 125 "issue21-profile-full-$tag" python3 benchmarks/profile_step.py $G2M --method full --rows 30 ;;
  issue21-warm)
    ISSUE21_WARM_ONLY=1 stage issue21-one ;;
  issue21-peer)
    go 120 issue21-peft-eager python3 benchmarks/peft_baseline.py --out "$out" $G2M --methods full,lora \
      --name peft-gpt2-medium-eager-$tag
    stage peft-compile ;;
  issue21-cls)
    local m cache="${MINIFT_CACHE:-$tree/weights/cache}"
    for m in full lora; do
      go 120 "issue21-train-$m-$tag" env MINIFT_CACHE="$cache" $M train $(minilm_run $m) --overwrite \
        --out "$out/issue21-train-$m-$tag"
      # the summary line is in the log; metrics.jsonl has the tokens/s so far every 10 steps
      [ "$dry" = 1 ] || find "$out/issue21-train-$m-$tag" -mindepth 1 ! -name metrics.jsonl -exec rm -rf {} +
    done
    [ "$dry" = 1 ] || python3 "$here/benchmarks/train_speed.py" "$out/issue21-train-full-$tag.log" \
      "$out/issue21-train-lora-$tag.log" > "$out/issue21-train-$tag.md"
    # bench at the runs' shapes (their speed line says it: 79 tokens for this data) and dropout (0.1, the
    # checkpoint's and the LoRA recipe's): LoRA (q, v) 8 x 79, full 16 x 79; compare with steady_step_ms.
    # The recipes clip gradients to norm 1 (TrainConfig's default): the -clip rows clip as the runs do
    local clip
    for clip in "" 1.0; do
      go 70 issue21-bench-minilm-lora${clip:+-clip} $M bench --out "$out" --model minilm --batch 8 --seq-len 79 \
        --methods lora --lora-targets q_proj,v_proj --dropout 0.1 --steps 20 ${clip:+--max-grad-norm $clip} \
        --name bench-minilm-lora${clip:+-clip}-$tag
      go 70 issue21-bench-minilm-full${clip:+-clip} $M bench --out "$out" --model minilm --batch 16 --seq-len 79 \
        --methods full --dropout 0.1 --steps 20 ${clip:+--max-grad-norm $clip} --name bench-minilm-full${clip:+-clip}-$tag
    done ;;
  issue21-pairs)
    # minift train and minift bench at the run's shape, dropout and clipping, in alternation, three rounds:
    # one process's host-bound step differs from the next's by more than the loop's own cost
    local m r cache="${MINIFT_CACHE:-$tree/weights/cache}"
    local -A shape=([full]="--methods full --batch 16" [lora]="--methods lora --lora-targets q_proj,v_proj --batch 8")
    mkdir -p "$out/pairs"
    for r in 1 2 3; do
      for m in full lora; do
        go 70 "pairs/bench-$m-r$r" $M bench --out "$out/pairs" --model minilm ${shape[$m]} --seq-len 79 --dropout 0.1 \
          --steps 100 --max-grad-norm 1.0 --name "bench-$m-r$r"
        # (the run's folder outside OUT: a full fine-tuning checkpoint is 260 MB, and a cut stage leaves it)
        go 90 "pairs/train-$m-r$r" env MINIFT_CACHE="$cache" $M train $(minilm_run $m) --overwrite \
          --out "${TMPDIR:-/tmp}/minift-pairs-run"
        [ "$dry" = 1 ] || rm -rf "${TMPDIR:-/tmp}/minift-pairs-run"
      done
    done
    [ "$dry" = 1 ] || python3 "$here/benchmarks/train_vs_bench.py" "$out/pairs" > "$out/pairs/train-vs-bench.md" ;;
  issue21-pairs-gpt2)
    # minift train at bench's GPT-2 medium shape (8 x 1024 blocks; a random model and text,
    # benchmarks/preset_run_dir.py) after bench, LoRA on all six projections and full fine-tuning, clipping
    # at 1.0 on both sides, each with its default frozen base in bf16 (fast.frozen). Bench's LoRA row also
    # runs with the base in fp32 (fp32base-lora-TAG, which train_vs_bench.py leaves out; PAIRS_FP32=0: not)
    local m d="${TMPDIR:-/tmp}/minift-gpt2-run-dir"
    local -A only=([lora]="--targets q_proj,k_proj,v_proj,o_proj,up_proj,down_proj" [full]="")
    mkdir -p "$out/pairs-gpt2"
    go 240 pairs-gpt2/prep python3 "$here/benchmarks/preset_run_dir.py" --out "$d"
    [[ " ${PAIRS_METHODS:-lora} " != *" lora "* || ${PAIRS_FP32:-1} != 1 ]] ||
    go 200 pairs-gpt2/fp32base-lora $M bench --out "$out/pairs-gpt2" $G2M --methods lora --max-grad-norm 1.0 \
      --steps 20 --no-frozen-bf16 --name "fp32base-lora-$tag"
    for m in ${PAIRS_METHODS:-lora full}; do
      go 200 "pairs-gpt2/bench-$m-r1" $M bench --out "$out/pairs-gpt2" $G2M --methods $m --max-grad-norm 1.0 \
        --steps 20 --name "bench-$m-r1"
      go 240 "pairs-gpt2/train-$m-r1" $M train --model "$d/model" --train "$d/train.txt" --task causal-lm \
        --method $m ${only[$m]} --max-len 1024 --batch-size 8 \
        --steps 60 --lr 1e-4 --device cuda --no-progress --overwrite --out "$d/run"
      [ "$dry" = 1 ] || rm -rf "$d/run"
    done
    [ "$dry" = 1 ] || rm -rf "$d"
    [ "$dry" = 1 ] || python3 "$here/benchmarks/train_vs_bench.py" "$out/pairs-gpt2" > "$out/pairs-gpt2/train-vs-bench.md" ;;
  issue21-trace)
    local m cache="${MINIFT_CACHE:-$tree/weights/cache}"
    for m in full lora; do
      go 150 "issue21-trace-$m-$tag" env MINIFT_CACHE="$cache" python3 "$here/benchmarks/trace_train.py" \
        --out "$out/issue21-trace-$m-$tag" --from-step 100 --steps 10 -- $(minilm_run $m) --overwrite \
        --out "$out/trace-run-$m"
      [ "$dry" = 1 ] || rm -rf "$out/trace-run-$m"
    done ;;
  issue21-ablation)
    # minift train with one piece of the loop's host work taken out at a time (benchmarks/loop_ablation.py)
    local m cache="${MINIFT_CACHE:-$tree/weights/cache}"
    for m in full lora; do
      go 280 "issue21-ablation-$m-$tag" env MINIFT_CACHE="$cache" python3 "$here/benchmarks/loop_ablation.py" \
        --out "$out/issue21-ablation-$m-$tag" -- $(minilm_run $m)
      [ "$dry" = 1 ] || rm -rf "$out/issue21-ablation-$m-$tag"/run-*
    done ;;
  issue21-bert)
    go 110 issue21-bench-minilm $M bench --out "$out" --model minilm --batch 16 --seq-len 128 --methods full,lora \
      --lora-targets q_proj,v_proj --steps 20 --name bench-minilm-default-$tag
    go 150 issue21-bench-bert $M bench --out "$out" --model bert-base --batch 32 --seq-len 128 --methods full,lora \
      --lora-targets q_proj,v_proj --name bench-bert-base-default-$tag ;;
  issue21)
    stage issue21-gpt2; stage issue21-peer; stage issue21-cls; stage issue21-bert ;;
  issue21-one)
    # the rows of issue 21's table: GPT-2 medium 8 x 1024, minift against the bf16-base peer, compiled and
    # eager, LoRA on six and on five projections (benchmarks/issue21_table.py writes the table and the
    # targets it decides: one/issue21.md). First every compiled configuration whose row is still missing
    # once, all at once and untimed, which fills torch.compile's caches (AOTAutograd, FX graphs, Triton
    # kernels) on this machine; then the missing rows one after another, each compiling again from those caches. About
    # 11 minutes on an H200: where a command may take 10 at most, run the stage again right away with the
    # same --out on the same machine (its caches still warm): it runs only the rows not yet written
    local five="--lora-targets q_proj,k_proj,v_proj,o_proj,down_proj" w="--steps 1 --warmup 1" m
    local peft="python3 benchmarks/peft_baseline.py"
    missing() {  # FILE METHOD...: true when $out/one/FILE.json has no row of one of the methods
      [ "$dry" = 1 ] && return 0
      python3 -c 'import json, sys
try:
    have = {row["method"] for row in json.load(open(sys.argv[1]))["rows"]}
except (OSError, ValueError, KeyError, TypeError):
    have = set()
sys.exit(0 if set(sys.argv[2:]) - have else 1)' "$out/one/$1.json" "${@:2}"
    }
    [ "$dry" = 1 ] || mkdir -p "$out/one/warm"
    [ "$dry" = 1 ] || date -u +"phase 1 (compile, concurrent) %H:%M:%S" >&2
    missing bench-default full lora && for m in full lora; do
      go 200 one/warm/bench-$m $M bench --out "$out/one/warm" $G2M --methods $m $w --name warm-bench-$m &
    done
    missing peft-compile lora && go 200 one/warm/peft-lora $peft --out "$out/one/warm" $G2M --methods lora \
      --compile --no-eager $w --name warm-peft-lora &
    missing peft-full-compile full && go 200 one/warm/peft-full $peft --out "$out/one/warm" $G2M --methods full \
      --compile --no-eager $w --name warm-peft-full &
    missing bench5-default lora && go 200 one/warm/bench5 $M bench --out "$out/one/warm" $G2M --methods lora $five $w \
      --name warm-bench5 &
    missing peft5-compile lora && go 200 one/warm/peft5 $peft --out "$out/one/warm" $G2M --methods lora $five \
      --compile --no-eager $w --name warm-peft5 &
    wait
    [ "${ISSUE21_WARM_ONLY:-0}" = 1 ] && return 0
    [ "$dry" = 1 ] || date -u +"phase 2 (timed, one at a time) %H:%M:%S" >&2
    missing bench-default full lora &&
      go 150 one/bench $M bench --out "$out/one" $G2M --methods full,lora --name bench-default
    missing peft-compile lora &&
      go 100 one/peft-compile python3 benchmarks/timing_check.py peft-compile peft "$out/one" \
      --out "$out/one" $G2M --methods lora --compile --no-eager --name peft-compile
    missing peft-eager full lora &&
      go 80 one/peft-eager $peft --out "$out/one" $G2M --methods full,lora --name peft-eager
    missing bench5-default lora && go 100 one/bench5 $M bench --out "$out/one" $G2M --methods lora $five \
      --name bench5-default
    missing peft5-compile lora && go 100 one/peft5-compile $peft --out "$out/one" $G2M --methods lora $five \
      --compile --no-eager --name peft5-compile
    missing peft-full-compile full && go 100 one/peft-full-compile $peft --out "$out/one" $G2M --methods full \
      --compile --no-eager --name peft-full-compile
    missing bench-eager full lora && go 80 one/bench-eager $M bench --out "$out/one" $G2M --methods full,lora $five \
      --speed eager --name bench-eager
    missing peft5-eager lora &&
      go 60 one/peft5-eager $peft --out "$out/one" $G2M --methods lora $five --name peft5-eager
    [ "$dry" = 1 ] || date -u +"phase 2 done %H:%M:%S" >&2
    if [ "$dry" = 1 ]; then echo "python3 benchmarks/issue21_table.py $out/one > $out/one/issue21.md"
    else python3 "$here/benchmarks/issue21_table.py" "$out/one" > "$out/one/issue21.md"; fi ;;
  compile-cache)
    # LoRA's (all six projections) first step on $CACHE_MODEL (default gpt2) 8 x 1024, three processes
    # sharing fresh Inductor and Triton caches: cold; then with AOTAutograd's cache off for graphs with
    # custom autograd Functions (PyTorch's default; the variable overrides minift's setting); then on
    local i c="$out/compile-caches"
    local -A off=([cold]=1 [inductor]=0 [warm]=1)
    [ "$dry" = 1 ] || rm -rf "$c"
    for i in cold inductor warm; do
      go 200 "compile-cache-$i" env TORCHINDUCTOR_CACHE_DIR="$c/inductor" TRITON_CACHE_DIR="$c/triton" \
        TORCHINDUCTOR_AUTOGRAD_CACHE_ALLOW_CUSTOM_AUTOGRAD=${off[$i]} python3 benchmarks/aot_cache_counters.py \
        --model "${CACHE_MODEL:-gpt2}" --methods lora --steps 10 --out "$out" --name "compile-cache-$i-$tag"
    done
    [ "$dry" = 1 ] || rm -rf "$c" ;;
  act-budget)
    local b
    for b in 1.0 0.8 0.6; do
      go 170 "act-budget-$b" $M bench --out "$out" $G2M --methods lora --activation-budget $b \
        --name bench-gpt2-medium-lora-budget$b-$tag
    done ;;
  act-recompute)
    # LoRA (all six projections) with and without the MLP's activation recomputed in down_proj's merged
    # backward (bench --[no-]lora-recompute-act, fast.mlp): peak memory against step time, bench's default
    # (compiled, CUDA graphs) then eager; ACT_MODES="default" or "eager" runs one half
    local mode on
    local -A limit=([eager]=80 [default]=180)
    for mode in ${ACT_MODES:-default eager}; do
      for on in off on; do
        go ${limit[$mode]} "act-$mode-$on" $M bench --out "$out" $G2M --methods lora --speed $mode \
          --lora-merged-forward --$([ $on = on ] || echo no-)lora-recompute-act \
          --name "bench-gpt2-medium-act-$mode-$on-$tag"
      done
    done ;;
  qkv-ab)
    # LoRA (all six projections) with q, k and v's factors stacked (fast.qkv, on by default with the merged
    # forward) and without (benchmarks/qkv_ab.py off): bench's default (compiled, CUDA graphs), off then on,
    # each in its own process, for each round in $QKV_ROUNDS (default "1 2"); then eager, off and on
    local on round
    for round in ${QKV_ROUNDS:-1 2}; do
      for on in off on; do
        go 150 "qkv-default-$on-r$round" python3 benchmarks/qkv_ab.py $on --no-isolate --out "$out" $G2M \
          --methods lora --name "bench-gpt2-medium-qkv-default-$on-r$round-$tag"
      done
    done
    for on in off on; do
      go 80 "qkv-eager-$on" python3 benchmarks/qkv_ab.py $on --no-isolate --out "$out" $G2M --methods lora \
        --speed eager --lora-merged-forward --name "bench-gpt2-medium-qkv-eager-$on-$tag"
    done ;;
  factor-ab)
    local mode on
    local -A limit=([eager]=80 [default]=180)  # compiling GPT-2 medium's step takes up to 125 s on a fresh card
    for mode in ${FACTOR_MODES:-eager default}; do
      for on in off on; do
        go ${limit[$mode]} "factor-$mode-$on" $M bench --out "$out" $G2M --methods lora --speed $mode --lora-merged-forward \
          --no-lora-recompute-act $([ $on = on ] && echo --lora-factor-kernel) \
          --name "bench-gpt2-medium-factor-$mode-$on-$tag"
      done
    done ;;
  many-forward)
    go 300 many-forward python3 benchmarks/many_adapters.py --out "$out" --parts forward,peft ;;
  many-train)
    go 420 many-train python3 benchmarks/many_adapters.py --out "$out/many-train" --parts train ;;
  many)
    stage many-forward; stage many-train ;;
  prep)
    go 600 prep-minilm python3 benchmarks/pack_weights.py --out weights/minilm-fp16
    go 600 prep-sentiment env MINIFT_CACHE="${MINIFT_CACHE:-$tree/weights/cache}" $M fetch sentiment ;;
  *)
    echo "unknown stage '$1' (see benchmarks/gpu.sh --help)" >&2; return 2 ;;
  esac
}

env_txt
rc=0
for s in "${stages[@]}"; do
  stage "$s" || rc=2
done
[ "$dry" = 1 ] || echo "results in $out" >&2
exit $rc
