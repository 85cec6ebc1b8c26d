"""`minift train` and `minift eval`: files on disk -> model, data and method -> train / score.

Settings come in layers, each overriding the one before:

    defaults  <  --recipe NAME (minift/recipes/NAME.toml)  <  --config FILE.toml  <  flags

A TOML file has three tables with the same keys as the flags (``--num-virtual-tokens`` is
``num_virtual_tokens``): ``[method]`` (``name`` and the method's options), ``[train]``
(``TrainConfig`` fields: lr, steps or epochs, batch_size, ...) and ``[data]`` (model, train,
dev, task, max_len). ``model = "minilm"`` and ``task = "sentiment"`` (the recipes' values)
name the data ``minift fetch`` downloads; they are only fetched when no path is given.

    --out DIR/
      run.json         what is trained: method + options, task, labels, base model dir
      last/            the resumable checkpoint (``--resume`` continues from it)
      adapter/         the trained weights (model.safetensors: the adapter, or every weight
                       for full fine-tuning) + run.json; LoRA also in PEFT's layout
      model/           full fine-tuning only: an HF-format model directory
      best/            weights at the best dev score, metrics.jsonl, loss.png
"""
from __future__ import annotations

import json
import shutil
import sys
import tomllib
from dataclasses import fields
from pathlib import Path

import torch

from minift.train import TrainConfig

TASKS = ("classification", "causal-lm", "prompt-completion")
# flag name, type, help — every method flag is a field of a method config (or a build_method extra)
METHOD_FLAGS = [
    ("r", int, "LoRA/DoRA rank"), ("alpha", float, "LoRA/AdaLoRA scaling numerator"),
    ("dropout", float, "dropout on the adapter input"), ("targets", "csv", "modules to adapt, e.g. q_proj,v_proj"),
    ("rslora", "flag", "rsLoRA scaling alpha/sqrt(r)"), ("dora", "flag", "DoRA magnitude/direction"),
    ("init", str, "LoRA: default|gaussian|pissa; prefix: random|tokens; prompt: random|vocab|text"),
    ("init_text", str, "prefix/prompt init text"), ("modules_to_save", "csv", "modules trained in full, e.g. classifier"),
    ("lr_ratio", float, "LoRA+: lr of B / lr of A"),
    ("merged_forward", "flag", "LoRA: forward through W0 + sBA, one GEMM per layer (needs dropout 0)"),
    ("init_r", int, "AdaLoRA initial rank"), ("target_r", int, "AdaLoRA average final rank"),
    ("tinit", float, "AdaLoRA warmup steps (< 1: fraction of the run)"),
    ("tfinal", float, "AdaLoRA final steps with a fixed pattern (< 1: fraction)"),
    ("delta_t", float, "AdaLoRA steps between prunes (< 1: fraction)"),
    ("beta1", float, "AdaLoRA importance EMA"), ("beta2", float, "AdaLoRA uncertainty EMA"),
    ("orth_reg_weight", float, "AdaLoRA orthogonal penalty weight"),
    ("num_virtual_tokens", int, "prefix/prompt length"), ("projection_dim", int, "prefix MLP width"),
    ("strategy", str, "freeze: bottom_up|top_down|alternating|ratio|adaptive|layers"),
    ("ratio", float, "freeze: share of layers frozen"), ("task_similarity", float, "freeze: adaptive strategy input"),
    ("layers", "ints", "freeze: layer indices, e.g. 0,1"), ("lr_decay", float, "discriminative lr decay (2.6)"),
    ("unfreeze_every", int, "gradual unfreezing: steps per newly unfrozen layer"),
    ("start_layers", int, "gradual unfreezing: top layers trainable at the start"),
    ("group_size", int, "gradual unfreezing: layers unfrozen at a time"),
]
SKIP = {"out_dir", "resume", "log_path", "progress", "plot"}
TRAIN_KEYS = [f.name for f in fields(TrainConfig) if f.name not in SKIP]
DATA_KEYS = ["model", "train", "dev", "task", "max_len"]
TRAIN_HELP = {"steps": "optimizer steps (or --epochs)", "epochs": "passes over the data (default 1)",
              "grad_accum": "micro-batches per optimizer step", "warmup": ">= 1: steps; < 1: fraction of the run",
              "schedule": "linear | cosine | constant", "eval_every": "steps between dev evaluations (0: at the end)",
              "patience": "early stopping: evaluations without improvement (0: off)",
              "save_every": "steps between checkpoints (0: at the end)", "device": "auto | cpu | cuda",
              "bf16": "bf16 autocast on CUDA (default true)",
              "compile": "torch.compile the model (default false; first steps slower while it compiles)",
              "metric": "dev metric early stopping and best/ track: loss, accuracy, macro_f1, perplexity",
              "higher_is_better": "true for accuracy/F1 (default false: loss)"}
