"""The peer side by side: the same shapes as `minift bench` through transformers + peft.

transformers and peft are oracles and baselines only, so this lives here, not in minift/.

The fair peer is the one PEFT users run: for adapter methods the frozen base is loaded in bf16
(``--base-dtype bf16``, the default) and the trainable weights are fp32, under bf16 autocast like
minift. ``--base-dtype fp32`` keeps the older, slower and larger peer (an fp32 base); its rows are
labelled ``fp32-base``. Full fine-tuning trains an fp32 model either way. LoRA targets are
minift bench's (``--lora-targets``; default: every projection, ``bench.default_lora_targets``)
under transformers' names: q/k/v_proj -> GPT-2's fused ``c_attn``, o_proj -> ``attn.c_proj``,
up_proj -> ``c_fc``, down_proj -> ``mlp.c_proj`` (BERT: query, key, value, attention.output.dense,
intermediate.dense, output.dense); Llama's modules have minift's names (gate_proj included).

The model is transformers' own class with the preset's shapes, randomly initialized (weights do
not change speed; nothing is downloaded): GPT2LMHeadModel, BertForSequenceClassification, or
LlamaForCausalLM (``--model llama-1b`` or ``llama-350m``; ``tiny-llama`` for a CPU check) built
from a transformers LlamaConfig of the preset's shapes, its attention through SDPA as minift's.
On a machine without CUDA everything runs on the CPU in fp32 (a smoke test, as ``minift bench``'s).

    python benchmarks/peft_baseline.py --model gpt2-medium --methods full,lora,adalora,prefix,prompt \\
        [--compile [--compile-mode reduce-overhead] [--no-eager]] [--batch 8 --seq-len 1024] --out benchmarks/results --name peft-gpt2-medium
    python benchmarks/peft_baseline.py --model tiny-llama --device cpu --batch 2 --seq-len 64 --steps 2 --warmup 1
"""
from __future__ import annotations

import argparse
from dataclasses import replace
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minift.studies import bench, bench_report  # noqa: E402
from minift.studies import bench_timing  # noqa: E402
from minift.models.gpt import GPTConfig  # noqa: E402
from minift.models.llama import LlamaConfig  # noqa: E402


GPT2_TARGETS = {"q_proj": "c_attn", "k_proj": "c_attn", "v_proj": "c_attn", "o_proj": "attn.c_proj",
                "up_proj": "c_fc", "down_proj": "mlp.c_proj"}
BERT_TARGETS = {"q_proj": "query", "k_proj": "key", "v_proj": "value", "o_proj": "attention.output.dense",
                "up_proj": "intermediate.dense", "down_proj": r"layer\.\d+\.output\.dense"}


def peft_targets(minift_targets, kind: str) -> list[str]:
    """transformers' module names for minift's LoRA targets on a ``kind`` ("gpt2", "bert" or
    "llama") model (order kept, duplicates dropped)."""
    if kind == "llama":  # transformers' Llama uses minift's names
        return list(dict.fromkeys(minift_targets))
    names = GPT2_TARGETS if kind == "gpt2" else BERT_TARGETS
    return list(dict.fromkeys(names[t] for t in minift_targets))


def hf_llama(mc, device: str):
    """transformers' LlamaForCausalLM with the shapes of minift's LlamaConfig ``mc``, randomly
    initialized on ``device`` (a 1B model's initialization on the CPU alone takes many seconds)."""
    import transformers
    if mc.qkv_bias or mc.rope_scaling is not None:
        raise ValueError("the peer's Llama takes presets without q/k/v-only biases and without RoPE scaling")
    hcfg = transformers.LlamaConfig(
        vocab_size=mc.vocab_size, hidden_size=mc.n_embd, intermediate_size=mc.n_inner, num_hidden_layers=mc.n_layer,
        num_attention_heads=mc.n_head, num_key_value_heads=mc.n_kv_head, head_dim=mc.head_dim,
        max_position_embeddings=mc.max_position_embeddings, rms_norm_eps=mc.rms_norm_eps, rope_theta=mc.rope_theta,
        tie_word_embeddings=mc.tie_word_embeddings, attention_bias=mc.attention_bias, mlp_bias=mc.mlp_bias,
        attention_dropout=0.0, attn_implementation="sdpa")
    with torch.device(device):
        return transformers.LlamaForCausalLM(hcfg)


