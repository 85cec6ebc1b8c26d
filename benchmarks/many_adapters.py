"""Many LoRA adapters on one GPT-2-medium-shaped base (CUDA): mixed batches and parallel training.

    python benchmarks/many_adapters.py --out DIR [--adapters 8] [--rows 4] [--seq-len 1024] [--steps 12]

Every adapter is LoRA r=8, alpha 16 on all six projections (random base, random tokens; the
adapters' B is moved off zero so every adapter changes the output). Writes DIR/many-adapters.json
and prints a Markdown table.

- forward: one batch of adapters x rows sequences (each adapter's rows together), bf16 weights,
  no grad. minift: a loop over the adapters (``set_active``, then its rows alone), the mixed batch
  on the reference path (``methods/multi_lora.py``: segmented by adapter) and on the fast path
  (``fast/multi_lora.py``: factors gathered per row); PEFT: its ``adapter_names=`` mixed batch
  and a loop over ``set_adapter``. Median of timed repetitions, tokens/s over the batch's tokens.
- decode: greedy generation with a KV cache, 128-token prompts, 64 new tokens, the same rows:
  minift's mixed batch (fast path) against a loop over the adapters; PEFT the same two ways.
- train: ``adapters`` LoRA jobs of batch 2 x seq-len: together in ``train_many`` (one forward and
  backward for all jobs' rows, minift.fast on, as ``minift train-many`` runs on CUDA) against the
  same jobs one after another, each through ``train`` with minift.fast on, eager (the same
  execution mode as ``train_many``). Aggregate tokens/s over the timed steps (after a warm-up
  run); peak memory of the parallel run against one LoRA job of the combined batch plus the
  other adapters' weights, gradients and AdamW state.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from minift import fast  # noqa: E402
from minift.methods import lora  # noqa: E402
from minift.methods.lora import LoRAConfig  # noqa: E402
from minift.methods.multi_lora import add_adapter, mixed_batch, set_active  # noqa: E402
from minift.models.gpt import GPT, GPTConfig  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")
ADAPTER = LoRAConfig(r=8, alpha=16, targets=TARGETS)
GIB = 2 ** 30
DEV = "cuda"
SHAPE = dict(n_layer=24, n_head=16, n_embd=1024)  # GPT-2 medium; --smoke: a tiny one on the CPU


def timed(fn, reps: int = 5, warmup: int = 2) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs (CUDA synchronized around each)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / GIB if DEV == "cuda" else 0.0


def reset_peak() -> None:
    sync()
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()


def base(seq_len: int) -> GPT:
    torch.manual_seed(0)
    return GPT(dataclasses.replace(GPTConfig(**SHAPE), dropout=0.0,
                                   block_size=max(1024, seq_len)))


def with_adapters(model: GPT, k: int) -> list[str]:
    names = [f"a{i}" for i in range(k)]
    for n in names:
        add_adapter(model, n, ADAPTER)
    with torch.no_grad():
        for pn, p in model.named_parameters():
            if "lora_B" in pn:
                p.normal_(0, 0.01)
    return names


def minift_forward(a, names, ids, rows) -> dict:
    model = base(a.seq_len)
    with_adapters(model, len(names))
    model = model.to(DEV, torch.bfloat16).eval()
    per_row = [n for n in names for _ in range(rows)]
    res = {}
    with torch.no_grad():
        def loop():
            for i, n in enumerate(names):
                set_active(model, n)
                model(ids[i * rows:(i + 1) * rows])
            set_active(model, None)
        res["loop over adapters"] = timed(loop)

        def mixed():
            with mixed_batch(model, per_row):
                model(ids)
        res["mixed batch, reference (segmented)"] = timed(mixed)
        fast.multi_lora.enable(model)
        res["mixed batch, fast (gathered)"] = timed(mixed)
        prompt = ids[:, :128]
        gen = lambda m, p: m.generate(p, max_new_tokens=a.new_tokens, temperature=0)  # noqa: E731

        def decode_mixed():
            with mixed_batch(model, per_row):
                gen(model, prompt)

        def decode_loop():
            for i, n in enumerate(names):
                set_active(model, n)
                gen(model, prompt[i * rows:(i + 1) * rows])
            set_active(model, None)
        dec = {"decode: mixed batch, fast (gathered)": timed(decode_mixed, 2, 1),
               "decode: loop over adapters": timed(decode_loop, 2, 1)}
    return res, dec


def peft_forward(a, names, ids, rows) -> tuple[dict, dict]:
    import transformers
    from peft import LoraConfig, get_peft_model
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from peft_baseline import peft_targets
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**SHAPE,
                                                              n_positions=max(1024, a.seq_len)))
    pc = LoraConfig(r=8, lora_alpha=16, target_modules=peft_targets(TARGETS, "gpt2"), fan_in_fan_out=True)
    model = get_peft_model(hf, pc, adapter_name=names[0])
    for n in names[1:]:
        model.add_adapter(n, pc)
    with torch.no_grad():
        for pn, p in model.named_parameters():
            if "lora_B" in pn:
                p.normal_(0, 0.01)
    model = model.to(DEV, torch.bfloat16).eval()
    per_row = [n for n in names for _ in range(rows)]
    res = {}
    with torch.no_grad():
        res["PEFT mixed batch (adapter_names=)"] = timed(lambda: model(input_ids=ids, adapter_names=per_row))

        def loop():
            for i, n in enumerate(names):
                model.set_adapter(n)
                model(input_ids=ids[i * rows:(i + 1) * rows])
        res["PEFT loop over adapters"] = timed(loop)
        prompt = ids[:, :128]
        kw = dict(max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, do_sample=False, pad_token_id=0)
        dec = {"decode: PEFT mixed batch (adapter_names=)": timed(
            lambda: model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                   adapter_names=per_row, **kw), 2, 1)}

        def decode_loop():
            for i, n in enumerate(names):
                model.set_adapter(n)
                p = prompt[i * rows:(i + 1) * rows]
                model.generate(input_ids=p, attention_mask=torch.ones_like(p), **kw)
        dec["decode: PEFT loop over adapters"] = timed(decode_loop, 2, 1)
    return res, dec


def train_jobs(a, k: int) -> dict:
    from minift.training.config import TrainConfig
    from minift.training.loop import train
    from minift.training.many import Job, add_jobs, train_many
    g = torch.Generator().manual_seed(1)
    data = [[{"input_ids": (t := torch.randint(0, 50257, (2, a.seq_len), generator=g)), "labels": t.clone()}
             for _ in range(4)] for _ in range(k)]
    cfg = lambda seed, steps: TrainConfig(lr=1e-4, steps=steps, batch_size=2, seed=seed, device=DEV,  # noqa: E731
                                          progress=False, plot=False)
    cpu_base = base(a.seq_len)
    out = {}

    def parallel(steps: int):
        model = copy.deepcopy(cpu_base)
        jobs = [Job(f"j{i}", ADAPTER, data[i], cfg(i, steps)) for i in range(k)]
        add_jobs(model, jobs)
        model.to(DEV)
        fast.enable(model)
        reset_peak()
        t0 = time.perf_counter()
        train_many(model, jobs, DEV)
        sync()
        wall = time.perf_counter() - t0
        n_adapter = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        del model
        return wall, peak_gib(), n_adapter

    parallel(2)  # warm-up: kernels, allocator
    wall, peak, n_adapter = parallel(a.steps)
    tokens = k * a.steps * 2 * a.seq_len
    out["parallel"] = dict(tokens_per_s=tokens / wall, wall_s=wall, peak_gib=peak)

    def one_job(i: int, steps: int, rows_data):
        model = copy.deepcopy(cpu_base)
        lora.apply(model, ADAPTER)
        model.to(DEV)
        fast.enable(model)
        reset_peak()
        t0 = time.perf_counter()
        train(model, rows_data, cfg(i, steps))
        sync()
        wall = time.perf_counter() - t0
        del model
        return wall, peak_gib()

    one_job(0, 2, data[0])  # warm-up
    walls = [one_job(i, a.steps, data[i])[0] for i in range(k)]
    out["sequential"] = dict(tokens_per_s=tokens / sum(walls), wall_s=sum(walls))
    combined = [{key: torch.cat([data[i][j][key] for i in range(k)]) for key in ("input_ids", "labels")}
                for j in range(2)]
    _, peak16 = one_job(0, 3, combined)
    per_adapter_state = n_adapter / k * 4 * 4 / GIB  # fp32 weights, gradients, AdamW's two moments
    out["one job of the combined batch"] = dict(rows=2 * k, peak_gib=peak16)
    out["memory budget"] = dict(peak_gib=peak16 + k * per_adapter_state,
                                note=f"one job of {2 * k} rows + {k} adapters' weights, grads and AdamW state")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--rows", type=int, default=4, help="rows per adapter in the mixed batch")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=12, help="timed optimizer steps per training job")
    p.add_argument("--parts", default="forward,peft,train")
    p.add_argument("--smoke", action="store_true", help="a tiny model on the CPU (checks the script runs)")
    a = p.parse_args()
    global DEV
    if a.smoke:
        DEV = "cpu"
        SHAPE.update(n_layer=2, n_head=2, n_embd=32)
    parts = set(a.parts.split(","))
    k, rows = a.adapters, a.rows
    names = [f"a{i}" for i in range(k)]
    ids = torch.randint(0, 50257, (k * rows, a.seq_len), generator=torch.Generator().manual_seed(0)).to(DEV)
    fwd, dec, result = {}, {}, {}
    if "forward" in parts:
        f, d = minift_forward(a, names, ids, rows)
        fwd.update(f), dec.update(d)
        torch.cuda.empty_cache() if DEV == "cuda" else None
    if "peft" in parts:
        f, d = peft_forward(a, names, ids, rows)
        fwd.update(f), dec.update(d)
        torch.cuda.empty_cache() if DEV == "cuda" else None
    n_fwd, n_dec = k * rows * a.seq_len, k * rows * a.new_tokens
    result["forward"] = {n: dict(ms=1e3 * s, tokens_per_s=n_fwd / s) for n, s in fwd.items()}
    result["decode"] = {n: dict(ms=1e3 * s, new_tokens_per_s=n_dec / s) for n, s in dec.items()}
    if "train" in parts:
        result["train"] = train_jobs(a, k)
    import peft
    import transformers
    result["meta"] = dict(device=torch.cuda.get_device_name() if DEV == "cuda" else "cpu", torch=torch.__version__,
                          transformers=transformers.__version__, peft=peft.__version__, adapters=k,
                          rows_per_adapter=rows, seq_len=a.seq_len, new_tokens=a.new_tokens, steps=a.steps,
                          lora="r=8, alpha 16, all six projections")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "many-adapters.json").write_text(json.dumps(result, indent=1))
    print(f"## {k} adapters x {rows} rows x {a.seq_len} tokens, {result['meta']['device']}\n")
    print("| forward (no grad, bf16) | ms | tokens/s |\n|---|---|---|")
    for n, r in result["forward"].items():
        print(f"| {n} | {r['ms']:.1f} | {r['tokens_per_s']:,.0f} |")
    print(f"\n| decode ({a.new_tokens} new tokens after 128) | ms | new tokens/s |\n|---|---|---|")
    for n, r in result["decode"].items():
        print(f"| {n} | {r['ms']:.0f} | {r['new_tokens_per_s']:,.0f} |")
    if "train" in result:
        t = result["train"]
        print(f"\n| train: {k} jobs of batch 2 | tokens/s | peak GiB |\n|---|---|---|")
        print(f"| together (train_many) | {t['parallel']['tokens_per_s']:,.0f} | {t['parallel']['peak_gib']:.2f} |")
        print(f"| one after another (train) | {t['sequential']['tokens_per_s']:,.0f} | |")
        print(f"| one job of {2 * k} rows | | {t['one job of the combined batch']['peak_gib']:.2f} |")
        print(f"| budget: {t['memory budget']['note']} | | {t['memory budget']['peak_gib']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
