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

import hashlib
import json
import math
import shutil
import sys
import tomllib
from dataclasses import fields
from pathlib import Path

import torch

from minift.files import InputError, field, read_json, read_text
from minift.metrics import AVERAGES
from minift.training.loop import TrainConfig

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


# The dev metrics each task's evaluation reports (``evaluate``): what --metric may name.
TASK_METRICS = {"classification": ("loss", "accuracy", *(f"{a}_{m}" for a in AVERAGES
                                                         for m in ("precision", "recall", "f1"))),
                "causal-lm": ("loss", "perplexity"), "prompt-completion": ("loss", "perplexity")}
# TrainConfig fields a --resume may change: the length of the run, when it evaluates and saves,
# and where and how fast it runs. Everything else must match the run being continued.
RESUMABLE_CHANGES = ("steps", "epochs", "eval_every", "save_every", "patience", "device", "bf16", "compile")
# What minift train writes under --out; --overwrite (or a fresh start in an earlier run's
# directory) removes these and nothing else.
RUN_OUTPUTS = ("run.json", "metrics.jsonl", "loss.png", "last", "last.old", "last.tmp", "best", "best.old",
               "best.tmp", "adapter", "model")


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
    try:
        doc = tomllib.loads(read_text(path, f"{what} file"))
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
            if isinstance(value, float) and not math.isfinite(value):
                raise InputError(f"{path}: [{table}] {k} must be a finite number, got {value}")
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
        from minift.studies.compare_setup import load_recipe
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
    for k, v in cli.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise InputError(f"--{k.replace('_', '-')} must be a finite number, got {v}")
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
        from minift.training.fetch import fetch_minilm
        data["model"] = str(fetch_minilm())
    if data.get("task") == "sentiment":
        data["task"] = "classification"
        if data.get("train") is None:
            from minift.training.fetch import fetch_sentiment
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
    from minift.training import data
    if task == "classification":
        d = data.read_classification(path, label2id)
        return d.tokenize(tok, max_len), d.label2id
    if task == "causal-lm":
        return data.lm_examples(path, tok, max_len), None
    pairs = data.read_prompt_completion(path)
    return data.prompt_completion_examples(pairs, tok, max_len, data.eos_id(tok)), None


def evaluate(model, batches, task: str) -> dict:
    """Mean loss (per example, or per predicted token for GPT) and task metrics, computed on the
    device the model is on."""
    from minift.metrics import classification_metrics, perplexity
    from minift.training.forward import extend_batch, forward_extended, lm_targets, to_device
    device = next(model.parameters()).device
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
    """``minift train``: check every setting and file, then prepare --out, train and save.
    Nothing in --out changes until every check has passed."""
    from minift.training import data as D
    from minift.studies.compare_setup import method_options
    from minift.methods.build import METHODS, build_method
    from minift.training.loop import train
    method, opts, topts, data = settings(args)
    if method == "probe":
        raise InputError("the probe method is not trained by minift train (its model stays frozen): run "
                         "minift probe --model DIR --data FILE (or minift compare --methods probe)")
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if args.out is None:
        raise InputError("no --out directory given")
    out, overwrite = Path(args.out), getattr(args, "overwrite", False)
    check_out(out, args.resume, overwrite)
    data = resolve_paths(data)
    task, max_len = data["task"], int(data.get("max_len", 128))
    if max_len < 1:
        raise InputError(f"--max-len must be >= 1, got {max_len}")
    topts.setdefault("device", "auto")  # the command runs on CUDA when there is one
    try:
        cfg = TrainConfig(**topts, out_dir=str(out), resume=args.resume, progress=not args.no_progress)
    except TypeError as e:
        raise InputError(f"bad training option: {e}") from None
    if cfg.metric not in TASK_METRICS[task]:
        raise InputError(f"--metric {cfg.metric!r} is not reported for task {task}; choose one of "
                         f"{', '.join(TASK_METRICS[task])}")
    tok = D.load_tokenizer(data["model"])
    train_ex, label2id = examples(data["train"], task, tok, max_len)
    dev_ex = examples(data["dev"], task, tok, max_len, label2id)[0] if data.get("dev") else None
    pad = D.pad_id(tok)
    batches = D.batches(train_ex, cfg.batch_size, shuffle=True, seed=cfg.seed, pad_id=pad)
    dev = D.batches(dev_ex, cfg.batch_size, pad_id=pad) if dev_ex else None
    model = load_model(data["model"], task, len(label2id) if label2id else None, cfg.seed)
    total = cfg.total_steps(len(batches))
    resolved = method_options({"method": {"name": method, **opts}}, total)  # AdaLoRA fractions -> steps
    resolved = {k: int(v) if k in ("tinit", "tfinal", "delta_t") and float(v).is_integer() else v
                for k, v in resolved.items()}
    st = build_method(model, method, resolved, tokenizer=tok, lr=cfg.lr, weight_decay=cfg.weight_decay,
                      total_steps=total)
    run = {"method": method, "options": _jsonable(st.options), "task": task, "max_len": max_len,
           "label2id": label2id, "model": str(Path(data["model"]).resolve()), "train": vars(cfg),
           "given": _identity(method, opts, task, max_len, data, cfg)}
    if args.resume:
        check_resume(out, run["given"])
    elif overwrite or (out / "run.json").is_file():  # a fresh start: no file of the earlier run survives
        clear_outputs(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps(run, indent=1) + "\n")
    t, n = st.trainable(model)

    def started(step: int) -> None:  # once a checkpoint to resume has loaded: no line before an error
        print(f"minift train: {method} on {task}: {t:,} of {n:,} parameters trainable ({100 * t / n:.2f}%), "
              f"{total} steps" + (f", resuming after step {step}" if step else ""), file=sys.stderr)
    eval_fn = (lambda m: evaluate(m, dev, task)) if dev else None
    res = train(model, batches, cfg, eval_fn=eval_fn, on_start=started, **st.train_hooks())
    if res.interrupted:
        print(f"minift train: interrupted at step {res.steps}; checkpoint in {res.checkpoint}; "
              f"continue with --resume", file=sys.stderr)
        return 130
    save_outputs(model, out, method, st.peft, data["model"])
    summary = {"steps": res.steps, "final_loss": res.losses[-1] if res.losses else None,
               "tokens_per_s": round(res.tokens_per_s, 1), "eval": res.evals[-1] if res.evals else None,
               "stopped_early": res.stopped_early, "out": str(out)}
    print(json.dumps(summary))
    return 0


