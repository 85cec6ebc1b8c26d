"""`minift compare --together`: LoRA's seeds trained at once, on one base (``training/many.py``).

With ``--seeds N`` a comparison trains LoRA N times, runs that differ only in their seed: the new
head's init, A's init, the data order and the dropout masks. Each run passes the same frozen base
over its batches. Trained together, the N runs are N jobs of one ``train_many`` run: every step
concatenates their micro-batches, the base runs once over all the rows, and each seed's adapter
and head learn from its own rows only (named adapters, ``methods/multi_lora.py``):

    for each seed s:  load the model seeded with s     the head and the RNG state run s starts from
                      job s = (LoRA recipe, the data, TrainConfig(seed=s), that head, that RNG state)
    train_many(base, jobs)                             one forward and backward for every seed a step
    for each seed s:  set_active(base, "seed<s>"); evaluate on dev and test

Each job starts exactly as compare's separate run with its seed (the head it draws, its A), sees
the same data order, and steps with its own AdamW, schedule and clipping. Dropout (the model's
and LoRA's, 0.1 in the LoRA recipe) is drawn from one generator over the mixed batch, so the seeds
see other masks than their separate runs would: the same runs in distribution, not draw for draw.
What it saves is the host's per-step overhead and the launches of the base's kernels, which is
where a GPU's time goes for small models (docs/benchmarks.md has the measurements); on a CPU the
work is the same FLOPs in bigger matrices.

The rows are one per seed, as separate runs give. A row's wall time is the shared run's divided
by its seeds (each seed's share of the cost), its tokens/s (every seed's tokens over that run's
time: the same rate) and peak memory the shared run's; each row's note says so.
"""
from __future__ import annotations

import copy
import time

import torch

from minift.studies.compare_setup import (CompareConfig, Row, Task, load_model, peak_mib, start_peak, total_steps,
                                          train_config)
from minift.training.recipes import compare_settings, load_recipe


def run_together(task: Task, cfg: CompareConfig, seeds: list[int]) -> list[Row]:
    """Train LoRA once per seed in ``seeds``, all in one ``train_many`` run; one row per seed."""
    from minift.adapters.multi import as_single
    from minift.methods.common import count_trainable
    from minift.methods.multi_lora import set_active
    from minift.methods.registry import parse_method
    from minift.training.evaluate import evaluate
    from minift.training.forward import pick_device
    from minift.training.many import Job, add_jobs, train_many
    device = pick_device(cfg.device)
    start_peak(device)
    recipe = load_recipe("sentiment-lora")
    steps = total_steps(cfg, len(task.train))
    lr, options = compare_settings(recipe, full=cfg.full)
    ms = parse_method("lora", options, total_steps=steps)
    base, jobs = None, []
    for s in seeds:
        model = load_model(task, s)  # as compare's run with seed s: its new head, then the state A is drawn from
        tc = train_config(cfg, recipe, lr, steps, s)
        jobs.append(Job(f"seed{s}", ms.config, task.train, tc, ms.training.lr_ratio, init_rng=torch.get_rng_state(),
                        modules={"classifier": copy.deepcopy(model.classifier)}))
        base = base or model  # every load holds the same pretrained weights: the first is the shared base
    add_jobs(base, jobs)
    t0 = time.perf_counter()
    res = train_many(base, jobs, cfg.device, progress=cfg.progress)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0
    peak = peak_mib(device)
    note = (f"seeds {seeds[0]}-{seeds[-1]} trained together on one base (train-many): wall s is the shared "
            f"run's over {len(seeds)}, tokens/s and peak the shared run's" if len(seeds) > 1
            else "trained by train-many (one job)")
    rows = []
    for s, j in zip(seeds, jobs):
        set_active(base, j.name)
        t0 = time.perf_counter()
        preds = {"dev": [], "test": []}
        dev, test = (evaluate(base, getattr(task, split), "classification", device, predictions=preds[split])
                     for split in ("dev", "test"))
        with as_single(base, j.name):  # this seed's adapter and head alone, as its own run holds them
            trainable, total = count_trainable(base)
        r = res.jobs[j.name]
        rows.append(Row("lora", s, trainable, total, 100 * trainable / total, lr, r.steps, wall / len(seeds),
                        time.perf_counter() - t0, res.tokens_per_s, peak, dev["accuracy"], dev["macro_f1"],
                        test["accuracy"], test["macro_f1"], note,
                        extra={"final_loss": r.losses[-1] if r.losses else float("nan"), "together": seeds,
                               "options": {k: list(v) if isinstance(v, tuple) else v for k, v in ms.options.items()}},
                        predictions=preds))
    set_active(base, None)
    return rows