INT_KEYS = ("steps", "batch_size", "grad_accum", "eval_every", "patience", "seed", "save_every")


class InputError(ValueError):
    """Bad usage or input (exit code 2)."""


# ---------------------------------------------------------------------------- flags and settings

def add_train_flags(p) -> None:
    p.add_argument("--model", help="HF-format GPT-2 or BERT directory (config.json, model.safetensors, tokenizer.json)")
    p.add_argument("--train", help=".jsonl/.csv (classification, prompt-completion) or .txt (causal-lm)")
    p.add_argument("--dev", help="held-out file of the same kind, evaluated every --eval-every steps")
    p.add_argument("--task", help=f"{' | '.join(TASKS)} (default classification)")
    p.add_argument("--method", help="full | lora | dora | adalora | prefix | prompt | freeze | bitfit")
    p.add_argument("--out", help="output directory (checkpoints, adapter, metrics)")
    p.add_argument("--resume", action="store_true", help="continue from --out/last")
    p.add_argument("--overwrite", action="store_true",
                   help="start again in an --out that holds a checkpoint (deletes its last/ and best/)")
    p.add_argument("--config", help="TOML file with [method], [train], [data] tables")
    p.add_argument("--recipe", help="a recipe in minift/recipes, e.g. sentiment-lora")
    p.add_argument("--max-len", dest="max_len", type=int, help="tokens per example (causal-lm: block size)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("training (TrainConfig)")
    for f in fields(TrainConfig):
        if f.name in SKIP:
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.name in ("shuffle", "bf16", "compile", "higher_is_better"):
            g.add_argument(flag, dest=f.name, type=_bool, metavar="true|false", help=TRAIN_HELP.get(f.name))
        else:
            g.add_argument(flag, dest=f.name, type=str if f.name in ("schedule", "device", "metric") else
                           int if f.name in INT_KEYS else float, help=TRAIN_HELP.get(f.name))
    g = p.add_argument_group("method options (fields of the method's config)")
    for name, kind, text in METHOD_FLAGS:
        flag = "--" + name.replace("_", "-")
        if kind == "flag":
            g.add_argument(flag, dest=name, action="store_true", default=None, help=text)
        else:
            g.add_argument(flag, dest=name, type={"csv": _csv, "ints": _ints}.get(kind, kind), help=text)


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes"):
        return True
    if s.lower() in ("0", "false", "no"):
        return False
    raise ValueError(f"expected true or false, got {s!r}")


def _csv(s: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in s.split(",") if x.strip())


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in _csv(s))


def read_toml(path, what: str = "config") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist")
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{path}: invalid TOML: {e}") from None
    known = {"method": None, "train": TRAIN_KEYS, "data": DATA_KEYS}
    for table, v in doc.items():
        if not isinstance(v, dict):
            raise InputError(f"{path}: key {table!r} is outside any table; put it under [method], [train] "
                             f"or [data]")
        if table not in known:
            raise InputError(f"{path}: unknown table [{table}]; use [method], [train] and [data]")
        bad = [k for k in v if known[table] is not None and k not in known[table]]
        if bad:
            raise InputError(f"{path}: unknown key {bad[0]!r} in [{table}]; known: {', '.join(known[table])}")
        for k, value in v.items():
            kind = KEY_TYPES[table].get(k)
            if kind is not None and not _is(value, kind):
                raise InputError(f"{path}: [{table}] {k} must be {TYPE_WORDS[kind]}, got {value!r}")
    return doc


