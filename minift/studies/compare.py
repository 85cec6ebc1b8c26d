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
(the ``[method]`` options and the ``lr`` of ``[train]``, with a ``[compare]`` table's keys laid
over them where a recipe has one, and a ``[compare.full]`` table's under ``--full``:
``recipes.compare_settings``; the ``warmup``/``weight_decay`` of ``[train]``); the step budget,
batch size and sequence length are the comparison's own and shared by all.
The linear probe trains a logistic-regression probe on every layer's frozen features and
reports the layer with the best dev accuracy.

Memory: on CUDA, ``torch.cuda.max_memory_allocated`` over the method's run. On CPU each method
runs in a fresh worker process by default and reports that process's peak resident set size
(``getrusage``), which includes the Python interpreter, torch and the data (~the same for all
methods); in-process runs report the process-wide peak so far, which only grows.
The config and the data are set up in ``compare_setup.py``, the recipes read by
``minift.training.recipes``, the scores computed by ``minift.training.evaluate`` (as `minift eval`
does); the table, Markdown, JSON and chart are written by ``compare_report.py``.
"""
from __future__ import annotations

import json
import os
import subprocess
from concurrent.futures import CancelledError, ThreadPoolExecutor, as_completed
import sys
import tempfile
import time
from dataclasses import asdict, fields
from pathlib import Path

import torch

from minift.studies.compare_report import COLUMNS, plot, save, to_markdown, to_text  # noqa: F401  (the report)
from minift.studies.compare_setup import (CompareConfig, Row, Task, load_model, load_task, peak_mib,  # noqa: F401
                                          resolve, start_peak, total_steps, train_config)
from minift.training.recipes import compare_settings, load_recipe


# ---------------------------------------------------------------------------- one method

def run_method(task: Task, method: str, cfg: CompareConfig, seed: int | None = None) -> Row | list[Row]:
    """Train (or probe) one fresh copy of the model with ``method`` and run seed ``seed``
    (default ``cfg.seed``) and evaluate it. The data (``task``) is the same for every seed.
    LoRA under ``cfg.together``: every seed's run at once, a row per seed."""
    seed = cfg.seed if seed is None else seed
    if method == "lora" and cfg.together:  # every seed's run at once, one row each (compare_many.py)
        from minift.studies.compare_many import run_together
        return run_together(task, cfg, [cfg.seed + k for k in range(cfg.seeds)])
    from minift.methods.common import count_trainable
    from minift.training.forward import pick_device
    device = pick_device(cfg.device)
    start_peak(device)
    recipe = load_recipe(f"sentiment-{method}")
    steps = total_steps(cfg, len(task.train))
    model = load_model(task, seed)  # also seeds what the method draws (LoRA's A, a prompt's init)
    if method == "probe":
        row = _run_probe(model, task, cfg, recipe, device)
    else:
        row = _run_trained(model, task, cfg, recipe, method, steps, device, seed)
    row.seed = seed
    row.trainable, row.total = count_trainable(model) if method != "probe" else (row.trainable, row.total)
    row.trainable_pct = 100 * row.trainable / row.total
    row.peak_mib = peak_mib(device)
    return row


def _run_trained(model, task: Task, cfg: CompareConfig, recipe: dict, method: str, steps: int, device,
                 seed: int) -> Row:
    from minift.methods.registry import build_method
    from minift.training.evaluate import evaluate
    from minift.training.loop import train
    t = recipe["train"]
    lr, options = compare_settings(recipe, full=cfg.full)  # a recipe's own lr and options for compare
    state = build_method(model, method, options, tokenizer=task.tokenizer, lr=lr,
                         weight_decay=t.get("weight_decay", 0.0), total_steps=steps)
    tc = train_config(cfg, recipe, lr, steps, seed)
    t0 = time.perf_counter()
    res = train(model, task.train, tc, **state.train_hooks())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0
    t0 = time.perf_counter()
    preds = {"dev": [], "test": []}
    dev, test = (evaluate(model, getattr(task, s), "classification", device, predictions=preds[s])
                 for s in ("dev", "test"))
    note = ""
    if method == "adalora":
        c = state.config
        note = (f"r {c.init_r} -> {c.target_r} per matrix; {state.allocator.budget} live ranks "
                f"at the end")
    return Row(method, seed, 0, 0, 0.0, lr, res.steps, wall, time.perf_counter() - t0, res.tokens_per_s,
               0.0, dev["accuracy"], dev["macro_f1"], test["accuracy"], test["macro_f1"], note,
               extra={"final_loss": res.losses[-1] if res.losses else float("nan"),
                      "options": {k: list(v) if isinstance(v, tuple) else v for k, v in state.options.items()}},
               predictions=preds)


