"""`minift train` and `minift eval`: files on disk -> model, data and method -> train / score.

The settings (flags, --config TOML, --recipe) are read and checked in ``settings.py``; what a
run writes under --out, and how a --resume is checked against it, is ``run_dir.py``. Here:
load the model and the data, build the method from the registry, train or score.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from minift.files import InputError, field, read_json
from minift.methods.registry import MethodState, build_method, parse_method
from minift.training import distributed
from minift.training.evaluate import TASK_METRICS, TASKS, evaluate
from minift.training.config import TrainConfig
from minift.training.run_dir import check_out, check_resume, identity, jsonable, save_outputs, start_run
from minift.training.settings import Settings, resolve_paths, settings
from minift.training.speed import takes_bf16_frozen_base


# ---------------------------------------------------------------------------- model, data, method

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
    if kind in ("llama", "qwen2"):
        from minift.models.llama import Llama
        return Llama.from_pretrained(model_dir)
    if kind != "gpt2":
        raise InputError(f"task {task} needs a GPT-2 or Llama model (model_type 'gpt2', 'llama' or 'qwen2'); "
                         f"{model_dir} is {kind!r}")
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


def build(model, method: str, options: dict, *, tokenizer=None, lr: float, weight_decay: float = 0.0,
          total_steps: int | None = None, origin: dict | None = None) -> MethodState:
    """``method``'s typed settings for a run of ``total_steps`` steps, applied to ``model`` (with
    LoRA's merged forward when the settings ask for it)."""
    ms = parse_method(method, options, total_steps=total_steps, origin=origin)
    st = build_method(model, method, ms, tokenizer=tokenizer, lr=lr, weight_decay=weight_decay)
    if merged_forward(st):
        enable_merged_forward(model)
    return st


def merged_forward(st: MethodState) -> bool:
    return bool(getattr(st.settings.training, "merged_forward", False))


def speed_up(model, st: MethodState, s: Settings, cfg: TrainConfig, task: str, max_len: int,
             batches: list[dict], tok) -> tuple[list[dict], str]:
    """Apply the run's speed plan (``speed.py``): ``minift.fast`` on the model, torch.compile in
    ``cfg``. Returns the training batches (padded when the plan says so) and the plan in words."""
    from minift.training import data as D
    from minift.training.forward import pick_device
    from minift.training.speed import compile_context, note_fast_layers, plan
    p = plan(device_type=pick_device(cfg.device).type, method=s.method, hooks=st.hooks, task=task,
             max_len=max_len, given=s.train, merged_forward=merged_forward(st), peft=st.peft)
    if p.fast:
        from minift import fast
        fast.enable(model, merged_lora=p.merged_lora, lora_recompute_act=p.recompute_act)
    note_fast_layers(p, model)
    cfg.compile, cfg.compile_mode = p.compile, p.compile_mode
    compile_context(cfg.activation_budget, cfg.compile)  # a budget for an eager run: refused before it starts
    if p.pad:
        batches = D.pad_to_one_shape(batches, D.pad_id(tok))
        i = next(i for i, n in enumerate(p.notes) if n.startswith("torch.compile"))
        p.notes[i] += " ({} x {})".format(*batches[0]["input_ids"].shape)  # the shape to bench it at
    if p.bf16_frozen_base:
        p.notes.append(bf16_frozen_base(model))
    return batches, p.describe()


def bf16_frozen_base(model) -> str:
    """Store ``model``'s frozen parameters in bf16 (``minift.fast.frozen``); returns what was done, in words."""
    from minift.fast import frozen
    return f"frozen base in bf16 ({len(frozen.enable(model))} tensors)"


def enable_merged_forward(model) -> None:
    """Run plain LoRA layers through the merged weight W0 + sBA, one GEMM per layer (``minift.fast``)."""
    from minift.fast import lora as fast_lora
    if not fast_lora.enable(model, merged=True):
        raise ValueError("--merged-forward found no plain LoRA layer to run merged")


# ---------------------------------------------------------------------------- train