def check_out(out: Path, resume: bool, overwrite: bool) -> None:
    """--out must be a directory that is new, empty, or an earlier minift run; a run that holds a
    checkpoint continues only with --resume or starts again only with --overwrite."""
    from minift.training.checkpoint import latest_checkpoint
    if resume and overwrite:
        raise InputError("give one of --resume and --overwrite, not both")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; give a directory (new, empty, or an earlier run's)")
    if resume or overwrite or not out.is_dir():
        return
    if latest_checkpoint(out) is not None:
        raise InputError(f"{out} already holds a checkpoint ({latest_checkpoint(out)}): pass --resume to "
                         f"continue or --overwrite to start again")
    if any(out.iterdir()) and not (out / "run.json").is_file():
        raise InputError(f"--out {out} holds files but no minift run (no run.json); choose a new or empty "
                         f"directory, or pass --overwrite to write minift's files beside them")


def clear_outputs(out: Path) -> None:
    """Remove what an earlier ``minift train`` wrote to ``out`` (``RUN_OUTPUTS``), nothing else."""
    for name in RUN_OUTPUTS:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def _identity(method: str, opts: dict, task: str, max_len: int, data: dict, cfg: TrainConfig) -> dict:
    """What a resumed run must share with the run it continues: the method and its settings as
    given, the task, the model, the data files' contents, and the training settings that
    ``RESUMABLE_CHANGES`` does not list."""
    files = {k: {"path": str(Path(data[k]).resolve()), "sha256": _sha256(data[k])}
             for k in ("train", "dev") if data.get(k)}
    skip = {*RESUMABLE_CHANGES, "out_dir", "resume", "log_path", "progress", "plot"}
    return {"method": method, "options": _jsonable(opts), "task": task, "max_len": max_len,
            "model": str(Path(data["model"]).resolve()), "data": files,
            "train": {k: v for k, v in vars(cfg).items() if k not in skip}}


def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_resume(out: Path, given: dict) -> None:
    """Refuse a --resume whose settings differ from the run in ``out`` (see ``_identity``)."""
    if not (out / "run.json").is_file():
        return  # nothing to continue: --resume starts the run
    saved = read_json(out / "run.json", "run record").get("given")
    if not isinstance(saved, dict):
        raise InputError(f"{out / 'run.json'}: no record of the run's settings (written by an older minift); "
                         f"start again with --overwrite")
    for what, mine in given.items():
        theirs = saved.get(what)
        if theirs == mine:
            continue
        if what == "data":
            for k in sorted(set(mine) | set(theirs or {})):
                a, b = (theirs or {}).get(k), mine.get(k)
                if (a or {}).get("sha256") != (b or {}).get("sha256"):
                    raise InputError(f"--resume: --{k} differs from the run in {out} ({a and a['path']} then, "
                                     f"{b and b['path']} now, contents differ); resume with the same data or "
                                     f"start again with --overwrite")
            continue
        if isinstance(mine, dict) and isinstance(theirs, dict):
            k = next(k for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k))
            raise InputError(f"--resume: --{k.replace('_', '-')} differs from the run in {out} "
                             f"({theirs.get(k)!r} then, {mine.get(k)!r} now); only "
                             f"{', '.join('--' + c.replace('_', '-') for c in RESUMABLE_CHANGES)} may change")
        raise InputError(f"--resume: the {what} differs from the run in {out} ({theirs!r} then, {mine!r} now); "
                         f"resume with the same settings or start again with --overwrite")


