"""`minift train`'s settings: flags, TOML files and recipes, layered and checked.

Settings come in layers, each overriding the one before:

    defaults  <  --recipe NAME (minift/recipes/NAME.toml)  <  --config FILE.toml  <  flags

A TOML file has three tables with the same keys as the flags (``--num-virtual-tokens`` is
``num_virtual_tokens``): ``[method]`` (``name`` and the method's options), ``[train]``
(``TrainConfig`` fields: lr, steps or epochs, batch_size, ...) and ``[data]`` (model, train,
dev, task, max_len). ``model = "minilm"`` and ``task = "sentiment"`` (the recipes' values)
name the data ``minift fetch`` downloads; they are only fetched when no path is given.

Every method option is a field of the method's dataclasses in ``minift.methods.registry``;
a value of the wrong type, or an option the method does not take, is a one-line error that
names the flag or the TOML file and key it came from.
"""
from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from minift.files import InputError, read_text
from minift.methods.registry import METHODS, check_options
from minift.training.evaluate import TASKS
from minift.training.config import TrainConfig
from minift.training.recipes import load_recipe, recipe_path

# flag name, type, help: every flag is a field of a method's config or training options (registry.py)
METHOD_FLAGS = [
    ("r", int, "LoRA/DoRA rank"), ("alpha", float, "LoRA/AdaLoRA scaling numerator"),
    ("dropout", float, "dropout on the adapter input"), ("targets", "csv", "modules to adapt, e.g. q_proj,v_proj"),
    ("rslora", "flag", "rsLoRA scaling alpha/sqrt(r)"), ("dora", "flag", "DoRA magnitude/direction"),
    ("init", str, "LoRA: default|gaussian|pissa; prefix: random|tokens; prompt: random|vocab|text"),
    ("init_text", str, "prefix/prompt init text"), ("modules_to_save", "csv", "modules trained in full, e.g. classifier"),
    ("lr_ratio", float, "LoRA+: lr of B / lr of A"),
    ("head_lr_ratio", float, "BitFit: lr of the modules_to_save (the head) / lr of the biases"),
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
              "batch_size": "examples per micro-batch (default 8); under torchrun the global one, split over the ranks",
              "grad_accum": "micro-batches per optimizer step", "warmup": ">= 1: steps; < 1: fraction of the run",
              "schedule": "linear | cosine | constant", "eval_every": "steps between dev evaluations (0: at the end)",
              "patience": "early stopping: evaluations without improvement (0: off)",
              "save_every": "steps between checkpoints (0: at the end)", "device": "auto | cpu | cuda",
              "bf16": "bf16 autocast on CUDA (default true)",
              "compile": "torch.compile the model (default on CUDA: true where the method and the batch "
                         "shapes allow, see docs/speed.md; first steps slower while it compiles)",
              "compile_mode": "default | reduce-overhead (CUDA graphs) | max-autotune-no-cudagraphs "
                              "(default on CUDA: reduce-overhead)",
              "fast": "minift.fast's speed pieces on CUDA (default true; see docs/speed.md)",
              "activation_budget": "compiled runs: the share (0, 1] of the activations torch.compile saves for "
                                   "the backward that it keeps, recomputing the rest (less memory, slower "
                                   "steps; default: PyTorch's 1.0; docs/speed.md)",
              "recompute_act": "compiled CUDA runs with LoRA's merged forward on down_proj: the MLP's "
                               "activation computed again in the backward instead of kept (default true; "
                               "docs/speed.md)",
              "log_every": "steps between reads of the loss back from the GPU and metrics lines (default 10)",
              "metric": "dev metric early stopping and best/ track: loss, accuracy, macro_f1, perplexity",
              "higher_is_better": "true for accuracy/F1 (default false: loss)"}
INT_KEYS = ("steps", "batch_size", "grad_accum", "eval_every", "patience", "seed", "save_every", "log_every")
TRAINED = [name for name, spec in METHODS.items() if spec.trained]


# ---------------------------------------------------------------------------- flags

def add_train_flags(p) -> None:
    p.add_argument("--model", help="HF-format GPT-2 or BERT directory (config.json, model.safetensors, tokenizer.json)")
    p.add_argument("--train", help=".jsonl/.csv (classification, prompt-completion) or .txt (causal-lm)")
    p.add_argument("--dev", help="held-out file of the same kind, evaluated every --eval-every steps")
    p.add_argument("--task", help=f"{' | '.join(TASKS)} (default classification)")
    p.add_argument("--method", help=" | ".join(TRAINED))
    p.add_argument("--out", help="output directory (checkpoints, adapter, metrics)")
    p.add_argument("--resume", action="store_true", help="continue from --out/last")
    p.add_argument("--overwrite", action="store_true",
                   help="start again in an --out that holds a checkpoint (deletes its last/ and best/)")
    p.add_argument("--config", help="TOML file with [method], [train], [data] tables")
    p.add_argument("--recipe", help="a recipe in minift/recipes, e.g. sentiment-lora")
    p.add_argument("--max-len", dest="max_len", type=int, help="tokens per example (causal-lm: block size)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--shard", action="store_true",
                   help="under torchrun: shard full fine-tuning's weights, gradients and AdamW moments over the "
                        "ranks (FSDP2) instead of replicating the model (docs/distributed.md)")
    g = p.add_argument_group("training (TrainConfig)")
    for f in fields(TrainConfig):
        if f.name in SKIP:
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            g.add_argument(flag, dest=f.name, type=_bool, metavar="true|false", help=TRAIN_HELP.get(f.name))
        else:
            kind = str if f.name in ("schedule", "device", "metric", "compile_mode") else \
                int if f.name in INT_KEYS else float
            g.add_argument(flag, dest=f.name, type=kind, help=TRAIN_HELP.get(f.name))
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


