"""The `minift` subcommands that study methods side by side: compare (every method on one task),
recommend (which method fits a GPU), bench (memory and throughput) and the code-generation case
study (pretrain, codegen-case).

Same shape as minift/cli.py, which lists these subcommands, builds the parser and reports
errors: each subcommand has an ``add_<name>(sub)`` that declares its flags and a
``_cmd_<name>(args)`` that runs it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from minift.files import InputError as UsageError  # bad usage: one line, exit code 2
from minift.training.speed import WARMUP_STEPS


def _check_cuda(device: str) -> None:
    """``--device cuda`` where there is no CUDA device: a usage error."""
    import torch
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but no CUDA device is available (use --device cpu)")


# ---------------------------------------------------------------------------- bench

def add_bench(sub) -> None:
    from minift.methods.registry import METHODS
    from minift.studies.bench import COMPILE_MODES, SPEEDS
    from minift.studies.presets import PRESETS
    p = sub.add_parser(
        "bench", help="memory/throughput of every method against full fine-tuning",
        description="Every method against full fine-tuning on one model preset: tokens/s, step time, peak memory. "
                    "Speed: with no speed flag each method runs what `minift train` runs by default "
                    "(minift.training.speed.plan): on CUDA minift.fast, LoRA's merged forward and torch.compile "
                    "under CUDA graphs (mode reduce-overhead), except methods with a hook between steps (AdaLoRA) "
                    "which run eager; on the CPU the eager path. Each method runs in its own process when one may "
                    "be compiled. --speed eager, --no-compile, --compile-mode, --[no-]lora-merged-forward and "
                    "--no-fast override the plan; each row records its plan and its first step's time "
                    "(compiling) apart from the steady step time (docs/speed.md).")
    p.add_argument("--model", default=None, help=f"preset: {', '.join(PRESETS)} (default: gpt2-medium on "
                                                  "CUDA, tiny-gpt on CPU)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: " + ", ".join(METHODS))
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=WARMUP_STEPS, help="untimed steps first (compiling, CUDA graphs)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--no-frozen-bf16", action="store_true", help="keep frozen base weights in fp32")
    p.add_argument("--speed", default="default", choices=SPEEDS,
                   help="default: minift train's speed plan per method (CUDA: minift.fast, LoRA merged forward, "
                        "torch.compile under CUDA graphs where the method has no hook between steps; CPU: eager); "
                        "eager: no compile and LoRA's addmm forward on any device")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile every method, or (--no-compile) none (default: the plan decides)")
    p.add_argument("--compile-mode", default=None, choices=COMPILE_MODES,
                   help="torch.compile mode (default: the plan's, reduce-overhead on CUDA: CUDA graphs)")
    p.add_argument("--no-fast", action="store_true",
                   help="minift.fast's pieces off: the reference modules (cast once, fused loss, LoRA forwards), "
                        "clipping and AdamW step")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    p.add_argument("--plain-ce", action="store_true", help="naive loss over full fp32 logits (for comparison)")
    p.add_argument("--lora-targets", default="",
                   help="modules LoRA/DoRA/AdaLoRA adapt (default: every attention and MLP projection, "
                        "q,k,v,o,up,down_proj, and gate_proj on Llama)")
    p.add_argument("--dropout", type=float, default=0.0,
                   help="the model's dropout (GPT, BERT) and LoRA/DoRA's, e.g. 0.1 to match a recipe's run "
                        "(default 0: none; Llama has none)")
    p.add_argument("--max-grad-norm", type=float, default=None,
                   help="clip the gradients to this global norm every step, as a run with that setting does "
                        "(default: no clipping)")
    p.add_argument("--activation-budget", type=float, default=None,
                   help="compiled rows: the share (0, 1] of the saved activations torch.compile keeps, "
                        "recomputing the rest (default: PyTorch's 1.0)")
    p.add_argument("--lora-merged-forward", action=argparse.BooleanOptionalAction, default=None,
                   help="LoRA rows through the merged weight W0 + sBA (minift.fast.lora.enable), or "
                        "(--no-lora-merged-forward) the addmm forward (default: the plan decides, merged on CUDA)")
    p.add_argument("--loss-chunk", type=int, default=None,
                   help="GPT loss: positions per vocabulary projection (default 1024, 4096 with a trained head)")
    p.add_argument("--no-fused-adamw", action="store_true",
                   help="multi-tensor (foreach) AdamW instead of the fused CUDA kernel (for comparison)")
    p.add_argument("--sdpa-math", action="store_true",
                   help="attention through SDPA's math backend instead of flash kernels (for comparison)")
    p.add_argument("--lora-factor-kernel", action="store_true",
                   help="merged LoRA layers: the backward's g B and g^T (A x) in one Triton pass "
                        "(docs/benchmarks.md: what it saves)")
    p.add_argument("--lora-recompute-act", action=argparse.BooleanOptionalAction, default=None,
                   help="merged LoRA on down_proj: the MLP keeps its activation's input, not its output "
                        "(fast.mlp; default: the plan decides, on for compiled rows)")
    p.add_argument("--sync-each-step", action="store_true",
                   help="CUDA timing: wait for the GPU after every step instead of once after the window")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="each method in a fresh process (default: on when a method may be compiled, as on CUDA "
                        "with no --no-compile / --speed eager)")
    p.add_argument("--out", default="runs/bench", help="directory for JSON, Markdown and PNG (with matplotlib); "
                                                       "default: runs/bench under the working directory")
    p.add_argument("--name", default=None, help="file name stem (default: bench-<model>)")
    p.add_argument("--nproc", type=int, default=1,
                   help="N >= 2: run under torchrun on N GPUs of this machine (CUDA only; --batch is the global "
                        "batch) the rows full (data parallel), full-shard (FSDP2) and lora (data parallel), eager, "
                        "and report tokens/s of all ranks and each rank's peak memory (minift.studies.bench_dist; "
                        "--methods picks among full and lora)")
    p.add_argument("--dry-run", action="store_true", help="with --nproc: print the torchrun command, run nothing")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args) -> int:
    import torch

    from minift.studies import bench
    if args.nproc != 1 or args.dry_run:  # on N GPUs under torchrun
        from minift.studies import bench_dist
        return bench_dist.cli(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    _check_cuda(device)
    if not [m for m in args.methods.split(",") if m]:
        raise UsageError("--methods is empty; give a comma-separated subset of the methods")
    tiny = device == "cpu"
    model = args.model or ("tiny-gpt" if tiny else "gpt2-medium")
    cfg = bench.BenchConfig(model=model, methods=tuple(m for m in args.methods.split(",") if m),
                            batch=(2 if tiny else 8) if args.batch is None else args.batch,
                            seq_len=(64 if tiny else 1024) if args.seq_len is None else args.seq_len,
                            steps=args.steps, warmup=args.warmup, device=device,
                            frozen_bf16=not args.no_frozen_bf16, speed=args.speed, fast=not args.no_fast,
                            compile=args.compile, compile_mode=args.compile_mode,
                            checkpointing=args.checkpointing, plain_ce=args.plain_ce,
                            lora_merged_forward=args.lora_merged_forward, isolate=args.isolate,
                            lora_factor_kernel=args.lora_factor_kernel,
                            lora_recompute_act=args.lora_recompute_act,
                            loss_chunk=args.loss_chunk, fused_adamw=not args.no_fused_adamw,
                            sdpa_math=args.sdpa_math, sync_each_step=args.sync_each_step,
                            lora_targets=tuple(t for t in args.lora_targets.split(",") if t),
                            dropout=args.dropout, activation_budget=args.activation_budget,
                            max_grad_norm=args.max_grad_norm)
    name = args.name or f"bench-{model}"
    save = lambda rows: bench.save(rows, Path(args.out), name, bench.meta(cfg))  # noqa: E731
    rows = bench.run(cfg, progress=lambda s: print(s, file=sys.stderr), on_row=save)  # saved after each method
    written = save(rows)
    print(bench.to_markdown(rows))
    print(f"wrote {', '.join(str(p) for p in written)}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------- compare

def add_compare(sub) -> None:
    from minift.methods.registry import METHODS
    from minift.studies.compare_setup import CPU_DEFAULTS, FULL_DEFAULTS
    p = sub.add_parser("compare", help="every method on one task: cost and quality in one table",
                       description="Train every method on the same data, seed and step budget and print one "
                                   "table (trainable parameters, wall time, tokens/s, peak memory, dev/test "
                                   "accuracy and macro-F1); writes JSON, Markdown and PNG under --out. Defaults: "
                                   "MiniLM-L6 on movie-review sentiment, fetched on first use; on CPU a subset "
                                   f"({CPU_DEFAULTS['train_limit']} train sentences, {CPU_DEFAULTS['eval_limit']} dev "
                                   f"and test, max_len {CPU_DEFAULTS['max_len']}, {CPU_DEFAULTS['steps']} steps of "
                                   f"batch {CPU_DEFAULTS['batch_size']}); --full: all data, max_len "
                                   f"{FULL_DEFAULTS['max_len']}, {FULL_DEFAULTS['epochs']} epochs (GPU).")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: " + ", ".join(METHODS))
    p.add_argument("--model", default=None, help="HF-format BERT dir (config.json, model.safetensors, "
                                                  "tokenizer.json); default: MiniLM-L6")
    p.add_argument("--train", default=None, help='JSONL/CSV with "text" and "label" (give --dev and --test too)')
    p.add_argument("--dev", default=None)
    p.add_argument("--test", default=None)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per method (the same for all)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--max-len", type=int, default=None, help="tokens per sentence after truncation")
    p.add_argument("--train-limit", type=int, default=None, help="train on a seeded random subset of N sentences")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N dev and test sentences")
    p.add_argument("--full", action="store_true", help="the whole data, more steps (meant for a GPU)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0, help="the train subset's seed and the first run seed")
    p.add_argument("--seeds", type=int, default=None,
                   help="runs per method, with run seeds SEED, SEED+1, ... (new parameters' init, data order, "
                        "dropout); the table shows means and 95%% intervals (default: 3 with --full, else 1)")
    p.add_argument("--reference", default=None,
                   help="report paired differences to this method (default: full if run, else the first)")
    p.add_argument("--out", default="runs/compare",
                   help="directory for the JSON, Markdown, predictions and PNG (default: runs/compare under "
                        "the current directory)")
    p.add_argument("--name", default=None, help="file name stem (default: compare[-full]-<cpu|cuda>)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at once, each in its own worker process on the same device (a GPU with spare "
                        "capacity: a small model's runs are bound by the host); the table's wall s and tokens/s "
                        "are then measured on shared hardware (default: 1)")
    p.add_argument("--together", action="store_true",
                   help="train LoRA's --seeds runs at once, on one base (train-many: one forward for every seed "
                        "a step; a row's wall s is then the shared run's over the seeds, its tokens/s and peak "
                        "memory the shared run's; dropout masks are drawn over the mixed batch)")
    p.add_argument("--in-process", action="store_true",
                   help="CPU: run every method in this process (faster start; peak RSS is then process-wide)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_compare)


def _cmd_compare(args) -> int:
    import torch

    from minift.studies import compare
    from minift.studies.compare_setup import CPU_DEFAULTS, FULL_DEFAULTS
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    _check_cuda(device)
    if args.jobs > 1 and args.in_process:
        raise ValueError("--jobs N runs each run in its own worker process; drop --in-process (or use --jobs 1)")
    d = dict(FULL_DEFAULTS if args.full else CPU_DEFAULTS)
    for k in ("batch_size", "max_len", "train_limit", "eval_limit"):
        if getattr(args, k) is not None:
            d[k] = getattr(args, k)
    if args.steps is not None:
        d.pop("epochs", None)
        d["steps"] = args.steps
    cfg = compare.CompareConfig(methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
                                model=args.model, train=args.train, dev=args.dev, test=args.test,
                                device=device, seed=args.seed, isolate=not args.in_process,
                                seeds=args.seeds if args.seeds is not None else 3 if args.full else 1,
                                reference=args.reference, jobs=args.jobs, full=args.full, together=args.together,
                                progress=not args.no_progress and args.jobs == 1, **d)
    log = lambda s: print(s, file=sys.stderr)  # noqa: E731
    name = args.name or f"compare{'-full' if args.full else ''}-{'cuda' if device.startswith('cuda') else 'cpu'}"
    saved = []

    def save_partial(rows, meta):  # after each method, so a later failure keeps the finished rows
        saved[:] = [compare.save(rows, meta, Path(args.out), name), len(rows)]

    try:
        rows, meta = compare.run(cfg, log=log, on_row=save_partial)
    except Exception as e:
        if not saved:
            raise
        note = f" (the {saved[1]} finished runs are saved in {', '.join(str(p) for p in saved[0][:2])})"
        msg = (e.args[0] if isinstance(e, KeyError) and e.args else str(e)) + note
        if isinstance(e, (ValueError, KeyError, FileNotFoundError)):
            raise ValueError(msg) from None
        raise RuntimeError(msg) from None
    paths = compare.save(rows, meta, Path(args.out), name)
    print(f"minift compare on {meta['device']}: {meta['examples']} examples, {meta['steps']} steps x "
          f"batch {meta['batch_size']}, max_len {meta['max_len']}, seeds {', '.join(map(str, meta['seeds']))}")
    print(compare.to_text(rows, meta["reference"]), end="")
    print(f"budget: {meta['budget']}")
    print(f"memory: {meta['memory']}")
    log(f"wrote {', '.join(str(p) for p in paths)} ({meta['total_s']:.0f} s in all)")
    return 0

# ---------------------------------------------------------------------------- recommend

def add_recommend(sub) -> None:
    from minift.studies.advisor import LEVELS, TASKS
    from minift.studies.presets import PRESETS
    p = sub.add_parser("recommend", help="which method fits this GPU and suits this task (rule tables + memory estimate)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="HF-format model directory (config.json of a GPT-2 or BERT)")
    src.add_argument("--preset", help=f"model shape: {', '.join(PRESETS)}")
    p.add_argument("--gpu-mem", type=float, required=True, help="GPU memory in GB (GiB)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--task", default="other", help=f"one of: {', '.join(TASKS)}")
    p.add_argument("--complexity", default="medium", help=f"task complexity: {', '.join(LEVELS)}")
    p.add_argument("--data-size", type=int, default=None, help="number of training examples")
    p.add_argument("--similarity", type=float, default=None, help="domain similarity to pre-training, in [0, 1]")
    p.add_argument("--data-quality", default="medium", help=f"one of: {', '.join(LEVELS)}")
    p.add_argument("--nproc", type=int, default=1,
                   help="GPUs (torchrun ranks) to train on: the estimate is then each rank's peak, --batch the "
                        "global batch (batch/N rows per rank), --gpu-mem each GPU's memory (default: 1)")
    p.add_argument("--shard", action="store_true",
                   help="with --nproc N >= 2: full fine-tuning FSDP2-sharded (minift train --shard), the other "
                        "methods data parallel")
    p.add_argument("--json", action="store_true", help="print the answer as JSON")
    p.set_defaults(func=_cmd_recommend)


def _cmd_recommend(args) -> int:
    import json

    from minift.studies import advisor
    from minift.studies.presets import preset
    if args.task not in advisor.TASKS:
        raise UsageError(f"unknown task {args.task!r}; choose from {', '.join(advisor.TASKS)}")
    if args.gpu_mem <= 0 or args.gpu_mem != args.gpu_mem:
        raise UsageError(f"--gpu-mem must be a positive number of GB, got {args.gpu_mem}")
    if args.batch < 1 or args.seq_len < 1:
        raise UsageError(f"--batch and --seq-len must be >= 1, got {args.batch} and {args.seq_len}")
    if args.nproc < 1:
        raise UsageError(f"--nproc must be >= 1, got {args.nproc}")
    if args.shard and args.nproc == 1:
        raise UsageError("--shard needs several GPUs: give --nproc N (N >= 2)")
    if args.batch % args.nproc:
        raise UsageError(f"--batch {args.batch} is the global batch and must divide evenly over --nproc "
                         f"{args.nproc}; use a multiple of {args.nproc}")
    cfg = preset(args.preset) if args.preset else advisor.config_from_dir(args.model)
    rec = advisor.recommend(cfg, args.gpu_mem, args.batch, args.seq_len, args.task, args.complexity,
                            args.data_size, args.similarity, args.data_quality, nproc=args.nproc,
                            shard=args.shard)
    print(json.dumps(rec.to_dict(), indent=1) if args.json else advisor.format_recommendation(rec))
    return 0


# ---------------------------------------------------------------------------- pretrain / codegen-case

def add_pretrain(sub) -> None:
    p = sub.add_parser("pretrain", help="train a BPE tokenizer and pretrain a small GPT or Llama on Python code",
                       description="Byte-level BPE + a small GPT-2 or Llama (default ~23M parameters, see "
                                   "minift.studies.codegen.PretrainConfig) pretrained on the standard library (or a "
                                   "directory of .py files) minus the held-out packages; writes an HF directory "
                                   "(config.json, model.safetensors, tokenizer.json) and corpus.json.")
    p.add_argument("--arch", choices=("gpt2", "llama"), default="gpt2",
                   help="gpt2 (default) or llama (GQA, RoPE, SwiGLU, RMSNorm; transformers' LlamaForCausalLM layout)")
    p.add_argument("--corpus", default="stdlib", help="stdlib (this Python's standard library) or a directory")
    p.add_argument("--out", default="runs/pretrain", help="the model directory to write (default: runs/pretrain "
                                                          "under the working directory)")
    p.add_argument("--held-out", default="asyncio", help="comma-separated packages kept out for fine-tuning")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: what fits in --minutes)")
    p.add_argument("--minutes", type=float, default=7.0, help="training time budget when --steps is not given")
    p.add_argument("--smoke", action="store_true", help="tiny model, tiny corpus, 30 steps (CPU)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_pretrain)


def _codegen_common(args) -> tuple[str, tuple[str, ...] | None]:
    device = args.device or "auto"
    _check_cuda(device)
    if args.corpus != "stdlib" and not Path(args.corpus).is_dir():
        raise UsageError(f"--corpus {args.corpus}: no such directory (give stdlib or a directory of .py files)")
    if args.held_out is None:
        return device, None
    held = tuple(h for h in args.held_out.split(",") if h)
    if not held:
        raise UsageError("--held-out needs at least one package name")
    return device, held


def _cmd_pretrain(args) -> int:
    from minift.studies import codegen
    device, held = _codegen_common(args)
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if not args.minutes > 0:
        raise UsageError(f"--minutes must be > 0, got {args.minutes}")
    kw = dict(codegen.SMOKE_PRETRAIN) if args.smoke else {}
    kw.update(arch=args.arch, minutes=args.minutes, device=device, seed=args.seed, progress=not args.no_progress,
              **({"steps": args.steps} if args.steps else {}))
    rec = codegen.pretrain(args.corpus, args.out, held, codegen.PretrainConfig(**kw),
                           log=lambda s: print(s, file=sys.stderr))
    print(f"wrote {args.out}: {rec['params']:,} parameters, {rec['steps']} steps, final loss {rec['final_loss']:.3f}")
    return 0


def add_codegen_case(sub) -> None:
    p = sub.add_parser("codegen-case", help="pretrain on the stdlib, adapt to a held-out package, score completion",
                       description="Pretrain (or load --pretrained, a `minift pretrain` directory), adapt it to "
                                   "the held-out package with AdaLoRA, LoRA and full fine-tuning, and write a table "
                                   "(trainable parameters, time, perplexity, next-line exact match and ROUGE-L) "
                                   "and the final AdaLoRA rank per layer as JSON, Markdown and (with matplotlib) "
                                   "PNG under --out.")
    p.add_argument("--out", default="runs/codegen-case", help="directory for the results (and pretrained/ when "
                                                              "pretraining; default: runs/codegen-case under the "
                                                              "working directory)")
    p.add_argument("--pretrained", default=None, help="a directory written by `minift pretrain` (GPT-2 or "
                                                      "Llama, read from its config.json)")
    p.add_argument("--corpus", default="stdlib", help="stdlib or a directory (when pretraining here)")
    p.add_argument("--held-out", default=None, help="comma-separated packages to adapt to (default: those "
                                                    "--pretrained held out; asyncio when pretraining here)")
    p.add_argument("--smoke", action="store_true", help="tiny model and data, 30 steps per method (CPU)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per method (default 2000; smoke 30)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--eval-lines", type=int, default=None, help="lines sampled for next-line completion")
    p.add_argument("--methods", default="adalora,lora,full", help="comma-separated subset of adalora, lora, full")
    p.add_argument("--name", default=None, help="file name stem (default: codegen-<cuda|cpu>, codegen-smoke)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_codegen_case)


def _cmd_codegen_case(args) -> int:
    from minift.studies import codegen
    from minift.studies import codegen_case
    device, held = _codegen_common(args)
    if args.pretrained is not None and not Path(args.pretrained).is_dir():
        raise UsageError(f"--pretrained {args.pretrained}: no such directory")
    methods = tuple(m for m in args.methods.split(",") if m)
    bad = [m for m in methods if m not in ("adalora", "lora", "full")]
    if bad or not methods:
        raise UsageError(f"--methods: {bad[0] if bad else 'none given'}; choose from adalora, lora, full")
    kw = dict(codegen_case.SMOKE_CASE) if args.smoke else {}
    for flag in ("steps", "batch_size", "eval_lines"):
        if getattr(args, flag) is not None:
            if getattr(args, flag) < 1:
                raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
            kw[flag] = getattr(args, flag)
    case = codegen_case.CaseConfig(**kw, methods=methods, device=device, progress=not args.no_progress)
    pre = codegen.PretrainConfig(**(codegen.SMOKE_PRETRAIN if args.smoke else {}), device=device,
                                 progress=not args.no_progress)
    res = codegen_case.run_case(args.out, args.pretrained, args.corpus, held, args.smoke, case, pre, args.name,
                           log=lambda s: print(s, file=sys.stderr))
    print(codegen_case.to_markdown(res))
    return 0