# the type of each key of a TOML file: int, float (an int is fine), bool, str, or a list of str / int
TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
              "csv": "a list of strings", "ints": "a list of integers"}
KEY_TYPES = {
    "train": {f.name: {"int": int, "float": float, "bool": bool, "str": str}[str(f.type).split(" |")[0]]
              for f in fields(TrainConfig) if f.name in TRAIN_KEYS},
    "data": {"model": str, "train": str, "dev": str, "task": str, "max_len": int},
    "method": {"name": str, **{n: bool if kind == "flag" else kind for n, kind, _ in METHOD_FLAGS}},
}


def _is(value, kind) -> bool:
    if kind in ("csv", "ints"):
        return isinstance(value, list) and all(_is(x, str if kind == "csv" else int) for x in value)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def settings(args) -> tuple[str, dict, dict, dict]:
    """(method, method options, train options, data options) from recipe < config < flags."""
    layers = []
    if args.recipe:
        from minift.compare_setup import load_recipe
        layers.append(load_recipe(args.recipe))
    if args.config:
        doc = read_toml(args.config)
        here = Path(args.config).parent  # relative data paths in the file are relative to it
        for k in ("model", "train", "dev"):
            v = doc.get("data", {}).get(k)
            if isinstance(v, str) and not Path(v).is_absolute() and (here / v).exists():
                doc["data"][k] = str(here / v)
        layers.append(doc)
    cli = vars(args)
    layers.append({"method": {"name": cli.get("method"), **{n: cli.get(n) for n, _, _ in METHOD_FLAGS}},
                   "train": {k: cli.get(k) for k in TRAIN_KEYS}, "data": {k: cli.get(k) for k in DATA_KEYS}})
    method_opts, train, data = {}, {}, {}
    for layer in layers:
        t = {k: v for k, v in layer.get("train", {}).items() if v is not None}
        if "steps" in t or "epochs" in t:  # a layer giving one of them replaces the other
            train.pop("steps", None), train.pop("epochs", None)
        train.update(t)
        method_opts.update({k: v for k, v in layer.get("method", {}).items() if v is not None})
        data.update({k: v for k, v in layer.get("data", {}).items() if v is not None})
    method = method_opts.pop("name", None)
    if method is None:
        raise InputError("no method: give --method (or [method] name in --config / --recipe)")
    if "steps" not in train and "epochs" not in train:
        train["epochs"] = 1
    return method, method_opts, train, data


# ---------------------------------------------------------------------------- model and data

def resolve_paths(data: dict) -> dict:
    """Named model/data of the recipes (minilm, sentiment) -> fetched paths, only when needed."""
    data = dict(data)
    if data.get("model") == "minilm":  # a local directory of that name: write ./minilm
        from minift.fetch import fetch_minilm
        data["model"] = str(fetch_minilm())
    if data.get("task") == "sentiment":
        data["task"] = "classification"
        if data.get("train") is None:
            from minift.fetch import fetch_sentiment
            d = Path(fetch_sentiment())
            data["train"], data["dev"] = str(d / "train.jsonl"), data.get("dev") or str(d / "dev.jsonl")
    data.setdefault("task", "classification")
    if data["task"] not in TASKS:
        raise InputError(f"unknown task {data['task']!r}; choose one of {', '.join(TASKS)}")
    for k in ("model", "train"):
        if data.get(k) is None:
            raise InputError(f"no --{k} given")
    return data


