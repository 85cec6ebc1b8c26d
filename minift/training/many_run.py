"""`minift train-many`: K LoRA jobs of `minift train`, trained together on one frozen base.

    minift train-many --config jobs.toml --out runs/many        (--resume, --overwrite as for train)

jobs.toml takes the keys of a `minift train --config` file, once for defaults and once per job:

    model = "gpt2"              # shared by every job, as bare keys or in the top-level tables:
    device = "auto"             #   [data] model, [train] device and bf16 (one base, one forward)
    [train]                     # [method], [train], [data]: defaults for every job
    steps = 200
    [data]
    task = "causal-lm"          # causal-lm | prompt-completion (jobs may mix the two) | classification

    [[job]]                     # one adapter; its name (default job1, job2, ...) names its directory
    name = "poems"
    [job.method]                # each job's tables override the defaults; a job giving [train]
    r = 8                       # steps or epochs replaces the other
    [job.train]
    lr = 2e-4
    [job.data]
    train = "poems.txt"         # relative paths are relative to jobs.toml (as for --config); model
                                # "minilm" and task "sentiment" are the recipes' fetched model and data

Every job is checked before the model loads and nothing under --out changes before every job's
data, targets and directory have passed: a bad job is one line naming the job (index and name),
the key and what is allowed (exit 2). Settings that one shared forward cannot honour are refused:
a method other than plain LoRA (name "lora"; no DoRA, PiSSA/gaussian init or merged_forward;
modules_to_save only as classification's default, the head), grad_accum > 1,
compile (train-many runs eager), and a per-job model, device, bf16 or fast. Classification jobs
(a BERT base) each train their own new head, as `minift train` does: its own label set from its
train file, its own starting weights (the head `minift train` would draw with the job's seed),
the job's rows through it (`ModulesToSave` in methods/multi_lora.py); their tasks may differ in
label count. Classification and language-model jobs do not mix (they need other bases). On CUDA the
shared model takes minift.fast (cast once, fused loss, each row's adapter factors gathered: one
batched GEMM pair per layer for every job; `fast = false` at the top level: the reference path). Each job's adapter A is drawn as `minift train` draws it (the CPU RNG seeded with the
job's seed, then advanced by building the model), so a job trains exactly as
`minift train --config` with its tables would (tests/training/test_many_cli.py; CPU, fp32), but
for dropout: the base's and the jobs' LoRA dropout (each job's on its own rows) draw their masks
from one generator over every job's rows, so the jobs match separate runs in distribution, not
mask for mask.

Each job writes OUT/<name>/ as `minift train --out` does (run.json, metrics.jsonl, last/, best/,
adapter/ (`minift eval --adapter OUT/<name>/adapter` scores it), loss.png) plus summary.json, the
JSON line printed for it. A job that has done its steps stops contributing rows and the others go
on; its files are final as soon as it ends, its adapter/ is written when the command ends.
"""
from __future__ import annotations

import copy
import json
import os
import sys
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from minift.files import InputError, read_text
from minift.methods.lora import LoRAConfig
from minift.methods.registry import option_names, parse_method
from minift.training.config import TrainConfig
from minift.training.evaluate import TASK_METRICS, evaluate
from minift.training.forward import check_device, pick_device
from minift.training.many import Job, add_jobs, alone, train_many
from minift.training.run import load_data, load_model
from minift.training.run_dir import check_out, check_resume, identity, jsonable, save_outputs, start_run
from minift.training.settings import DATA_KEYS, TRAIN_KEYS, check_value, fetch_named