def _run_probe(model, task: Task, cfg: CompareConfig, recipe: dict, device) -> Row:
    """Frozen features of every layer; a logistic-regression probe per layer on train; the
    layer with the best dev accuracy is reported (and its test scores)."""
    from minift.methods.probe import extract_features, fit_probe
    from minift.methods.registry import parse_method
    from minift.metrics import accuracy, precision_recall_f1
    from minift.training.forward import to_device
    pooling, t = parse_method("probe", compare_settings(recipe, cfg.full)[1]).config.pooling, recipe["train"]
    for p in model.parameters():
        p.requires_grad_(False)
    model.to(device)
    t0 = time.perf_counter()
    feats = {s: extract_features(model, [to_device(b, device) for b in getattr(task, s)], pooling=pooling)
             for s in ("train", "dev", "test")}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    n_tokens = sum(int(b["attention_mask"].sum()) for s in ("train", "dev", "test") for b in getattr(task, s))
    tok_s = n_tokens / max(time.perf_counter() - t0, 1e-9)
    ys = {s: torch.cat([b["labels"] for b in getattr(task, s)]) for s in ("train", "dev", "test")}
    k = len(task.labels)
    best = None
    per_layer = []
    gd, gt = ys["dev"].tolist(), ys["test"].tolist()
    for layer, (ftr, fdev, fte) in enumerate(zip(feats["train"], feats["dev"], feats["test"])):
        probe = fit_probe(ftr, ys["train"], k, l2=t.get("l2", 1e-3), max_iter=t.get("max_iter", 100))
        with torch.no_grad():
            (sd, pd), (st, pt) = (probe(f).float().softmax(-1).max(-1) for f in (fdev, fte))
        pd, pt = pd.tolist(), pt.tolist()
        r = {"layer": layer, "dev_acc": accuracy(gd, pd), "dev_f1": precision_recall_f1(gd, pd)[2],
             "test_acc": accuracy(gt, pt), "test_f1": precision_recall_f1(gt, pt)[2]}
        per_layer.append(r)
        if best is None or r["dev_acc"] > best["dev_acc"]:
            best = r
            preds = {s: [{"id": i, "gold": g, "pred": p, "score": round(sc, 6)}
                         for i, (g, p, sc) in enumerate(zip(gold, pred, score.tolist()))]
                     for s, gold, pred, score in (("dev", gd, pd, sd), ("test", gt, pt, st))}
    wall = time.perf_counter() - t0
    C = feats["train"][0].shape[1]
    total = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in model.classifier.parameters())
    return Row("probe", 0, C * k + k, total + C * k + k, 0.0, None, 0, wall, 0.0, tok_s, 0.0,
               best["dev_acc"], best["dev_f1"], best["test_acc"], best["test_f1"],
               f"layer {best['layer']} of {len(per_layer) - 1} ({pooling} pooling)",
               extra={"per_layer": per_layer, "pooling": pooling}, predictions=preds)


# ---------------------------------------------------------------------------- all methods

def _device_name(device: str) -> str:
    from minift.studies.bench import _device_name as name
    return name(device)


_WORKERS: set = set()  # the worker processes running now (--jobs: stopped when another run fails)