# ---------------------------------------------------------------------------- TOML

def read_toml(path, what: str = "config") -> dict:
    """A ``--config`` file: only the three tables, their known keys, each value of its key's type."""
    path = Path(path)
    try:
        doc = tomllib.loads(read_text(path, f"{what} file"))
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{path}: invalid TOML: {e}") from None
    known = {"method": None, "train": TRAIN_KEYS, "data": DATA_KEYS}  # [method]: the method's options
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
            check_value(value, table, k, f"{path}: [{table}] {k}")
    return doc


def check_value(value, table: str, key: str, label: str):
    """``value`` of ``key`` in a ``table`` of a TOML file, checked against ``KEY_TYPES`` (InputError
    "LABEL must be ..."); returns it."""
    kind = KEY_TYPES[table].get(key)
    if kind is not None and not _is(value, kind):
        raise InputError(f"{label} must be {TYPE_WORDS[kind]}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise InputError(f"{label} must be a finite number, got {value}")
    return value


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


# ---------------------------------------------------------------------------- layers

@dataclass
class Settings:
    """What the layers say, checked: the method's options are its own (``check_options``)."""
    method: str
    options: dict              # the method's options (``parse_method`` types them once the run's length is known)
    origin: dict[str, str]     # where each option was given: --r, FILE: [method] r
    train: dict                # TrainConfig fields
    data: dict                 # model, train, dev, task, max_len


def _layers(args) -> list[tuple[str, dict]]:
    """(where, tables) from lowest to highest: the recipe, the --config file, the flags."""
    layers = []
    if args.recipe:
        layers.append((str(recipe_path(args.recipe)), load_recipe(args.recipe)))
    if args.config:
        doc = read_toml(args.config)
        here = Path(args.config).parent  # relative data paths in the file are relative to it
        for k in ("model", "train", "dev"):
            v = doc.get("data", {}).get(k)
            if isinstance(v, str) and not Path(v).is_absolute() and (here / v).exists():
                doc["data"][k] = str(here / v)
        layers.append((str(args.config), doc))
    cli = vars(args)
    for k, v in cli.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise InputError(f"--{k.replace('_', '-')} must be a finite number, got {v}")
    layers.append(("flags", {"method": {"name": cli.get("method"), **{n: cli.get(n) for n, _, _ in METHOD_FLAGS}},
                             "train": {k: cli.get(k) for k in TRAIN_KEYS},
                             "data": {k: cli.get(k) for k in DATA_KEYS}}))
    return layers


def settings(args) -> Settings:
    """The method, its options, the training and data settings: recipe < config < flags.

    Raises:
        InputError: no method, an unknown one, the probe (not trained here), or an option the
            method does not take (naming the flag or the file and key that gave it).
    """
    method_opts, origin, train, data = {}, {}, {}, {}
    for where, layer in _layers(args):
        t = {k: v for k, v in layer.get("train", {}).items() if v is not None}
        if "steps" in t or "epochs" in t:  # a layer giving one of them replaces the other
            train.pop("steps", None), train.pop("epochs", None)
        train.update(t)
        given = {k: v for k, v in layer.get("method", {}).items() if v is not None}
        method_opts.update(given)
        origin.update({k: "--" + k.replace("_", "-") if where == "flags" else f"{where}: [method] {k}"
                       for k in given})
        data.update({k: v for k, v in layer.get("data", {}).items() if v is not None})
    method = method_opts.pop("name", None)
    if method is None:
        raise InputError("no method: give --method (or [method] name in --config / --recipe)")
    if method in METHODS and not METHODS[method].trained:
        raise InputError(f"the {method} method is not trained by minift train (its model stays frozen): run "
                         f"minift probe --model DIR --data FILE (or minift compare --methods {method})")
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; choose one of {', '.join(TRAINED)}")
    try:
        check_options(method, method_opts, origin)
    except ValueError as e:
        raise InputError(str(e)) from None
    if "steps" not in train and "epochs" not in train:
        train["epochs"] = 1
    return Settings(method, method_opts, origin, train, data)


# ---------------------------------------------------------------------------- data

def resolve_paths(data: dict) -> dict:
    """Named model/data of the recipes (``fetch_named``), the default task, and the checks that a
    task, a model and training data are given."""
    data = fetch_named(data)
    data.setdefault("task", "classification")
    if data["task"] not in TASKS:
        raise InputError(f"unknown task {data['task']!r}; choose one of {', '.join(TASKS)}")
    for k in ("model", "train"):
        if data.get(k) is None:
            raise InputError(f"no --{k} given")
    return data


def fetch_named(data: dict) -> dict:
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
    return data