def save_outputs(model, out: Path, method: str, peft: bool, model_dir) -> None:
    """The trained weights as ``out/adapter`` (+ PEFT's layout where it has one) and, for full
    fine-tuning, an HF-format ``out/model``."""
    from minift.training.checkpoint import save_weights
    save_weights(model, out / "adapter")
    shutil.copy(out / "run.json", out / "adapter" / "run.json")
    if method in ("lora", "dora", "adalora", "prefix", "prompt"):  # also as a PEFT adapter
        from minift.adapters import save_adapter
        try:
            save_adapter(model, out / "adapter", layout="peft")
        except (ValueError, NotImplementedError) as e:
            print(f"minift train: no PEFT-layout adapter ({e}); writing minift's layout", file=sys.stderr)
            save_adapter(model, out / "adapter", layout="minift")
    if not peft:
        model.save_pretrained(out / "model")
        shutil.copy(Path(model_dir) / "tokenizer.json", out / "model" / "tokenizer.json")


def eval_command(args) -> int:
    from minift.training import data as D
    from minift.training.checkpoint import load_trainable_state
    from minift.training.forward import check_device
    from minift.methods.build import build_method
    if args.device is not None:
        check_device(args.device)  # before anything is loaded
    for flag in ("batch_size", "max_len"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise InputError(f"--{flag.replace('_', '-')} must be >= 1, got {v}")
    adapter = Path(args.adapter)
    if not (adapter / "run.json").is_file() or not (adapter / "model.safetensors").is_file():
        raise InputError(f"{adapter} is not a minift adapter directory (no run.json and model.safetensors; "
                         f"it is written by minift train --out DIR as DIR/adapter)")
    run = read_run(adapter / "run.json")
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
    metrics = evaluate(model, D.batches(ex, args.batch_size, pad_id=D.pad_id(tok)), task)
    print(json.dumps({"method": run["method"], "task": task, "examples": len(ex), **metrics}))
    return 0


def read_run(path) -> dict:
    """A ``run.json`` written by ``minift train``, each field checked (InputError naming the file)."""
    run = read_json(path, "run record")
    field(run, "method", str, path)
    field(run, "options", dict, path)
    if field(run, "task", str, path) not in TASKS:
        raise InputError(f"{path}: field 'task' must be one of {', '.join(TASKS)}, got {run['task']!r}")
    if field(run, "max_len", int, path) < 1:
        raise InputError(f"{path}: field 'max_len' must be >= 1, got {run['max_len']}")
    field(run, "model", str, path)
    labels = field(run, "label2id", (dict, type(None)), path)
    if labels is not None and not all(isinstance(v, int) and not isinstance(v, bool) for v in labels.values()):
        raise InputError(f"{path}: field 'label2id' must map label names to integers")
    field(field(run, "train", dict, path), "lr", float, path)
    return run


# ---------------------------------------------------------------------------- probe

def load_encoder(model_dir) -> nn.Module:
    """A GPT-2 (``model_type`` gpt2) or BERT (``bert``) checkpoint directory, as GPT or Bert."""
    from minift.models import hf
    from minift.models.bert import Bert
    from minift.models.gpt import GPT
    kind = hf.read_config(model_dir).get("model_type")
    if kind == "gpt2":
        return GPT.from_pretrained(model_dir)
    if kind == "bert":
        return Bert.from_pretrained(model_dir)
    raise ValueError(f"{model_dir}: model_type {kind!r} cannot be probed; expected 'bert' or 'gpt2'")


def probe_dataset(model_dir, data_path, *, pooling: str = "cls", layers=None, limit: int | None = None,
                  max_len: int = 64, batch_size: int = 32, **kw) -> "ProbeResult":
    """Probe every layer of the checkpoint in ``model_dir`` on a classification file (.jsonl
    or .csv with ``text`` and ``label``; its first ``limit`` records). ``kw`` go to ``run_probe``."""
    import time

    from minift.methods.probe import run_probe
    from minift.training import data
    if pooling == "token":
        raise ValueError("probe_dataset reads sentence-level labels: pooling must be cls, mean or last")
    if limit is not None and limit < 4:
        raise ValueError(f"limit must be >= 4 examples, got {limit}")
    model = load_encoder(model_dir)
    tok = data.load_tokenizer(model_dir)
    ds = data.read_classification(data_path)
    examples = ds.tokenize(tok, max_length=max_len)[:limit]
    t0 = time.perf_counter()
    bs = data.batches(examples, batch_size, pad_id=data.pad_id(tok))
    meta = {"model": str(model_dir), "data": str(data_path), "examples": len(examples), "max_len": max_len,
            "labels": ds.id2label, "device": "cpu", "torch": torch.__version__}
    res = run_probe(model, bs, pooling=pooling, layers=layers, meta=meta, **kw)
    res.meta["seconds"] = round(time.perf_counter() - t0, 2)
    return res


def _jsonable(opts: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in opts.items()}