TOP_KEYS = ("model", "device", "bf16", "fast", "method", "train", "data", "job")
SHARED = {"model": "data", "device": "train", "bf16": "train", "fast": "train"}   # one value for all jobs: key -> its table
TASKS = ("causal-lm", "prompt-completion", "classification")
# settings a shared forward cannot honour: (table, key) -> (is the value fine?, why not)
REFUSED = {
    ("method", "dora"): (lambda v: not v, "named adapters are plain LoRA; train DoRA with minift train"),
    ("method", "init"): (lambda v: v == "default", "named adapters start as LoRA's default (Kaiming A, zero B)"),
    ("method", "merged_forward"): (lambda v: not v, "train-many does not compile or merge LoRA weights"),
    ("train", "grad_accum"): (lambda v: v == 1, "train-many runs one micro-batch per step; give a larger "
                                                "batch_size"),
    ("train", "compile"): (lambda v: not v, "train-many does not compile or merge LoRA weights"),
    ("train", "compile_mode"): (lambda v: False, "train-many does not compile"),
    ("train", "activation_budget"): (lambda v: False, "train-many does not compile"),
    ("train", "recompute_act"): (lambda v: False, "train-many does not compile"),
}


def add_flags(p) -> None:
    p.add_argument("--config", required=True, help="TOML file: shared keys and defaults, one [[job]] per adapter")
    p.add_argument("--out", help="output directory; job NAME writes OUT/NAME as minift train --out would")
    p.add_argument("--resume", action="store_true", help="continue every job from OUT/NAME/last")
    p.add_argument("--overwrite", action="store_true",
                   help="start again in job directories that hold a checkpoint (deletes their last/ and best/)")
    p.add_argument("--device", help="auto | cpu | cuda (default: the file's, else auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


@dataclass
class JobSpec:
    """One [[job]] table, checked and merged over the defaults."""
    index: int                 # 1-based, in file order
    name: str
    where: str                 # "jobs.toml: job 2 (poems)", the prefix of its errors
    options: dict              # its LoRA options
    lora: LoRAConfig
    lr_ratio: float | None
    cfg: TrainConfig
    data: dict                 # model, train, dev, task, max_len
    out: Path


# ---------------------------------------------------------------------------- the file

def read_jobs(path, out: Path, resume: bool, device: str | None) -> list[JobSpec]:
    """Every job of ``path``, checked (InputError naming the job and key). Jobs write ``out/<name>``."""
    path = Path(path)
    try:
        doc = tomllib.loads(read_text(path, "config file"))
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{path}: invalid TOML: {e}") from None
    bad = [k for k in doc if k not in TOP_KEYS]
    if bad:
        raise InputError(f"{path}: unknown top-level key {bad[0]!r}; use {', '.join(TOP_KEYS)} (shared keys, "
                         f"the default tables, and one [[job]] table per adapter)")
    top = {t: _table(doc.get(t, {}), t, f"{path}:", path.parent) for t in ("method", "train", "data")}
    for k, table in SHARED.items():
        if k in doc:
            if k in top[table]:
                raise InputError(f"{path}: {k} is given twice (bare and in [{table}]); give it once")
            top[table][k] = _typed(doc[k], table, k, f"{path}:", "")
            if k == "model":
                top[table][k] = _near(top[table][k], path.parent)
    if device is not None:
        top["train"]["device"] = device
    jobs = doc.get("job")
    if not isinstance(jobs, list) or not jobs or not all(isinstance(j, dict) for j in jobs):
        raise InputError(f"{path}: no [[job]] table: give one [[job]] (with [job.method], [job.train], "
                         f"[job.data]) per adapter")
    specs = [_job(path, i, j, top, out, resume) for i, j in enumerate(jobs, 1)]
    seen: dict[str, JobSpec] = {}
    for s in specs:
        if (s.data["task"] == "classification") != (specs[0].data["task"] == "classification"):
            raise InputError(f"{s.where}: [data] task {s.data['task']!r} does not mix with job 1's "
                             f"{specs[0].data['task']!r} (classification needs a BERT base, the others GPT-2 or Llama)")
        if s.name in seen:
            raise InputError(f"{s.where}: name {s.name!r} is taken by job {seen[s.name].index}; names must differ")
        seen[s.name] = s
    return specs


def _job(path: Path, i: int, doc: dict, top: dict, out: Path, resume: bool) -> JobSpec:
    name = doc.get("name", f"job{i}")
    where = f"{path}: job {i}" + (f" ({name})" if isinstance(name, str) else "")
    if not isinstance(name, str) or not name.isidentifier():
        raise InputError(f"{where}: name must be a plain identifier (letters, digits, _), got {name!r}")
    bad = [k for k in doc if k not in ("name", "method", "train", "data")]
    if bad:
        raise InputError(f"{where}: unknown key {bad[0]!r}; a [[job]] takes name and the tables [job.method], "
                         f"[job.train], [job.data]")
    own = {t: _table(doc.get(t, {}), t, f"{where}:", path.parent, "job.") for t in ("method", "train", "data")}
    for k, table in SHARED.items():
        if k in own[table]:
            raise InputError(f"{where}: [job.{table}] {k} is shared by every job (one base, one forward for all); "
                             f"give it once at the top level")
    # the job's tables over the defaults; a job giving steps or epochs replaces the other
    train = {k: v for k, v in top["train"].items() if k not in ("steps", "epochs") or not
             {"steps", "epochs"} & set(own["train"])}
    train.update(own["train"])
    options, data = {**top["method"], **own["method"]}, {**top["data"], **own["data"]}
    data = _as_job(where, fetch_named, data)  # the recipes' names, as minift train reads them: minilm, sentiment
    label = {(t, k): f"[job.{t}] {k}" if k in own[t] else f"[{t}] {k}" for t in own for k in (*top[t], *own[t])}
    method = options.pop("name", "lora")
    if method != "lora":
        raise InputError(f"{where}: {label['method', 'name']} = {method!r}: train-many trains plain LoRA "
                         f"adapters only (name = \"lora\"); train {method} with minift train")
    for (t, k), (fine, why) in REFUSED.items():
        v = {"method": options, "train": train}[t].get(k)
        if v is not None and not fine(v):
            raise InputError(f"{where}: {label[t, k]} = {json.dumps(v)}: {why}")
    try:
        ms = parse_method("lora", options, origin={k: label["method", k] for k in options})
    except ValueError as e:
        raise InputError(f"{where}: {e}") from None
    _check_data(data, where, label)
    head = ("classifier",) if data["task"] == "classification" else ()
    on_head = [t for t in ms.config.targets if head and (t == "classifier" or t.endswith(".classifier"))]
    if on_head:
        raise InputError(f"{where}: {label['method', 'targets']}: the classification head is new and each job "
                         f"trains its own in full; drop {on_head[0]!r} from the targets")
    if "modules_to_save" in options and tuple(ms.config.modules_to_save) != head:
        raise InputError(f"{where}: {label['method', 'modules_to_save']} = {json.dumps(options['modules_to_save'])}: "
                         f"train-many trains " + ("each classification job's own head (the default, "
                         "[\"classifier\"])" if head else "no module in full (it would be shared by every job)"))
    ms = replace(ms, config=replace(ms.config, modules_to_save=head))
    train.setdefault("device", "auto")
    if "steps" not in train and "epochs" not in train:
        train["epochs"] = 1
    try:
        cfg = TrainConfig(**train, out_dir=str(out / name), resume=resume, progress=False)
    except ValueError as e:
        raise InputError(f"{where}: [train] {e}") from None
    if cfg.metric not in TASK_METRICS[data["task"]]:
        raise InputError(f"{where}: {label['train', 'metric']} = {cfg.metric!r} is not reported for task "
                         f"{data['task']}; choose one of {', '.join(TASK_METRICS[data['task']])}")
    return JobSpec(i, name, where, ms.options, ms.config, ms.training.lr_ratio, cfg, data, out / name)


def _check_data(data: dict, where: str, label: dict) -> None:
    """A job's [data]: a task train-many runs, a model, a train file (and dev) that exist; max_len."""
    task = data.get("task")
    if task not in TASKS:
        why = ("give task = \"classification\" with the files of `minift fetch sentiment`" if task == "sentiment"
               else f"got {task!r}")
        raise InputError(f"{where}: [data] task must be one of {', '.join(TASKS)}; {why}")
    for k in ("model", "train"):
        if not data.get(k):
            raise InputError(f"{where}: no [data] {k} (give it " +
                             ("once at the top level)" if k == "model" else "in [job.data] or [data])"))
    for k in ("train", "dev"):
        if data.get(k) and not Path(data[k]).is_file():
            raise InputError(f"{where}: {label['data', k]}: no file {data[k]}")
    data.setdefault("max_len", 128)
    if data["max_len"] < 1:
        raise InputError(f"{where}: {label['data', 'max_len']} must be >= 1, got {data['max_len']}")


def _table(values, table: str, where: str, here: Path, prefix: str = "") -> dict:
    """One [method], [train] or [data] table: known keys, each of its type; data paths resolved."""
    if not isinstance(values, dict):
        raise InputError(f"{where} {prefix}{table} must be a table ([{prefix}{table}]), got {values!r}")
    known = {"method": ["name", *option_names("lora")], "train": TRAIN_KEYS, "data": DATA_KEYS}[table]
    out = {}
    for k, v in values.items():
        if k not in known:
            raise InputError(f"{where} unknown key {k!r} in [{prefix}{table}]; known: {', '.join(known)}")
        out[k] = _typed(v, table, k, where, prefix)
        if table == "data" and k in ("model", "train", "dev"):
            out[k] = _near(v, here)
    return out


def _typed(value, table: str, key: str, where: str, prefix: str):
    return check_value(value, table, key, f"{where} [{prefix}{table}] {key}")


def _near(p: str, here: Path) -> str:
    """A relative path in the file: relative to the file when it exists there (as ``--config``)."""
    return str(here / p) if not Path(p).is_absolute() and (here / p).exists() else p


# ---------------------------------------------------------------------------- the command

def train_many_command(args) -> int:
    """Check every job, load the base and every job's data, then prepare each job's directory,
    train all jobs together and write each one's adapter and summary."""
    if args.out is None:
        raise InputError("no --out directory given (job NAME writes OUT/NAME)")
    if args.resume and args.overwrite:
        raise InputError("give one of --resume and --overwrite, not both")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; give a directory")
    if args.device is not None:
        check_device(args.device)
    specs = read_jobs(args.config, out, args.resume, args.device)
    for s in specs:
        _as_job(s.where, check_out, s.out, args.resume, args.overwrite)
    model, jobs, labels = _load(specs)
    _start_runs(specs, labels, args)  # every check has passed: the job directories change from here on
    speed = "reference path (eager)"
    if pick_device(specs[0].cfg.device).type == "cuda" and specs[0].cfg.fast:
        from minift import fast
        speed = "; ".join(fast.enable(model)) or speed

    def started(steps: dict[str, int]) -> None:  # once the checkpoints to resume have loaded
        parts = [f"{s.name} ({j.cfg.total_steps(len(j.batches))} steps" +
                 (f", resuming after {steps[s.name]}" if steps[s.name] else "") + ")" for s, j in zip(specs, jobs)]
        print(f"minift train-many: {len(jobs)} LoRA jobs on one base: {', '.join(parts)}; speed: {speed}",
              file=sys.stderr)
    res = train_many(model, jobs, specs[0].cfg.device, progress=not args.no_progress, on_start=started)
    if res.interrupted:
        where = ", ".join(f"{n} at step {r.steps}" for n, r in res.jobs.items() if r.interrupted)
        print(f"minift train-many: interrupted ({where}); checkpoints in {out}/<job>/last; continue with --resume",
              file=sys.stderr)
        return 130
    for s in specs:
        with alone(model, s.name, s.lora):  # OUT/<name>/adapter as minift train writes it
            save_outputs(model, s.out, "lora", True, s.data["model"])
        r = res.jobs[s.name]
        summary = {"job": s.name, "steps": r.steps, "final_loss": r.losses[-1] if r.losses else None,
                   "eval": r.evals[-1] if r.evals else None, "best": r.best, "stopped_early": r.stopped_early,
                   "out": str(s.out)}
        tmp = s.out / "summary.json.tmp"
        tmp.write_text(json.dumps(summary) + "\n")
        os.replace(tmp, s.out / "summary.json")
        print(json.dumps(summary))
    if res.tokens_per_s:
        print(f"minift train-many: {res.tokens_per_s:.0f} tokens/s over every job's rows", file=sys.stderr)
    return 0


def _as_job(where: str, check, *args):
    """``check(*args)``; its error (a bad input: InputError, ValueError, a missing file) names the
    job (``where``: its file, index and name)."""
    try:
        return check(*args)
    except (ValueError, FileNotFoundError) as e:
        raise InputError(f"{where}: {e}") from None


def _load(specs: list[JobSpec]):
    """The base with every job's adapter added, and the jobs (their data loaded)."""
    data = [_as_job(s.where, load_data, s.data, s.data["task"], s.data["max_len"], s.cfg) for s in specs]
    labels = [d[3] for d in data]
    model, rngs, heads = _base(specs, labels)
    jobs = []
    for s, (_, batches, dev, _), n in zip(specs, data, labels):
        eval_fn = (lambda m, dev=dev, task=s.data["task"]: evaluate(m, dev, task)) if dev else None
        key = (s.cfg.seed, len(n) if n else None)
        modules = {"classifier": copy.deepcopy(heads[key])} if key in heads else None  # a head of its own
        jobs.append(Job(s.name, s.lora, batches, s.cfg, s.lr_ratio, eval_fn, rngs[key], modules))
    try:
        add_jobs(model, jobs)
    except ValueError as e:  # "job <name>: ..." (a target that matches nothing, a rank too large)
        s = next((s for s in specs if str(e).startswith(f"job {s.name}: ")), None)
        raise InputError(f"{s.where}: {str(e).removeprefix(f'job {s.name}: ')}" if s else str(e)) from None
    return model, jobs, labels


def _start_runs(specs: list[JobSpec], labels: list[dict | None], args) -> None:
    """Each job's run.json (a --resume checked against every job's first), as minift train writes it."""
    runs = [{"method": "lora", "options": jsonable(s.options), "task": s.data["task"], "max_len": s.data["max_len"],
             "label2id": label2id, "model": str(Path(s.data["model"]).resolve()), "train": vars(s.cfg),
             "given": identity("lora", s.options, s.data["task"], s.data["max_len"], s.data, s.cfg),
             "many": {"config": str(Path(args.config).resolve()), "job": s.index}} for s, label2id in zip(specs, labels)]
    if args.resume:
        for s, run in zip(specs, runs):
            _as_job(s.where, check_resume, s.out, run["given"])
    for s, run in zip(specs, runs):
        start_run(s.out, run, args.resume, args.overwrite)
        (s.out / "summary.json").unlink(missing_ok=True)  # written again when the job's run ends


def _base(specs: list[JobSpec], labels: list[dict | None]):
    """The base, loaded as `minift train` loads it (seeded with the first job's seed); for each
    job's (seed, label count), the CPU RNG state right after such a load (where `minift train`'s
    ``lora.apply`` draws A) and, for classification, the new head that load made. Another seed (or
    label count) builds one more model to get there, keeping only its head."""
    first = specs[0]
    n = [len(m) if m else None for m in labels]
    model = load_model(first.data["model"], first.data["task"], n[0], first.cfg.seed)
    rngs, heads = {(first.cfg.seed, n[0]): torch.get_rng_state()}, {}
    for s, k in zip(specs, n):
        if (s.cfg.seed, k) in rngs:
            continue
        if k is None:
            torch.manual_seed(s.cfg.seed)
            type(model)(model.config)  # the draws of the load's construction; its weights are dropped
        else:
            heads[s.cfg.seed, k] = load_model(s.data["model"], s.data["task"], k, s.cfg.seed).classifier
        rngs[s.cfg.seed, k] = torch.get_rng_state()
    if n[0] is not None:
        heads[first.cfg.seed, n[0]] = model.classifier
    return model, rngs, heads
