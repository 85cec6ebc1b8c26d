"""What `minift train` writes under --out, and how a --resume is checked against it.

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
import shutil
import sys
from pathlib import Path

from minift.files import InputError, read_json
from minift.training.config import TrainConfig

# TrainConfig fields a --resume may change: the length of the run, when it evaluates and saves,
# and where and how fast it runs. Everything else must match the run being continued.
RESUMABLE_CHANGES = ("steps", "epochs", "eval_every", "save_every", "patience", "device", "bf16", "compile")
# What minift train writes under --out; --overwrite (or a fresh start in an earlier run's
# directory) removes these and nothing else.
RUN_OUTPUTS = ("run.json", "metrics.jsonl", "loss.png", "last", "last.old", "last.tmp", "best", "best.old",
               "best.tmp", "adapter", "model")


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


def identity(method: str, opts: dict, task: str, max_len: int, data: dict, cfg: TrainConfig) -> dict:
    """What a resumed run must share with the run it continues: the method and its settings as
    given, the task, the model, the data files' contents, and the training settings that
    ``RESUMABLE_CHANGES`` does not list."""
    files = {k: {"path": str(Path(data[k]).resolve()), "sha256": _sha256(data[k])}
             for k in ("train", "dev") if data.get(k)}
    skip = {*RESUMABLE_CHANGES, "out_dir", "resume", "log_path", "progress", "plot"}
    return {"method": method, "options": jsonable(opts), "task": task, "max_len": max_len,
            "model": str(Path(data["model"]).resolve()), "data": files,
            "train": {k: v for k, v in vars(cfg).items() if k not in skip}}


def start_run(out: Path, run: dict, resume: bool, overwrite: bool) -> None:
    """Write ``run`` to ``out/run.json``: a --resume checked against the run there first, a fresh
    start in an earlier run's directory after removing that run's files."""
    if resume:
        check_resume(out, run["given"])
    elif overwrite or (out / "run.json").is_file():  # a fresh start: no file of the earlier run survives
        clear_outputs(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps(run, indent=1) + "\n")


def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_resume(out: Path, given: dict) -> None:
    """Refuse a --resume whose settings differ from the run in ``out`` (see ``identity``)."""
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



def jsonable(opts: dict) -> dict:
    """Method options as run.json holds them (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in opts.items()}
