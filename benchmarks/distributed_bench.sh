#!/usr/bin/env bash
# The multi-GPU measurements of docs/distributed.md: full fine-tuning through torchrun, data
# parallel and FSDP2-sharded (--shard), against one GPU.
#
#   benchmarks/distributed_bench.sh [--out DIR] [--gpus "2 4"] [--dry-run] STAGE [STAGE ...]
#
# Results go to --out (default: $OUT when set, else runs/distributed, which git ignores); every
# command logs to OUT/<name>.log under its own time limit (SIGINT: minift saves and stops), and a
# failure is reported on stderr before the next command runs. --gpus: the GPU counts to run
# besides 1 (default "2 4"; each must be <= the GPUs there are).
#
# Stages:
#   setup        runs/dist-gpt2-large: GPT-2 large's shape (774M parameters), random weights, the BPE
#                tokenizer and standard-library corpus of benchmarks/ab_setup.py      (~2 min, CPU)
#   gpt2-large   `minift train --method full`, 30 steps of 8 x 1024 tokens per GPU (--batch-size 8 x N),
#                bf16, on 1 GPU (the default path, then eager: --compile false --fast false), and on
#                each N of --gpus sharded (--shard) and data parallel; then a table of tokens/s
#                (steady, all GPUs together) and peak GiB per GPU      gpt2-large-*.log, gpt2-large.md
#   resume       a sharded run on the largest N stopped after 10 steps (--steps 10; the schedule is
#                constant), continued to 20 on 2 GPUs and to 30 on 1, without --shard; its log
#                against an uninterrupted 30-step run on 1 GPU          resume-*.log, resume.md
#   llama-10b    full fine-tuning of a ~10B Llama shape (d 5120, 36 layers, 40 query / 8 key-value
#                heads, SwiGLU 13824, vocab 32000: 10.2B parameters; 164 GB of fp32 weights, gradients
#                and AdamW moments, more than one GPU holds) sharded over the largest N of --gpus,
#                10 steps of 2 x 2048 tokens per GPU; random weights built on every rank's CPU
#                (N x 41 GB of host memory), no checkpoint       llama-10b.log, llama-10b.json
#   all          setup gpt2-large resume llama-10b
#
# On 4 H200s: `benchmarks/distributed_bench.sh --gpus "2 4" all` (about 25 minutes).
set -u
here=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-}
gpus="2 4"
dry=0
stages=()
source "$here/benchmarks/stages.sh"  # parse_stage_args, out_dir, go
script_option() {
  case $1 in
    --gpus) gpus=$2 ;;
    *) return 1 ;;
  esac
}
parse_stage_args "$@"
if [ ${#stages[@]} -eq 0 ]; then
  echo "usage: benchmarks/distributed_bench.sh [--out DIR] [--gpus \"2 4\"] [--dry-run] STAGE [STAGE ...]" >&2
  exit 2
fi
out_dir "$here/runs/distributed"
cd "$here"
model=$here/runs/dist-gpt2-large
largest=${gpus##* }
M="python3 -m minift"
T="python3 -m torch.distributed.run --standalone"

# train NAME GPUS SECONDS ARGS...: minift train of the GPT-2 large shape on GPUS GPUs (1: no torchrun)
train() {
  local name=$1 n=$2 s=$3; shift 3
  local launch="$M"
  [ "$n" -gt 1 ] && launch="$T --nproc-per-node $n -m minift"
  go "$s" "$name" $launch train --model "$model" --train "$model/corpus.txt" --task causal-lm --max-len 1024 \
    --method full --lr 1e-5 --no-progress --overwrite --out "$out/$name" "$@"
  [ "$dry" = 1 ] || rm -rf "$out/$name/last" "$out/$name/adapter" "$out/$name/model"
}

# table TITLE NAME...: tokens/s and peak GiB of each run's summary line (the last JSON line of its log)
table() {
  [ "$dry" = 1 ] && return 0
  python3 - "$out" "$@" <<'EOF'
import json, sys
from pathlib import Path
out, title, names = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
print(f"# {title}\n\n| run | steady tokens/s | tokens/s (first step in) | peak GiB per GPU | final loss |\n|---|---|---|---|---|")
for name in names:
    lines = [l for l in (out / f"{name}.log").read_text().splitlines() if l.startswith("{")] if (out / f"{name}.log").is_file() else []
    s = json.loads(lines[-1]) if lines else {}
    print(f"| {name} | {s.get('steady_tokens_per_s', '-')} | {s.get('tokens_per_s', '-')} | {s.get('peak_gib', '-')} | "
          f"{s.get('final_loss', 'failed: see the log')} |")
EOF
}

stage() {
  case $1 in
  setup)
    [ -f "$model/corpus.txt" ] || go 300 setup-corpus python3 benchmarks/ab_setup.py "$model"
    go 300 setup-gpt2-large python3 -c "
import sys, torch; sys.path.insert(0, '.')
from minift.models.gpt import GPT, GPTConfig
torch.manual_seed(0)
GPT(GPTConfig(vocab_size=50257, block_size=1024, n_layer=36, n_head=20, n_embd=1280)).save_pretrained('$model')" ;;
  gpt2-large)
    local runs=(gpt2-large-1gpu gpt2-large-1gpu-eager) n
    train gpt2-large-1gpu 1 420 --steps 30 --batch-size 8
    train gpt2-large-1gpu-eager 1 300 --steps 30 --batch-size 8 --compile false --fast false
    for n in $gpus; do
      train "gpt2-large-${n}gpu-shard" "$n" 300 --steps 30 --batch-size $((8 * n)) --shard
      train "gpt2-large-${n}gpu-dp" "$n" 420 --steps 30 --batch-size $((8 * n))
      runs+=("gpt2-large-${n}gpu-shard" "gpt2-large-${n}gpu-dp")
    done
    table "GPT-2 large shape, full fine-tuning, 8 x 1024 tokens per GPU, bf16" "${runs[@]}" > "$out/gpt2-large.md" ;;
  resume)
    local args=(--batch-size 8 --schedule constant --compile false --fast false)
    train resume-1gpu-30 1 300 --steps 30 "${args[@]}"
    go 300 resume-a $T --nproc-per-node "$largest" -m minift train --model "$model" --train "$model/corpus.txt" \
      --task causal-lm --max-len 1024 --method full --lr 1e-5 --no-progress --overwrite --out "$out/resume" \
      --steps 10 --shard "${args[@]}"
    go 300 resume-b $T --nproc-per-node 2 -m minift train --model "$model" --train "$model/corpus.txt" \
      --task causal-lm --max-len 1024 --method full --lr 1e-5 --no-progress --resume --out "$out/resume" \
      --steps 20 "${args[@]}"
    go 300 resume-c $M train --model "$model" --train "$model/corpus.txt" --task causal-lm --max-len 1024 \
      --method full --lr 1e-5 --no-progress --resume --out "$out/resume" --steps 30 "${args[@]}"
    [ "$dry" = 1 ] || python3 - "$out" > "$out/resume.md" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
a, b = ([json.loads(l)["loss"] for l in (out / d / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
        for d in ("resume", "resume-1gpu-30"))
print("# Sharded on N GPUs for 10 steps, data parallel on 2 for 10, one GPU for 10, against one GPU for 30 (bf16)\n")
print("| step | resumed run | one GPU | difference |\n|---|---|---|---|")
for i, (x, y) in enumerate(zip(a, b), 1):
    print(f"| {i} | {x:.5f} | {y:.5f} | {x - y:+.2e} |")
EOF
    ;;
  llama-10b)
    [ "$dry" = 1 ] || cat > "$out/llama_10b.py" <<'EOF'
"""Full fine-tuning of a ~10B Llama shape, FSDP2-sharded over torchrun's ranks: tokens/s and peak memory."""
import json, os, sys, time
sys.path.insert(0, os.getcwd())
import torch
from minift.models.llama import Llama, LlamaConfig
from minift.training import distributed
from minift.training.config import TrainConfig
from minift.training.loop import train
distributed.init()
n, rows, T = distributed.world_size(), int(os.environ.get("ROWS", "2")), int(os.environ.get("SEQ", "2048"))
cfg = LlamaConfig(vocab_size=32000, n_layer=36, n_head=40, n_kv_head=8, n_embd=5120, n_inner=13824,
                  max_position_embeddings=T)
t0 = time.perf_counter()
torch.manual_seed(0)
model = Llama(cfg)  # the same random weights on every rank
params = sum(p.numel() for p in model.parameters())
model.checkpointing = os.environ.get("CHECKPOINTING") == "1"
distributed.shard(model, torch.device("cuda"), bf16=True)
built = time.perf_counter() - t0
g = torch.Generator().manual_seed(1)
batches = [{"input_ids": (x := torch.randint(0, cfg.vocab_size, (rows * n, T), generator=g)), "labels": x}
           for _ in range(4)]
res = train(model, batches, TrainConfig(lr=1e-5, steps=int(os.environ.get("STEPS", "10")), device="cuda",
                                        progress=False, plot=False, log_every=1))
if distributed.is_main():
    print(json.dumps({"parameters": params, "gpus": n, "tokens_per_step": rows * n * T, "build_and_shard_s": round(built, 1),
                      "first_step_s": round(res.first_step_s, 2), "steady_tokens_per_s": round(res.steady_tokens_per_s),
                      "peak_gib_rank0": round(res.peak_gib or 0, 1), "losses": [round(x, 4) for x in res.losses]}))
EOF
    go 580 llama-10b env OMP_NUM_THREADS=8 $T --nproc-per-node "$largest" "$out/llama_10b.py"
    [ "$dry" = 1 ] || grep '^{' "$out/llama-10b.log" | tail -1 > "$out/llama-10b.json" ;;
  all)
    stage setup; stage gpt2-large; stage resume; stage llama-10b ;;
  *)
    echo "unknown stage '$1' (see benchmarks/distributed_bench.sh --help)" >&2; return 2 ;;
  esac
}

for s in "${stages[@]}"; do
  stage "$s"
done