def load_model(model_dir, task: str, num_labels: int | None = None, seed: int = 0):
    from minift.models import hf
    from minift.models.bert import BertClassifier
    from minift.models.gpt import GPT
    kind = hf.read_config(model_dir).get("model_type")
    torch.manual_seed(seed)  # a new classification head starts the same way every time
    if task == "classification":
        if kind != "bert":
            raise InputError(f"task classification needs a BERT model (model_type 'bert'); {model_dir} is {kind!r}")
        return BertClassifier.from_pretrained(model_dir, num_labels=num_labels)
    if kind != "gpt2":
        raise InputError(f"task {task} needs a GPT-2 model (model_type 'gpt2'); {model_dir} is {kind!r}")
    return GPT.from_pretrained(model_dir)


def examples(path, task: str, tok, max_len: int, label2id=None):
    """(examples, label2id) for one file."""
    from minift import data
    if task == "classification":
        d = data.read_classification(path, label2id)
        return d.tokenize(tok, max_len), d.label2id
    if task == "causal-lm":
        return data.lm_examples(path, tok, max_len), None
    pairs = data.read_prompt_completion(path)
    return data.prompt_completion_examples(pairs, tok, max_len, data.eos_id(tok)), None


def evaluate(model, batches, task: str, device="cpu") -> dict:
    """Mean loss (per example, or per predicted token for GPT) and task metrics."""
    from minift.metrics import classification_metrics, perplexity
    from minift.forward import extend_batch, forward_extended, lm_targets, to_device
    model.eval()
    total, n, gold, pred = 0.0, 0, [], []
    with torch.no_grad():
        for b in batches:
            b = extend_batch(model, to_device(b, device))  # the batch the model reads (soft prompt included)
            out = forward_extended(model, b)
            if task == "classification":
                k = b["labels"].numel()
                gold += b["labels"].tolist()
                pred += out.logits.argmax(-1).tolist()
            else:
                k = lm_targets(b)  # the targets out.loss is the mean over
            total, n = total + out.loss.item() * k, n + k
    loss = total / max(n, 1)
    if task == "classification":
        return {"loss": loss, **classification_metrics(gold, pred)}
    return {"loss": loss, "perplexity": perplexity(loss)}


# ---------------------------------------------------------------------------- commands