def run_peft(cfg: bench.BenchConfig, method: str, compile_: bool = False, mode: str = "default",
             base_dtype: str = "bf16") -> bench_report.Row:
    """The same shapes through transformers + peft (imported only here, only when asked)."""
    import peft
    import transformers

    torch.manual_seed(cfg.seed)
    mc = bench.PRESETS[cfg.model]
    kind = "gpt2" if isinstance(mc, GPTConfig) else "llama" if isinstance(mc, LlamaConfig) else "bert"
    if kind == "llama":
        model = hf_llama(mc, cfg.device)
        task = peft.TaskType.CAUSAL_LM
    elif kind == "gpt2":
        hcfg = transformers.GPT2Config(vocab_size=mc.vocab_size, n_positions=mc.block_size, n_embd=mc.n_embd,
                                       n_layer=mc.n_layer, n_head=mc.n_head, resid_pdrop=0.0,
                                       embd_pdrop=0.0, attn_pdrop=0.0)
        model = transformers.GPT2LMHeadModel(hcfg)
        task = peft.TaskType.CAUSAL_LM
    else:
        hcfg = transformers.BertConfig(vocab_size=mc.vocab_size, max_position_embeddings=mc.max_position_embeddings,
                                       type_vocab_size=mc.type_vocab_size, num_hidden_layers=mc.n_layer,
                                       num_attention_heads=mc.n_head, hidden_size=mc.n_embd,
                                       intermediate_size=mc.n_inner, layer_norm_eps=mc.layer_norm_eps,
                                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2)
        model = transformers.BertForSequenceClassification(hcfg)
        task = peft.TaskType.SEQ_CLS
    targets = peft_targets(cfg.lora_targets, kind)
    if kind == "bert" and any(t == BERT_TARGETS["down_proj"] for t in targets):  # a regex must match whole names
        targets = r".*(" + "|".join(targets) + ")$"
    # bf16 needs autocast, which bench runs on CUDA only: on the CPU the base stays fp32
    base_dtype = base_dtype if cfg.device.startswith("cuda") else "fp32"
    frozen_base = method != "full" and base_dtype == "bf16"
    if frozen_base:
        model.to(torch.bfloat16)  # what PEFT users load; get_peft_model keeps the adapter in fp32
    if method == "lora":
        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets,
                                                           task_type=task))
    elif method == "adalora":
        model = peft.get_peft_model(model, peft.AdaLoraConfig(
            init_r=12, target_r=8, lora_alpha=32, target_modules=targets, task_type=task, tinit=0,
            tfinal=0, deltaT=1, total_step=cfg.warmup + cfg.steps + 1))
    elif method == "prefix":
        model = peft.get_peft_model(model, peft.PrefixTuningConfig(num_virtual_tokens=bench.VIRTUAL_TOKENS,
                                                                   task_type=task))
    elif method == "prompt":
        model = peft.get_peft_model(model, peft.PromptTuningConfig(num_virtual_tokens=bench.VIRTUAL_TOKENS,
                                                                   task_type=task))
    elif method != "full":
        raise ValueError(f"no PEFT counterpart for {method!r}")
    model.to(cfg.device).train()
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # trainable weights in fp32 (AdamW's master copy)
    T = cfg.seq_len - (bench.VIRTUAL_TOKENS if method in ("prefix", "prompt") else 0)
    g = torch.Generator().manual_seed(cfg.seed)
    ids = torch.randint(0, mc.vocab_size, (cfg.batch, T), generator=g).to(cfg.device)
    labels = ids if kind != "bert" else torch.randint(0, 2, (cfg.batch,), generator=g).to(cfg.device)
    fwd = torch.compile(model, mode=mode) if compile_ else model
    graphs = compile_ and mode == "reduce-overhead"
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=cfg.device.startswith("cuda"))

    def step(i):
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with bench._autocast(cfg.device):
            loss = fwd(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        loss.backward()
        if cfg.max_grad_norm is not None:  # as the transformers Trainer clips (torch's clip_grad_norm_)
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        if method == "adalora":
            model.base_model.update_and_allocate(i)
        opt.zero_grad(set_to_none=True)

    ms, peak, times = bench_timing.time_steps(step, replace(cfg, compile=compile_, compile_mode=mode))
    trainable, total = bench.count_trainable(model)
    variant = ("compile" if mode == "default" else f"compile:{mode}") if compile_ else "eager"
    if method != "full":
        variant += f"+{base_dtype}-base"
    if cfg.max_grad_norm is not None:
        variant += f"+clip{cfg.max_grad_norm:g}"
    if cfg.sync_each_step and cfg.device.startswith("cuda"):
        variant += "+sync_each_step"
    row = bench_report.Row("peft", cfg.model, method, variant, bench._device_name(cfg.device),
              "bf16-autocast", cfg.batch, cfg.seq_len, trainable, total, ms,
              cfg.batch * cfg.seq_len / (ms / 1e3), peak, float("nan"),
              extra={"transformers": transformers.__version__, "peft": peft.__version__,
                     "step_ms_each": [round(t, 2) for t in times]})
    del model, fwd, opt
    if cfg.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2-medium")
    p.add_argument("--methods", default="full,lora,adalora,prefix,prompt")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--lora-targets", default="",
                   help="in minift's names (default: every projection of the model, as minift bench)")
    p.add_argument("--compile", action="store_true", help="also run each method under torch.compile")
    p.add_argument("--compile-mode", default="default", choices=bench.COMPILE_MODES)
    p.add_argument("--no-eager", action="store_true", help="with --compile: the compiled rows only")
    p.add_argument("--sync-each-step", action="store_true",
                   help="CUDA timing: wait for the GPU after every step (as minift bench --sync-each-step)")
    p.add_argument("--max-grad-norm", type=float, default=None,
                   help="clip the gradients to this global norm every step (as minift bench --max-grad-norm)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--name", default=None)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--base-dtype", default="bf16", choices=("bf16", "fp32"),
                   help="the frozen base's dtype for adapter methods (default bf16: what PEFT users load)")
    a = p.parse_args()
    cfg = bench.BenchConfig(model=a.model, methods=(), batch=a.batch, seq_len=a.seq_len, steps=a.steps,
                            warmup=a.warmup,
                            device=a.device or ("cuda" if torch.cuda.is_available() else "cpu"),
                            lora_targets=tuple(t for t in a.lora_targets.split(",") if t),
                            sync_each_step=a.sync_each_step, max_grad_norm=a.max_grad_norm)
    rows = []
    for m in a.methods.split(","):
        for c in ((True,) if a.no_eager else (False, True)) if a.compile else (False,):
            print(f"peft {cfg.model} {m}{' compiled' if c else ''}", file=sys.stderr)
            rows.append(run_peft(cfg, m, compile_=c, mode=a.compile_mode, base_dtype=a.base_dtype))
            bench.add_ratios(rows)  # saved after each row: a run cut off by a time limit keeps what finished
            bench.save(rows, Path(a.out), a.name or f"peft-{a.model}", bench.meta(cfg))
    print(bench.to_markdown(rows))


if __name__ == "__main__":
    main()