def train_command(args) -> int:
    """``minift train``: check every setting and file, then prepare --out, train and save.
    Nothing in --out changes until every check has passed. Under torchrun every rank runs it
    (``distributed.py``); rank 0 alone writes --out's files and prints."""
    from minift.training.loop import train
    s = settings(args)
    if args.out is None:
        raise InputError("no --out directory given")
    out, overwrite = Path(args.out), getattr(args, "overwrite", False)
    check_out(out, args.resume, overwrite)
    data = resolve_paths(s.data)
    task, max_len = data["task"], int(data.get("max_len", 128))
    if max_len < 1:
        raise InputError(f"--max-len must be >= 1, got {max_len}")
    cfg = train_config(s, out, args, task)
    shard = getattr(args, "shard", False)
    distributed.check(s.method, cfg.batch_size, shard, cfg.device)
    distributed.init()  # under torchrun: join the other ranks
    tok, batches, dev, label2id = load_data(data, task, max_len, cfg)
    model = load_model(data["model"], task, len(label2id) if label2id else None, cfg.seed)
    total = cfg.total_steps(len(batches))
    st = build(model, s.method, s.options, tokenizer=tok, lr=cfg.lr, weight_decay=cfg.weight_decay,
               total_steps=total, origin=s.origin)
    t, n = st.trainable(model)  # counted before sharding splits the weights
    batches, speed, twin = spread(model, st, s, cfg, task, max_len, batches, tok, shard)
    record = {"method": s.method, "options": jsonable(st.options), "task": task, "max_len": max_len,
              "label2id": label2id, "model": str(Path(data["model"]).resolve()), "train": vars(cfg),
              "given": identity(s.method, s.options, task, max_len, data, cfg)}
    if distributed.is_main():
        start_run(out, record, args.resume, overwrite)
    elif args.resume:
        check_resume(out, record["given"])  # as rank 0 does, so that every rank stops on a mismatch
    distributed.barrier()  # --out is ready for every rank

    def started(step: int) -> None:  # once a checkpoint to resume has loaded: no line before an error
        if distributed.is_main():
            print(f"minift train: {s.method} on {task}: {t:,} of {n:,} parameters trainable ({100 * t / n:.2f}%), "
                  f"{total} steps" + (f", resuming after step {step}" if step else "") + f"; speed: {speed}",
                  file=sys.stderr)
    eval_fn = (lambda m: evaluate(m, dev, task, progress=cfg.progress and distributed.is_main())) if dev else None
    res = train(model, batches, cfg, eval_fn=eval_fn, on_start=started, **st.train_hooks())
    if res.interrupted:
        if distributed.is_main():
            print(f"minift train: interrupted at step {res.steps}; checkpoint in {res.checkpoint}; "
                  f"continue with --resume", file=sys.stderr)
        return 130
    plain = distributed.gather(model, twin)  # rank 0: the model to save (a sharded one's weights gathered)
    if plain is None:
        return 0
    save_outputs(plain, out, s.method, st.peft, data["model"])
    summary = {"steps": res.steps, "final_loss": res.losses[-1] if res.losses else None,
               "tokens_per_s": round(res.tokens_per_s, 1),
               "first_step_s": round(res.first_step_s, 2), "steady_tokens_per_s": round(res.steady_tokens_per_s, 1),
               "steady_step_ms": None if res.steady_step_ms is None else round(res.steady_step_ms, 2),
               **({"peak_gib": round(res.peak_gib, 2)} if res.peak_gib is not None else {}), "eval": res.evals[-1] if res.evals else None,
               "stopped_early": res.stopped_early, "out": str(out),
               **({"ranks": distributed.world_size()} if distributed.world_size() > 1 else {})}
    print(json.dumps(summary))
    return 0


def spread(model, st: MethodState, s: Settings, cfg: TrainConfig, task: str, max_len: int, batches: list[dict],
           tok, shard: bool) -> tuple[list[dict], str, torch.nn.Module | None]:
    """The model laid out over the ranks (``distributed.py``), with the run's speed plan: sharded
    (FSDP2, eager: neither ``minift.fast`` nor torch.compile), or replicated with the speed plan of
    one process (``speed_up``). Returns the training batches, the plan in words and, when sharded,
    the structure ``distributed.gather`` fills to save the model (else None)."""
    from minift.training.forward import pick_device
    n = distributed.world_size()
    if shard:
        cfg.compile = False
        twin = distributed.shard(model, pick_device(cfg.device), cfg.bf16)
        return batches, f"FSDP2-sharded over {n} ranks, eager (--batch-size {cfg.batch_size}: {cfg.batch_size // n} " \
                        f"per rank)", twin
    batches, speed = speed_up(model, st, s, cfg, task, max_len, batches, tok)
    if n > 1:
        model.to(pick_device(cfg.device))  # where train() would move it: rank 0's copy goes out from there
        distributed.replicate(model)
        speed += f"; data parallel over {n} ranks (--batch-size {cfg.batch_size}: {cfg.batch_size // n} per rank)"
    return batches, speed, None