def train_command(args) -> int:
    from minift import data as D
    from minift.checkpoint import save_weights
    from minift.compare_setup import method_options
    from minift.methods.build import METHODS, build_method
    from minift.train import train
    method, opts, topts, data = settings(args)
    if method == "probe":
        raise InputError("the probe method is not trained by minift train (its model stays frozen): run "
                         "minift probe --model DIR --data FILE (or minift compare --methods probe)")
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if args.out is None:
        raise InputError("no --out directory given")
    from minift.checkpoint import latest_checkpoint
    overwrite = getattr(args, "overwrite", False)
    if args.resume and overwrite:
        raise InputError("give one of --resume and --overwrite, not both")
    if not args.resume and latest_checkpoint(args.out) is not None and not overwrite:
        raise InputError(f"{args.out} already holds a checkpoint ({latest_checkpoint(args.out)}): "
                         f"pass --resume to continue or --overwrite to start again")
    data = resolve_paths(data)
    task, max_len = data["task"], int(data.get("max_len", 128))
    try:
        cfg = TrainConfig(**topts, out_dir=args.out, resume=args.resume, progress=not args.no_progress)
    except TypeError as e:
        raise InputError(f"bad training option: {e}") from None
    tok = D.load_tokenizer(data["model"])
    train_ex, label2id = examples(data["train"], task, tok, max_len)
    dev_ex = examples(data["dev"], task, tok, max_len, label2id)[0] if data.get("dev") else None
    pad = D.pad_id(tok)
    batches = D.batches(train_ex, cfg.batch_size, shuffle=True, seed=cfg.seed, pad_id=pad)
    dev = D.batches(dev_ex, cfg.batch_size, pad_id=pad) if dev_ex else None
    model = load_model(data["model"], task, len(label2id) if label2id else None, cfg.seed)
    total = cfg.total_steps(len(batches))
    opts = method_options({"method": {"name": method, **opts}}, total)  # AdaLoRA fractions -> steps
    opts = {k: int(v) if k in ("tinit", "tfinal", "delta_t") and float(v).is_integer() else v
            for k, v in opts.items()}
    st = build_method(model, method, opts, tokenizer=tok, lr=cfg.lr, weight_decay=cfg.weight_decay,
                      total_steps=total)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:  # the old run's checkpoints and best weights must not outlive it
        for name in ("last", "last.old", "last.tmp", "best"):
            if (out / name).is_dir():
                shutil.rmtree(out / name)
    run = {"method": method, "options": _jsonable(st.options), "task": task, "max_len": max_len,
           "label2id": label2id, "model": str(Path(data["model"]).resolve()), "train": vars(cfg)}
    (out / "run.json").write_text(json.dumps(run, indent=1) + "\n")
    t, n = st.trainable(model)
    print(f"minift train: {method} on {task}: {t:,} of {n:,} parameters trainable "
          f"({100 * t / n:.2f}%), {total} steps", file=sys.stderr)
    eval_fn = (lambda m: evaluate(m, dev, task, next(m.parameters()).device)) if dev else None
    res = train(model, batches, cfg, eval_fn=eval_fn, **st.train_hooks())
    if res.interrupted:
        print(f"minift train: interrupted at step {res.steps}; checkpoint in {res.checkpoint}; "
              f"continue with --resume", file=sys.stderr)
        return 130
    save_weights(model, out / "adapter")
    shutil.copy(out / "run.json", out / "adapter" / "run.json")
    if method in ("lora", "dora", "adalora", "prefix", "prompt"):  # also as a PEFT adapter
        from minift.adapters import save_adapter
        try:
            save_adapter(model, out / "adapter", layout="peft")
        except (ValueError, NotImplementedError) as e:
            print(f"minift train: no PEFT-layout adapter ({e}); writing minift's layout", file=sys.stderr)
            save_adapter(model, out / "adapter", layout="minift")
    if not st.peft:
        model.save_pretrained(out / "model")
        shutil.copy(Path(data["model"]) / "tokenizer.json", out / "model" / "tokenizer.json")
    summary = {"steps": res.steps, "final_loss": res.losses[-1] if res.losses else None,
               "tokens_per_s": round(res.tokens_per_s, 1), "eval": res.evals[-1] if res.evals else None,
               "stopped_early": res.stopped_early, "out": str(out)}
    print(json.dumps(summary))
    return 0


def eval_command(args) -> int:
    from minift import data as D
    from minift.checkpoint import load_trainable_state
    from minift.methods.build import build_method
    from minift.forward import check_device
    if args.device is not None:
        check_device(args.device)  # before anything is loaded
    adapter = Path(args.adapter)
    if not (adapter / "run.json").is_file() or not (adapter / "model.safetensors").is_file():
        raise FileNotFoundError(f"{adapter} is not a minift adapter directory (no run.json and "
                                f"model.safetensors; it is written by minift train --out DIR as DIR/adapter)")
    run = json.loads((adapter / "run.json").read_text())
    model_dir = args.model or run["model"]
    task, max_len = run["task"], args.max_len or run["max_len"]
    tok = D.load_tokenizer(model_dir)
    ex = examples(args.data, task, tok, max_len, run["label2id"])[0]
    model = load_model(model_dir, task, len(run["label2id"]) if run["label2id"] else None)
    opts = {k: tuple(v) if isinstance(v, list) else v for k, v in run["options"].items()}
    build_method(model, run["method"], opts, tokenizer=tok, lr=run["train"]["lr"])
    load_trainable_state(model, adapter / "model.safetensors")
    device = torch.device(args.device if args.device not in (None, "auto") else
                          "cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    metrics = evaluate(model, D.batches(ex, args.batch_size, pad_id=D.pad_id(tok)), task, device)
    print(json.dumps({"method": run["method"], "task": task, "examples": len(ex), **metrics}))
    return 0


def _jsonable(opts: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in opts.items()}