def _run_isolated(cfg: CompareConfig, method: str, seed: int) -> Row | list[Row]:
    """Run one method in a fresh worker process (``python -m minift.studies.compare``), so the peak
    RSS it reports is that method's own."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path, out_path = Path(tmp) / "config.json", Path(tmp) / "row.json"
        cfg_path.write_text(json.dumps(asdict(cfg)))
        root = str(Path(__file__).resolve().parent.parent)  # the worker imports this same minift
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        proc = subprocess.Popen([sys.executable, "-m", "minift.studies.compare", str(cfg_path), method, str(out_path),
                                 str(seed)],
                                env=env, stderr=subprocess.PIPE)
        _WORKERS.add(proc)
        tail = b""
        for chunk in iter(lambda: os.read(proc.stderr.fileno(), 4096), b""):
            sys.stderr.write(chunk.decode(errors="replace"))  # progress bars stay live
            sys.stderr.flush()
            tail = (tail + chunk)[-4096:]
        proc.stderr.close()
        code = proc.wait()
        _WORKERS.discard(proc)
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
        return [Row(**r) for r in result] if isinstance(result, list) else Row(**result)


def run(cfg: CompareConfig, log=print, on_row=None) -> tuple[list[Row], dict]:
    """Every method of ``cfg``, each with ``cfg.seeds`` run seeds, on the same task; returns
    (rows: one per method and seed, meta). ``on_row(rows, meta)``, when given, is called after
    each run with the rows so far (``meta["partial"]`` says what is not done yet), so a caller
    can save them before a later run fails."""
    cfg = resolve(cfg, log)
    t_start = time.perf_counter()
    task = load_task(cfg)  # also validates the data before any worker starts
    isolate = cfg.jobs > 1 or (cfg.isolate and not cfg.device.startswith("cuda"))
    steps = total_steps(cfg, len(task.train))
    seeds = [cfg.seed + k for k in range(cfg.seeds)]
    # the probe fits frozen features deterministically: one run, whatever the seeds
    runs = [(m, s) for m in cfg.methods for s in (seeds[:1] if m == "probe" else seeds)]
    log(f"compare: {len(cfg.methods)} methods x {len(seeds)} seed(s) x {steps} steps of batch {cfg.batch_size} "
        f"on {task.sizes} examples, max_len {cfg.max_len}, {cfg.device}"
        + (f", {cfg.jobs} runs at once" if cfg.jobs > 1 else ""))
    if not isolate:
        _warm_up(task, cfg)
    tags = [f"{m}" + (f" seed {s}" if len(seeds) > 1 else "") for m, s in runs]
    together: dict[int, Row] = {}  # --together: every LoRA seed's row, from the first LoRA run

    def one(i: int) -> Row:
        method, seed = runs[i]
        if method == "lora" and cfg.together and together:
            return together[seed]
        what = ("frozen features + a probe per layer" if method == "probe" else f"{steps} steps"
                + (f", seeds {seeds[0]}-{seeds[-1]} together" if method == "lora" and cfg.together else ""))
        log(f"compare: [{i + 1}/{len(runs)}] {tags[i]} ({what})")
        if isolate:
            got = _run_isolated(cfg, method, seed)
        else:
            try:
                got = run_method(task, method, cfg, seed)
            except (ValueError, KeyError, FileNotFoundError) as e:
                msg = e.args[0] if isinstance(e, KeyError) and e.args else e
                raise ValueError(f"method {method}: {msg}") from None
        if isinstance(got, list):  # --together: every LoRA seed's row
            together.update({r.seed: r for r in got})
            return together[seed]
        return got

    done: dict[int, Row] = {}

    def finished(i: int, r: Row) -> None:
        done[i] = r
        elapsed, n = time.perf_counter() - t_start, len(done)
        left = f", about {elapsed / n * (len(runs) - n):.0f} s left" if n < len(runs) else ""
        log(f"compare: {tags[i]}: dev acc {100 * r.dev_acc:.1f}, test acc {100 * r.test_acc:.1f}, "
            f"{r.wall_s:.0f} s ({elapsed:.0f} s in all{left})")
        if on_row is not None and n < len(runs):
            meta = _meta(cfg, task, steps, isolate, t_start)
            meta["partial"] = f"{n} of {len(runs)} runs done ({', '.join(tags[j] for j in range(len(runs)) if j not in done)} not run)"
            on_row([done[j] for j in sorted(done)], meta)

    if cfg.jobs == 1:
        for i in range(len(runs)):
            finished(i, one(i))
    else:
        _run_at_once(one, finished, len(runs), cfg.jobs)
    rows = [done[i] for i in range(len(runs))]
    return rows, _meta(cfg, task, steps, isolate, t_start)


def _run_at_once(one, finished, n: int, jobs: int) -> None:
    """``finished(i, one(i))`` for i < n, ``jobs`` runs at once: each run is its own worker process,
    and threads only wait on them. A failed run (or Ctrl-C) starts no other run, stops the running
    ones and is raised; a thread freed by a failed run does not take the next one."""
    pool, failures = ThreadPoolExecutor(jobs), []

    def guarded(i: int) -> Row:
        if failures:
            raise CancelledError
        try:
            return one(i)
        except BaseException as e:
            failures.append(e)
            raise
    try:
        futures = {pool.submit(guarded, i): i for i in range(n)}
        for f in as_completed(futures):
            finished(futures[f], f.result())
    except BaseException as e:
        pool.shutdown(wait=False, cancel_futures=True)
        for proc in list(_WORKERS):
            proc.kill()
        if isinstance(e, CancelledError) and failures:  # a run that did not start: say why
            raise failures[0] from None
        raise
    pool.shutdown()


def _meta(cfg: CompareConfig, task: Task, steps: int, isolate: bool, t_start: float) -> dict:
    return {"device": _device_name(cfg.device), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "model": cfg.model, "labels": [str(y) for y in task.labels], "examples": task.sizes,
            "steps": steps, "batch_size": cfg.batch_size, "max_len": cfg.max_len, "seed": cfg.seed,
            "seeds": [cfg.seed + k for k in range(cfg.seeds)], "reference": cfg.reference,
            "dtype": "bf16 autocast" if cfg.device.startswith("cuda") else "fp32",
            "memory": ("CUDA max_memory_allocated" if cfg.device.startswith("cuda") else
                       "peak RSS of a fresh worker process per method (includes Python, torch and the data)"
                       if isolate else "peak RSS of the process so far (in-process run: only grows)"),
            "budget": budget_note(cfg.methods, steps, cfg.full),
            "jobs": cfg.jobs, "timing": ("wall s and tokens/s of each run were measured with "
                                          f"{cfg.jobs} runs sharing the device" if cfg.jobs > 1 else
                                          "one run at a time"),
            "together": ("LoRA's seeds trained at once on one base (train-many): each row's wall s is the run's "
                         "over the seeds, its tokens/s and peak memory the run's" if cfg.together else None),
            "total_s": round(time.perf_counter() - t_start, 1), "date": time.strftime("%Y-%m-%d")}


def _warm_up(task: Task, cfg: CompareConfig) -> None:
    """One untimed training step, so one-time start-up costs (lazy imports of the optimizer's
    helpers, CUDA context, cuBLAS handles, allocator growth) are not charged to whichever
    method runs first."""
    from minift.training.forward import model_forward, pick_device, to_device
    device = pick_device(cfg.device)
    model = load_model(task, cfg.seed).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-9)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        model_forward(model, to_device(task.train[0], device)).loss.backward()
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


def budget_note(methods, steps: int, full: bool = False) -> str:
    """How the comparison's budgets match, in words (from the recipes, as ``compare_settings`` reads
    them; ``full``: under ``--full``)."""
    parts = [f"every method: the same {steps} optimizer steps, batches, order and seed"]
    if "adalora" in methods:
        a, lo = (compare_settings(load_recipe(f"sentiment-{m}"), full)[1] for m in ("adalora", "lora"))
        same = a.get("target_r") == lo.get("r") and list(a.get("targets", ())) == list(lo.get("targets", ()))
        parts.append(f"AdaLoRA init_r={a.get('init_r')} -> target_r={a.get('target_r')} on "
                     f"{','.join(a.get('targets', ()))} {'matches' if same else 'differs from'} "
                     f"LoRA r={lo.get('r')} on {','.join(lo.get('targets', ()))} (final rank budget; "
                     f"its trainable count is at init_r)")
    return "; ".join(parts)


def _worker(argv: list[str]) -> int:
    """``python -m minift.studies.compare CONFIG.json METHOD OUT.json SEED``: one run, one fresh process."""
    cfg_path, method, out_path, seed = argv
    raw = json.loads(Path(cfg_path).read_text())
    try:
        cfg = CompareConfig(**{f.name: raw[f.name] for f in fields(CompareConfig)})
        task = load_task(cfg)
        if cfg.device.startswith("cuda"):
            _warm_up(task, cfg)  # the CUDA context and cuBLAS set-up are not charged to the run
        else:
            _warm_up_optimizer()
        row = run_method(task, method, cfg, int(seed))
    except (ValueError, KeyError, FileNotFoundError) as e:  # the parent reports it in one line, exit 2
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        Path(out_path).write_text(json.dumps({"error": str(msg)}))
        return 2
    except Exception as e:  # noqa: BLE001  (a run-time failure: one line for the parent, exit 1)
        Path(out_path).write_text(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        return 1
    Path(out_path).write_text(json.dumps([asdict(r) for r in row] if isinstance(row, list) else asdict(row)))
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