def train_config(s: Settings, out: Path, args, task: str) -> TrainConfig:
    """The [train] settings as a ``TrainConfig`` writing to ``out``; its metric one ``task`` reports."""
    topts = dict(s.train)
    topts.setdefault("device", "auto")  # the command runs on CUDA when there is one
    try:
        cfg = TrainConfig(**topts, out_dir=str(out), resume=args.resume, progress=not args.no_progress)
    except TypeError as e:
        raise InputError(f"bad training option: {e}") from None
    if cfg.metric not in TASK_METRICS[task]:
        raise InputError(f"--metric {cfg.metric!r} is not reported for task {task}; choose one of "
                         f"{', '.join(TASK_METRICS[task])}")
    return cfg


def load_data(data: dict, task: str, max_len: int, cfg: TrainConfig):
    """(tokenizer, train batches, dev batches or None, label2id or None)."""
    from minift.training import data as D
    tok = D.load_tokenizer(data["model"])
    train_ex, label2id = examples(data["train"], task, tok, max_len)
    dev_ex = examples(data["dev"], task, tok, max_len, label2id)[0] if data.get("dev") else None
    pad = D.pad_id(tok)
    batches = D.batches(train_ex, cfg.batch_size, shuffle=True, seed=cfg.seed, pad_id=pad)
    dev = D.batches(dev_ex, cfg.batch_size, pad_id=pad) if dev_ex else None
    return tok, batches, dev, label2id


# ---------------------------------------------------------------------------- eval

def eval_command(args) -> int:
    from minift.training import data as D
    from minift.training.checkpoint import load_trainable_state
    from minift.training.forward import check_device
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
    preds_path = Path(args.predictions) if getattr(args, "predictions", None) else None
    if preds_path is not None:
        if task != "classification":
            raise InputError(f"--predictions is for classification adapters; {adapter} was trained for {task}")
        if not preds_path.parent.is_dir():
            raise InputError(f"--predictions {preds_path}: directory {preds_path.parent} does not exist")
    tok = D.load_tokenizer(model_dir)
    ex = examples(args.data, task, tok, max_len, run["label2id"])[0]
    model = load_model(model_dir, task, len(run["label2id"]) if run["label2id"] else None)
    st = build(model, run["method"], run["options"], tokenizer=tok, lr=run["train"]["lr"])
    load_trainable_state(model, adapter / "model.safetensors")
    device = torch.device(args.device if args.device not in (None, "auto") else
                          "cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    if device.type == "cuda" and run["train"].get("fast", True):  # as minift train evaluated on CUDA
        from minift import fast
        fast.enable(model)
        if takes_bf16_frozen_base(fast=True, peft=st.peft, bf16=run["train"].get("bf16", True),
                                  hooks=st.hooks):  # as the run's plan chose
            bf16_frozen_base(model)
    preds = [] if preds_path is not None else None
    metrics = evaluate(model, D.batches(ex, args.batch_size, pad_id=D.pad_id(tok)), task, predictions=preds,
                       progress=not getattr(args, "no_progress", True))
    if preds is not None:
        write_predictions(preds_path, preds, run["label2id"])
    print(json.dumps({"method": run["method"], "task": task, "examples": len(ex), **metrics}))
    return 0


def write_predictions(path: Path, records: list[dict], label2id: dict) -> None:
    """``evaluate``'s prediction records as JSON lines, label ids replaced by their names."""
    names = {i: name for name, i in label2id.items()}
    path.write_text("".join(json.dumps({**r, "gold": names[r["gold"]], "pred": names[r["pred"]]}) + "\n"
                            for r in records))


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

def load_encoder(model_dir) -> torch.nn.Module:
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

