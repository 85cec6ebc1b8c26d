"""AdaLoRA against LoRA, minift against transformers + PEFT, on the movie-review sentiment task.

    python benchmarks/adalora_study.py --model weights/minilm-fp16 --data weights/cache/sentiment \\
        --out DIR [--seeds 3] [--jobs 12] [--device cuda] [--runs minift:adalora:2e-2,peft:lora:5e-4,...]

Every run uses the same batches (``minift.studies.compare_setup.load_task``: MiniLM-L6, max_len
64, batch 32, the whole train split), 3 epochs, AdamW (weight decay 0.01) with 10% linear warmup
and linear decay, bf16 autocast on CUDA, and the settings of the issue that asked for this study:

    LoRA     r=16, alpha 32, dropout 0.1 on q,v; the classifier trained in full
    AdaLoRA  init_r 24 -> target_r 16 on q,v (the same final rank budget as LoRA r=16), alpha 32,
             dropout 0.1, tinit 10% and tfinal 20% of the steps, deltaT 10, beta1 = beta2 = 0.85,
             orth_reg_weight 0.1; the classifier trained in full

minift's runs go through ``minift.training.loop.train`` as ``minift compare`` does (its data order:
epoch e is a permutation seeded by (seed, e)); PEFT's through the loop below, in the same data
order, with the optimizer groups the transformers Trainer builds (no weight decay on biases and
LayerNorm weights) and ``update_and_allocate`` after each optimizer step, as PEFT documents.
Each run is its own process (``--jobs`` at once on the device); the default grid is the
comparison at the issue's lr 5e-4 plus an lr sweep for AdaLoRA on both sides.
Writes DIR/adalora-study.json (every run) and DIR/adalora-study.md (mean and 95% t interval over
the seeds of test and dev accuracy).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

BATCH, MAX_LEN, EPOCHS, WARMUP, WD = 32, 64, 3, 0.1, 0.01
LORA = dict(r=16, alpha=32, dropout=0.1, targets=["q_proj", "v_proj"], modules_to_save=["classifier"])
ADALORA = dict(init_r=24, target_r=16, alpha=32, dropout=0.1, targets=["q_proj", "v_proj"], tinit=0.1,
               tfinal=0.2, delta_t=10, beta1=0.85, beta2=0.85, orth_reg_weight=0.1, modules_to_save=["classifier"])
DEFAULT_RUNS = (["minift:lora:5e-4", "peft:lora:5e-4", "minift:lora:1e-3", "peft:lora:1e-3"]
                + [f"{impl}:adalora:{lr}" for impl in ("minift", "peft") for lr in ("5e-4", "2e-3", "1e-2")]
                + [f"minift:adalora:{lr}" for lr in ("1e-3", "5e-3", "2e-2")])


def load(model: str, data: str, device: str, limit: int | None = None):
    from minift.studies.compare_setup import CompareConfig, load_task
    d = Path(data)
    cfg = CompareConfig(model=model, train=str(d / "train.jsonl"), dev=str(d / "dev.jsonl"), test=str(d / "test.jsonl"),
                        batch_size=BATCH, max_len=MAX_LEN, epochs=EPOCHS, train_limit=limit, eval_limit=limit,
                        device=device)
    return load_task(cfg)


def run_minift(task, method: str, lr: float, seed: int, device: str) -> dict:
    from minift.methods.registry import build_method
    from minift.models.bert import BertClassifier
    from minift.training.config import TrainConfig
    from minift.training.evaluate import evaluate
    from minift.training.loop import train
    steps = EPOCHS * len(task.train)
    torch.manual_seed(seed)
    model = BertClassifier.from_pretrained(task.model_dir, num_labels=len(task.labels))
    st = build_method(model, method, dict(LORA if method == "lora" else ADALORA), lr=lr, weight_decay=WD,
                      total_steps=steps)
    tc = TrainConfig(lr=lr, steps=steps, batch_size=BATCH, warmup=WARMUP, schedule="linear", weight_decay=WD,
                     seed=seed, device=device, progress=False, plot=False)
    t0 = time.perf_counter()
    res = train(model, task.train, tc, **st.train_hooks())
    wall = time.perf_counter() - t0
    dev, test = (evaluate(model, getattr(task, s), "classification") for s in ("dev", "test"))
    live = st.allocator.budget if method == "adalora" else None
    return dict(dev_acc=dev["accuracy"], test_acc=test["accuracy"], test_f1=test["macro_f1"],
                final_loss=res.losses[-1], wall_s=wall, live_ranks=live)


def run_peft(task, method: str, lr: float, seed: int, device: str) -> dict:
    from peft import AdaLoraConfig, LoraConfig, get_peft_model
    from transformers import BertForSequenceClassification

    from minift.metrics import classification_metrics
    from minift.training.config import TrainConfig, lr_factor
    from minift.training.feed import batch_at
    steps, dev_ = EPOCHS * len(task.train), torch.device(device)
    torch.manual_seed(seed)
    model = BertForSequenceClassification.from_pretrained(task.model_dir, num_labels=len(task.labels),
                                                          torch_dtype=torch.float32)
    common = dict(target_modules=["query", "value"], lora_dropout=0.1, modules_to_save=["classifier"],
                  task_type="SEQ_CLS")
    if method == "lora":
        pc = LoraConfig(r=16, lora_alpha=32, **common)
    else:
        pc = AdaLoraConfig(init_r=24, target_r=16, lora_alpha=32, tinit=int(0.1 * steps), tfinal=int(0.2 * steps),
                           deltaT=10, beta1=0.85, beta2=0.85, orth_reg_weight=0.1, total_step=steps, **common)
    model = get_peft_model(model, pc).to(dev_)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    no_decay = lambda n: n.endswith("bias") or "LayerNorm" in n  # noqa: E731  (the Trainer's rule)
    groups = [{"params": [p for n, p in named if not no_decay(n)], "weight_decay": WD},
              {"params": [p for n, p in named if no_decay(n)], "weight_decay": 0.0}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, fused=dev_.type == "cuda" or None)
    order = TrainConfig(lr=lr, steps=steps, batch_size=BATCH, seed=seed)  # minift's data order, same seed
    warm = int(WARMUP * steps)
    model.train()
    t0, loss = time.perf_counter(), None
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * lr_factor(step, steps, warm, "linear")
        b = {k: v.to(dev_) for k, v in batch_at(task.train, step, order).items()}
        with torch.autocast(dev_.type, dtype=torch.bfloat16, enabled=dev_.type == "cuda"):
            loss = model(**_hf(b)).loss  # AdaLoRA's forward adds orth_reg_weight * its penalty
        loss.backward()
        opt.step()
        if method == "adalora":
            model.base_model.update_and_allocate(step)
        opt.zero_grad(set_to_none=True)
    wall = time.perf_counter() - t0
    model.eval()
    scores = {}
    for split in ("dev", "test"):
        gold, pred = [], []
        with torch.no_grad(), torch.autocast(dev_.type, dtype=torch.bfloat16, enabled=dev_.type == "cuda"):
            for b in getattr(task, split):
                b = {k: v.to(dev_) for k, v in b.items()}
                pred += model(**{k: v for k, v in _hf(b).items() if k != "labels"}).logits.argmax(-1).tolist()
                gold += b["labels"].tolist()
        scores[split] = classification_metrics(gold, pred)
    live = None
    if method == "adalora":
        live = int(sum((m.lora_E["default"] != 0).sum() for m in model.modules() if hasattr(m, "lora_E")))
    return dict(dev_acc=scores["dev"]["accuracy"], test_acc=scores["test"]["accuracy"],
                test_f1=scores["test"]["macro_f1"], final_loss=float(loss), wall_s=wall, live_ranks=live)


def _hf(b: dict) -> dict:
    keep = ("input_ids", "attention_mask", "token_type_ids", "labels")
    return {k: v for k, v in b.items() if k in keep}


def one(argv: list[str]) -> int:
    """Worker: MODEL DATA DEVICE LIMIT IMPL METHOD LR SEED OUT.json (LIMIT 0: every example)"""
    model, data, device, limit, impl, method, lr, seed, out = argv
    task = load(model, data, device, int(limit) or None)
    fn = run_minift if impl == "minift" else run_peft
    row = dict(impl=impl, method=method, lr=float(lr), seed=int(seed), **fn(task, method, float(lr), int(seed), device))
    Path(out).write_text(json.dumps(row))
    return 0


def summarize(rows: list[dict]) -> str:
    from minift.metrics import mean_interval
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["impl"], r["lr"]), []).append(r)
    lines = ["| method | implementation | lr | seeds | test acc | dev acc | test acc per seed | live ranks | "
             "wall s |", "|---|---|---|---|---|---|---|---|---|"]
    for (method, impl, lr), rs in sorted(groups.items()):
        rs.sort(key=lambda r: r["seed"])

        def cell(key):
            m, h = mean_interval([100 * r[key] for r in rs])
            return f"{m:.1f}" + (f" ± {h:.1f}" if h is not None else "")
        per = ", ".join(f"{100 * r['test_acc']:.1f}" for r in rs)
        live = ", ".join(str(r["live_ranks"]) for r in rs) if rs[0]["live_ranks"] is not None else ""
        lines.append(f"| {method} | {impl} | {lr:g} | {len(rs)} | {cell('test_acc')} | {cell('dev_acc')} | {per} | "
                     f"{live} | {sum(r['wall_s'] for r in rs) / len(rs):.1f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="directory with train/dev/test.jsonl")
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--jobs", type=int, default=8)
    p.add_argument("--device", default="cuda")
    p.add_argument("--limit", type=int, default=0, help="train on N sentences, evaluate on N (a smoke run)")
    p.add_argument("--runs", default=",".join(DEFAULT_RUNS), help="IMPL:METHOD:LR, comma-separated")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    specs = [tuple(s.split(":")) + (seed,) for s in a.runs.split(",") for seed in range(a.seeds)]
    rows, t0 = [], time.perf_counter()

    def go(spec):
        impl, method, lr, seed = spec
        f = out / f"run-{impl}-{method}-{lr}-{seed}.json"
        r = subprocess.run([sys.executable, __file__, "--one", a.model, a.data, a.device, str(a.limit), impl, method, lr, str(seed),
                            str(f)], capture_output=True, text=True)
        if r.returncode != 0 or not f.exists():
            print(f"FAILED {spec}: {r.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            return None
        row = json.loads(f.read_text())
        f.unlink()
        print(f"{impl} {method} lr {lr} seed {seed}: test {100 * row['test_acc']:.1f} "
              f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        return row

    with ThreadPoolExecutor(a.jobs) as pool:
        rows = [r for r in pool.map(go, specs) if r is not None]
    meta = dict(device=torch.cuda.get_device_name() if a.device == "cuda" else "cpu", torch=torch.__version__,
                batch=BATCH, max_len=MAX_LEN, epochs=EPOCHS, warmup=WARMUP, weight_decay=WD, lora=LORA,
                adalora=ADALORA, jobs=a.jobs, limit=a.limit or "every example", total_s=round(time.perf_counter() - t0, 1))
    try:
        import peft
        import transformers
        meta.update(transformers=transformers.__version__, peft=peft.__version__)
    except ImportError:
        pass
    (out / "adalora-study.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    table = summarize(rows)
    (out / "adalora-study.md").write_text("# AdaLoRA study\n\n" + "".join(f"- {k}: {v}\n" for k, v in meta.items())
                                          + "\n" + table)
    print(table)
    return 0 if len(rows) == len(specs) else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        sys.exit(one(sys.argv[2:]))
    sys.exit(main())
